"""Environment checks run when kd2 is imported."""

from __future__ import annotations

__all__ = ["check_torchvision", "TorchvisionBrokenError"]

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
