"""Prediction-guided Feature Imitation (PFI) of Li et al. (AAAI 2022), the companion of RM.

Feature imitation is weighted, location by location, by how much the two detectors' predictions
differ there. Per FPN level ``l`` and location ``(n, h, w)``::

    D^p = mean_j (z^s − z^t)²_j          (over the A·K classification logits)
    D^f = mean_c (φ(F^s) − F^t)²_c       (over the C feature channels)
    L_PFI = mean_l mean_{n,h,w} [D^p · D^f]

This is the normalisation of the **first** third-party (mmrazor) version, the direct reading of
"prediction-guided weighting" (``docs/algorithms.md`` §3.2); the later version's per-image L2
norm over ``(h, w)`` is not implemented. ``φ`` is the identity by default (the 3P code uses no
adapter because both detectors have 256 channels); a Conv adapter can be enabled.

**Detach decision.** By default ``D^p`` is **detached**: the prediction difference acts as a
pure per-location weight and PFI's gradient reaches only the student's features (and, through
them, everything upstream). The 3P code does not detach ``D^p``, so PFI also pushes the
student's classification branch towards the teacher's logits; that variant is available with
``DETACH_PREDICTION: False``. The paper does not settle the question.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from kd2.losses.adapters import FeatureAdapter
from kd2.structures import StepRecord

from .base import KD_METHOD_REGISTRY, KDMethod, MethodCard
from .utils import compute_dtype, require_one_stage, require_sigmoid_dense

__all__ = ["PFI", "pfi_loss"]


def pfi_loss(
    student_feat: Tensor,
    teacher_feat: Tensor,
    student_logits: Tensor,
    teacher_logits: Tensor,
    detach_prediction: bool = True,
) -> Tensor:
    """PFI loss of one level.

    Args:
        student_feat: ``(N, C, H, W)`` (already adapted) student features.
        teacher_feat: ``(N, C, H, W)`` teacher features (detached here).
        student_logits: ``(N, A*K, H, W)`` student classification logits as maps.
        teacher_logits: ``(N, A*K, H, W)`` teacher logits (detached here).
        detach_prediction: detach the prediction factor ``D^p`` (default); ``False`` lets the
            gradient also flow into ``student_logits``.

    Returns:
        fp32 scalar (fp64 when an input is fp64)
        ``mean_{n,h,w}[mean_c (s − t)² · mean_j (z_s − z_t)²]``.
    """
    if student_feat.shape != teacher_feat.shape:
        raise ValueError(
            f"student features {tuple(student_feat.shape)} and teacher features "
            f"{tuple(teacher_feat.shape)} differ in shape"
        )
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ in shape"
        )
    if student_feat.dim() != 4 or student_logits.dim() != 4:
        raise ValueError("pfi_loss needs 4-D (N, C, H, W) features and logit maps")
    if (
        student_feat.shape[0] != student_logits.shape[0]
        or student_feat.shape[-2:] != student_logits.shape[-2:]
    ):
        raise ValueError(
            f"feature map {tuple(student_feat.shape)} and logit map "
            f"{tuple(student_logits.shape)} differ in batch or spatial size"
        )
    dtype = compute_dtype(student_feat, teacher_feat, student_logits, teacher_logits)
    d_feat = (student_feat.to(dtype) - teacher_feat.detach().to(dtype)).pow(2).mean(dim=1)
    d_pred = (student_logits.to(dtype) - teacher_logits.detach().to(dtype)).pow(2).mean(dim=1)
    if detach_prediction:
        d_pred = d_pred.detach()
    return (d_pred * d_feat).mean()


@KD_METHOD_REGISTRY.register()
class PFI(KDMethod):
    """Prediction-guided feature imitation on the levels of a one-stage dense head.

    Config (``cfg.KD.PFI``): ``WEIGHT`` (1.5), ``DETACH_PREDICTION`` (True), ``ADAPTER_KERNEL``
    (0 = identity, which requires equal student/teacher channels; 1 or 3 = a
    :class:`~kd2.losses.adapters.FeatureAdapter` conv). Loss: ``loss_kd_pfi``, the mean of
    :func:`pfi_loss` over the dense head's strides present in both records' features.
    """

    card = MethodCard(
        title="Prediction-guided Feature Imitation",
        summary="feature imitation weighted by the prediction gap",
        paper="Li et al., Rank Mimicking and Prediction-guided Feature Imitation (AAAI 2022)",
        code="open-mmlab/mmrazor (unmerged commits, port)",
        project="RankMimicking",
        terms=("loss_kd_pfi",),
        families=("retinanet", "fcos", "gfl"),
    )

    dense_across_families = True  # reads the teacher's class logits only

    teacher_parts = frozenset({"features", "dense"})

    def __init__(
        self,
        student_channels: Mapping[int, int],
        teacher_channels: Mapping[int, int],
        *,
        weight: float = 1.5,
        detach_prediction: bool = True,
        adapter_kernel: int = 0,
    ):
        super().__init__()
        self.weight = float(weight)
        self.detach_prediction = bool(detach_prediction)
        kernel = int(adapter_kernel)
        self.adapter: FeatureAdapter | None
        if kernel > 0:
            self.adapter = FeatureAdapter(student_channels, teacher_channels, kernel)
        elif kernel == 0:
            self.adapter = None
            shared = sorted(set(student_channels) & set(teacher_channels))
            bad = {s: (student_channels[s], teacher_channels[s]) for s in shared}
            bad = {s: c for s, c in bad.items() if c[0] != c[1]}
            if bad:
                raise ValueError(
                    "PFI with ADAPTER_KERNEL 0 (no adapter) needs equal student and teacher "
                    f"channels; (student, teacher) channels differ at strides {bad}. Set "
                    "KD.PFI.ADAPTER_KERNEL to 1 or 3."
                )
        else:
            raise ValueError(f"PFI ADAPTER_KERNEL must be 0, 1 or 3, got {kernel}")

    @classmethod
    def from_config(
        cls,
        node,
        *,
        student_channels: Mapping[int, int],
        teacher_channels: Mapping[int, int],
        num_classes: int,
        arch: str,
    ) -> PFI:
        require_one_stage("PFI", arch)
        return cls(
            student_channels,
            teacher_channels,
            weight=node.WEIGHT,
            detach_prediction=node.DETACH_PREDICTION,
            adapter_kernel=node.ADAPTER_KERNEL,
        )

    def _adapt(self, stride: int, feat: Tensor) -> Tensor:
        if self.adapter is None:
            return feat
        return self.adapter.convs[str(stride)](feat)

    def forward(self, student: StepRecord, teacher: StepRecord) -> dict[str, Tensor]:
        sd, td = student.dense, teacher.dense
        if sd is None or td is None:
            raise ValueError("PFI needs the dense (one-stage) head in both the student and teacher")
        require_sigmoid_dense("PFI", sd)
        s_maps = dict(zip(sd.strides, sd.level_maps(sd.cls_logits)))
        t_maps = dict(zip(td.strides, td.level_maps(td.cls_logits)))
        strides = [
            s
            for s in sd.strides
            if s in t_maps
            and s in student.features
            and s in teacher.features
            and (self.adapter is None or s in self.adapter.strides)
        ]
        if not strides:
            raise ValueError(
                f"no dense-head stride {sd.strides} is present in the teacher head {td.strides} "
                f"and both records' features ({sorted(student.features)}, "
                f"{sorted(teacher.features)})"
            )
        total = None
        for s in strides:
            term = pfi_loss(
                self._adapt(s, student.features[s]),
                teacher.features[s],
                s_maps[s],
                t_maps[s],
                self.detach_prediction,
            )
            total = term if total is None else total + term
        loss = total / len(strides)
        return {"loss_kd_pfi": loss * self.weight}
