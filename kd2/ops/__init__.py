"""kd2's operators, in the style of ``torchvision.ops``: plain functions on plain tensors.

* :func:`box_mean_pool` — mean feature of each box on a strided feature map (integral images);
* :func:`pgm_select` — prototype selection of Global-Knowledge distillation (ECCV 2022);
* :func:`roi_align` — RoIAlign (``ROIAlignV2``) in pure PyTorch, for instance features (GID).

They run the compiled kernels of the extension ``kd2._C`` (``torch.ops.kd2.*``, CPU and CUDA,
with fake kernels for ``torch.compile``) when it is built, and otherwise fall back, with one
warning, to the pure-PyTorch implementations in :mod:`kd2.ops.reference`. Build the extension
from the kd2 checkout with ``pip install --no-build-isolation -e .``. Importing this package never
fails because the extension is missing.
"""

from kd2.ops import reference
from kd2.ops._ext import (
    ExtensionNotBuiltWarning,
    extension_available,
    extension_has_cuda,
)
from kd2.ops.boxes import box_mean_pool
from kd2.ops.pgm import pgm_select
from kd2.ops.roi_align import roi_align

__all__ = [
    "ExtensionNotBuiltWarning",
    "box_mean_pool",
    "extension_available",
    "extension_has_cuda",
    "pgm_select",
    "reference",
    "roi_align",
]

# Load the extension now, when it is there, so that torch.ops.kd2.* and their fake kernels are
# registered before any tracing; a missing extension only warns when an op is first used.
extension_available()
