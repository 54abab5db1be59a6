"""Environment checks run when kd2 is imported."""

from __future__ import annotations

__all__ = ["check_device", "check_torchvision", "TorchvisionBrokenError"]

_FIX = (
    "torchvision's Linux wheels are built against the CUDA-enabled torch of the same release; "
    "a CPU-only torch build (or a torch/torchvision version mismatch) leaves its compiled "
    "operators unregistered. Reinstall them together as a matching pair, e.g.\n"
    "    pip uninstall -y torch torchvision && pip install torch torchvision\n"
    "(the CUDA-enabled torch runs fine on a machine without a GPU), or run `make install`, "
    "which recreates kd2's .venv correctly."
)


class TorchvisionBrokenError(ImportError):
    """torchvision is installed but its compiled operators (``torchvision::nms``) are missing."""


def check_torchvision() -> None:
    """Raise :class:`TorchvisionBrokenError` unless ``torchvision.ops.nms`` really runs."""
    try:
        import torch
        import torchvision  # noqa: F401
        from torchvision.ops import nms

        keep = nms(torch.tensor([[0.0, 0.0, 1.0, 1.0]]), torch.tensor([1.0]), 0.5)
        if keep.tolist() != [0]:
            raise RuntimeError(f"nms returned {keep.tolist()} for a single box")
    except ImportError as e:
        if "torchvision" in str(e) and "No module named" in str(e):
            raise TorchvisionBrokenError(
                f"kd2 needs torchvision, which is not installed. {_FIX}"
            ) from None
        raise TorchvisionBrokenError(f"torchvision cannot be imported ({e}). {_FIX}") from None
    except RuntimeError as e:
        try:
            import torch
            import torchvision

            versions = f"torch {torch.__version__}, torchvision {torchvision.__version__}"
        except Exception:  # torchvision itself fails to import
            versions = "torch/torchvision"
        raise TorchvisionBrokenError(
            f"torchvision.ops.nms does not work with the installed {versions}: {e}\n{_FIX}"
        ) from None


def check_device(device: str, key: str = "MODEL.DEVICE") -> None:
    """Raise :class:`~kd2.utils.errors.DeviceError` unless ``device`` exists on this machine
    (``cpu``, ``cuda``, ``cuda:N``, ``mps``); an unparsable name is a
    :class:`~kd2.utils.errors.ConfigError`."""
    import torch

    from .errors import ConfigError, DeviceError

    try:
        dev = torch.device(str(device))
    except (RuntimeError, TypeError):
        raise ConfigError(
            f"{key} {device!r} is not a device name", "use cpu, cuda or cuda:N"
        ) from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(
                f"{key} is {device!r} but this machine has no usable CUDA GPU "
                f"(torch {torch.__version__}, CUDA build {torch.version.cuda or 'none'})",
                f"set {key} cpu, or run where a GPU and its driver are present",
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(
                f"{key} is {device!r} but this machine has {torch.cuda.device_count()} GPU(s)",
                f"use cuda:0 .. cuda:{torch.cuda.device_count() - 1}",
            )
    elif dev.type == "mps" and not (
        getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()
    ):
        raise DeviceError(f"{key} is {device!r} but MPS is not available", f"set {key} cpu")
