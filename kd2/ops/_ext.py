"""Loading of the compiled extension ``kd2._C`` and the Python half of its operators.

``kd2._C`` registers the schemas and the CPU / CUDA kernels of ``torch.ops.kd2.*``. Once it is
loaded, this module adds what PyTorch lets Python provide: fake (meta) kernels for
``torch.compile`` / FakeTensor tracing, and the autograd formula of ``box_mean_pool``. When the
extension cannot be imported, :func:`extension_available` is False and :mod:`kd2.ops` runs the
pure-PyTorch references instead, after one warning (:func:`warn_fallback`).
"""

from __future__ import annotations

import warnings

import torch

__all__ = [
    "BUILD_COMMAND",
    "ExtensionNotBuiltWarning",
    "extension_available",
    "extension_has_cuda",
    "warn_fallback",
]

BUILD_COMMAND = "pip install --no-build-isolation -e ."


class ExtensionNotBuiltWarning(UserWarning):
    """kd2.ops runs its pure-PyTorch fallbacks because ``kd2._C`` could not be imported."""


class _State:
    def __init__(self) -> None:
        self.available: bool | None = None  # None: not tried yet
        self.error: BaseException | None = None
        self.warned = False


_state = _State()
_registered = False  # the torch.library registrations below are process-wide: done once


def extension_available() -> bool:
    """Whether ``kd2._C`` is importable (tried once; the result is cached)."""
    if _state.available is None:
        try:
            import kd2._C  # noqa: F401
        except (ImportError, OSError) as e:  # not built, or built against another torch
            _state.available, _state.error = False, e
        else:
            _register_python_parts()
            _state.available = True
    return bool(_state.available)


def extension_has_cuda() -> bool:
    """Whether ``kd2._C`` is importable and was compiled with its CUDA kernels."""
    return extension_available() and torch.ops.kd2._cuda_version() > 0


def warn_fallback() -> None:
    """Warn, once per process, that kd2.ops is using its pure-PyTorch fallbacks."""
    if _state.warned:
        return
    _state.warned = True
    warnings.warn(
        f"kd2.ops: the compiled extension kd2._C is not available ({_state.error}); falling back "
        "to the pure-PyTorch reference implementations, which are slower. Build it from the kd2 "
        f"checkout with `{BUILD_COMMAND}` (or `make install`).",
        ExtensionNotBuiltWarning,
        stacklevel=3,
    )


def _register_python_parts() -> None:
    global _registered
    if _registered:
        return
    _registered = True

    @torch.library.register_fake("kd2::box_mean_pool")
    def _box_mean_pool_fake(features, boxes, batch_index, stride):
        torch._check(features.dim() == 4, lambda: "box_mean_pool: features must be (N, C, H, W)")
        torch._check(boxes.dim() == 2 and boxes.shape[1] == 4, lambda: "boxes must be (M, 4)")
        return features.new_empty((boxes.shape[0], features.shape[1]))

    @torch.library.register_fake("kd2::box_mean_pool_backward")
    def _box_mean_pool_backward_fake(grad, boxes, batch_index, stride, batch_size, height, width):
        return grad.new_empty((batch_size, grad.shape[1], height, width))

    @torch.library.register_fake("kd2::pgm_select")
    def _pgm_select_fake(feats_a, feats_b, num_prototypes, alpha, bandwidth, quantile):
        size = num_prototypes if feats_a.shape[0] != 0 else 0
        return feats_a.new_empty((size,), dtype=torch.long)

    # d box_mean_pool / d features = box_mean_pool_backward; the op is piecewise constant in the
    # boxes, which get no gradient. The backward is linear in grad with the forward as its
    # adjoint, which gives double backward.
    def _setup(ctx, inputs, output):
        features, boxes, batch_index, stride = inputs
        ctx.save_for_backward(boxes, batch_index)
        ctx.stride = stride
        ctx.size = (features.shape[0], features.shape[2], features.shape[3])

    def _backward(ctx, grad):
        boxes, batch_index = ctx.saved_tensors
        n, h, w = ctx.size
        grad_features = torch.ops.kd2.box_mean_pool_backward(
            grad.contiguous(), boxes, batch_index, ctx.stride, n, h, w
        )
        return grad_features, None, None, None

    torch.library.register_autograd("kd2::box_mean_pool", _backward, setup_context=_setup)

    def _setup_bwd(ctx, inputs, output):
        _, boxes, batch_index, stride = inputs[:4]
        ctx.save_for_backward(boxes, batch_index)
        ctx.stride = stride

    def _backward_bwd(ctx, grad_grad):
        boxes, batch_index = ctx.saved_tensors
        out = torch.ops.kd2.box_mean_pool(grad_grad, boxes, batch_index, ctx.stride)
        return out, None, None, None, None, None, None

    torch.library.register_autograd(
        "kd2::box_mean_pool_backward", _backward_bwd, setup_context=_setup_bwd
    )
