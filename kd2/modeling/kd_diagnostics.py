"""Per-term gradient diagnostics at the student's shared trunk (backbone + FPN).

Every loss term of a distillation step pulls the trunk somewhere. These plain functions measure,
for each ``loss_kd_*`` term and for the detection losses together (``"detection"``), the gradient
it sends into the trunk parameters — with ``torch.autograd.grad`` on the trunk only, so nothing
is accumulated into ``.grad`` and the step's own backward is untouched:

* ``grad_norm/<term>`` — ``‖g_term‖₂`` over all trunk parameters;
* ``grad_share/<term>`` — ``‖g_term‖ / Σ_terms ‖g‖`` (detection included), in ``[0, 1]``;
* ``grad_cos/<term>`` — cosine between ``g_term`` and the detection gradient for a KD term (> 0:
  the term pulls the trunk the way the detection losses do); for ``detection``, the cosine between
  the detection gradient and the sum of the KD terms' gradients.

A term that does not reach the trunk (e.g. a head-only KD loss) has norm 0, share 0, cosine 0.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

__all__ = ["DETECTION", "gradient_statistics", "term_gradients", "trunk_parameters"]

#: The name of the detection losses' group.
DETECTION = "detection"
#: Parameter-name prefixes of the trunk: torchvision ``backbone.body`` / ``backbone.fpn``,
#: Detectron2 ``backbone.bottom_up`` / ``backbone.fpn_*`` — both are under ``backbone.``.
TRUNK_PREFIX = "backbone."


def trunk_parameters(model: nn.Module) -> list[Tensor]:
    """The trainable parameters of ``model``'s backbone and FPN (names under ``backbone.``)."""
    return [
        p for n, p in model.named_parameters() if n.startswith(TRUNK_PREFIX) and p.requires_grad
    ]


def term_gradients(
    losses: Mapping[str, Tensor], params: Sequence[Tensor]
) -> dict[str, list[Tensor | None]]:
    """Each group's gradient with respect to ``params``.

    Args:
        losses: the step's loss dict (``loss_kd_*`` terms and detection losses), scalars with
            their graphs.
        params: the trunk parameters.

    Returns:
        ``{"detection": grads, "loss_kd_x": grads, ...}``, one entry per parameter (``None``
        where the group does not reach it). The graph is retained for the step's backward.
    """
    groups: dict[str, Tensor] = {}
    detection = [v for k, v in losses.items() if not k.startswith("loss_kd_")]
    if detection:
        groups[DETECTION] = torch.stack([v.float() for v in detection]).sum()
    for k, v in losses.items():
        if k.startswith("loss_kd_"):
            groups[k] = v.float()
    out = {}
    for name, value in groups.items():
        if not value.requires_grad:
            out[name] = [None] * len(params)
            continue
        out[name] = list(
            torch.autograd.grad(value, list(params), retain_graph=True, allow_unused=True)
        )
    return out


def _dot(a: list[Tensor | None], b: list[Tensor | None]) -> Tensor:
    total = torch.zeros((), dtype=torch.float64)
    for x, y in zip(a, b):
        if x is not None and y is not None:
            total = total + (x.double() * y.double()).sum().cpu()
    return total


def gradient_statistics(grads: Mapping[str, list[Tensor | None]]) -> dict[str, float]:
    """``grad_norm/``, ``grad_share/`` and ``grad_cos/`` of every group (see the module doc).

    Args:
        grads: :func:`term_gradients`' output.
    """
    names = list(grads)
    kd_names = [n for n in names if n != DETECTION]
    norms = {n: float(_dot(grads[n], grads[n]).sqrt()) for n in names}
    total = sum(norms.values())
    stats: dict[str, float] = {}
    det = grads.get(DETECTION)
    for n in names:
        stats[f"grad_norm/{n}"] = norms[n]
        stats[f"grad_share/{n}"] = norms[n] / total if total > 0 else 0.0
    for n in kd_names:
        denom = norms[n] * norms.get(DETECTION, 0.0)
        stats[f"grad_cos/{n}"] = float(_dot(grads[n], det)) / denom if det and denom > 0 else 0.0
    if det is not None and kd_names:
        kd_sum = []
        for i in range(len(det)):
            parts = [grads[n][i] for n in kd_names if grads[n][i] is not None]
            kd_sum.append(torch.stack(parts).sum(0) if parts else None)
        kd_norm = float(_dot(kd_sum, kd_sum).sqrt())
        denom = kd_norm * norms[DETECTION]
        stats[f"grad_cos/{DETECTION}"] = float(_dot(det, kd_sum)) / denom if denom > 0 else 0.0
    return stats
