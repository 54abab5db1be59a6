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

Every measurement also gives the distillation's total, ``kd`` — the gradient of the sum of the
``loss_kd_*`` terms, the pull the optimizer actually receives (terms that cancel count as
cancelled):

* ``grad_norm/kd`` — ``‖Σ_kd g_term‖``;
* ``grad_share/kd`` — ``‖Σ_kd g‖ / (‖Σ_kd g‖ + ‖g_detection‖)``: the quantity the
  ``KD.BALANCE`` controller (:mod:`kd2.modeling.balance`) holds in its band.

It costs one trunk backward per group; ``per_term=False`` measures only the two groups
``detection`` and ``kd`` (two backward passes, whatever the number of terms), which is what the
controller's steps between two per-term measurements do.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

__all__ = ["DETECTION", "KD_TOTAL", "gradient_statistics", "term_gradients", "trunk_parameters"]

#: The name of the detection losses' group.
DETECTION = "detection"
#: The name of the distillation's total: the sum of the ``loss_kd_*`` terms.
KD_TOTAL = "kd"
#: Parameter-name prefixes of the trunk: torchvision ``backbone.body`` / ``backbone.fpn``,
#: Detectron2 ``backbone.bottom_up`` / ``backbone.fpn_*`` — both are under ``backbone.``.
TRUNK_PREFIX = "backbone."


def trunk_parameters(model: nn.Module) -> list[Tensor]:
    """The trainable parameters of ``model``'s backbone and FPN (names under ``backbone.``), or
    those the model names its trunk (``kd_trunk_parameters()``: a DETR's backbone and hybrid
    encoder)."""
    if hasattr(model, "kd_trunk_parameters"):
        return list(model.kd_trunk_parameters())
    return [
        p for n, p in model.named_parameters() if n.startswith(TRUNK_PREFIX) and p.requires_grad
    ]


def _total(values: list[Tensor]) -> Tensor:
    return torch.stack([v.float() for v in values]).sum()


def term_gradients(
    losses: Mapping[str, Tensor], params: Sequence[Tensor], per_term: bool = True
) -> dict[str, list[Tensor | None]]:
    """Each group's gradient with respect to ``params``.

    Args:
        losses: the step's loss dict (``loss_kd_*`` terms and detection losses), scalars with
            their graphs.
        params: the trunk parameters.
        per_term: one group per ``loss_kd_*`` term; ``False``: one group ``"kd"`` for their sum.

    Returns:
        ``{"detection": grads, "loss_kd_x": grads, ...}`` (or ``{"detection": grads, "kd":
        grads}``), one entry per parameter (``None`` where the group does not reach it). The
        graph is retained for the step's backward.
    """
    groups: dict[str, Tensor] = {}
    detection = [v for k, v in losses.items() if not k.startswith("loss_kd_")]
    if detection:
        groups[DETECTION] = _total(detection)
    kd = {k: v for k, v in losses.items() if k.startswith("loss_kd_")}
    if per_term:
        groups.update({k: v.float() for k, v in kd.items()})
    elif kd:
        groups[KD_TOTAL] = _total(list(kd.values()))
    out = {}
    for name, value in groups.items():
        if not value.requires_grad:
            out[name] = [None] * len(params)
            continue
        out[name] = list(
            torch.autograd.grad(value, list(params), retain_graph=True, allow_unused=True)
        )
    return out


#: Parameter elements per block of the fused Gram computation, by device type: blocks that stay
#: in a CPU's cache, large blocks (few kernel launches) on a GPU. The scratch memory is about
#: ``groups × block × 12`` bytes (each group's block concatenated, and in float64).
GRAM_CHUNK = {"cpu": 1 << 16, "other": 1 << 22}


def _gram(grads: Mapping[str, list[Tensor | None]], names: list[str]) -> list[list[float]]:
    """All pairwise dot products ``⟨g_a, g_b⟩`` of the groups' trunk gradients, in float64.

    One matrix product per block of parameters (each group's gradients concatenated), and one
    device-to-host copy in all, instead of a reduction and a synchronisation per parameter and
    pair. A ``None`` entry (the group does not reach that parameter) counts as zeros.
    """
    n = len(names)
    lists = [grads[name] for name in names]
    length = max((len(g) for g in lists), default=0)
    gram: Tensor | None = None
    block: list[tuple[list[Tensor | None], Tensor]] = []  # (entries, a non-None one)
    size = 0

    def flush() -> None:
        nonlocal gram, block, size
        if not block:
            return
        rows = []
        for k in range(n):
            parts = [
                (entry[k] if entry[k] is not None else ref.new_zeros(ref.shape)).reshape(-1)
                for entry, ref in block
            ]
            rows.append(torch.cat(parts).double())  # cat promotes mixed dtypes
        m = torch.stack(rows)
        g = m @ m.T
        gram = g if gram is None else gram + g.to(gram.device)
        block, size = [], 0

    for i in range(length):
        entry = [g[i] if i < len(g) else None for g in lists]
        ref = next((e for e in entry if e is not None), None)
        if ref is None:
            continue
        if block and block[0][1].device != ref.device:  # one block per device
            flush()
        block.append((entry, ref))
        size += ref.numel()
        if size >= GRAM_CHUNK["cpu" if ref.device.type == "cpu" else "other"]:
            flush()
    flush()
    if gram is None:
        return [[0.0] * n for _ in range(n)]
    return gram.cpu().tolist()


def gradient_statistics(grads: Mapping[str, list[Tensor | None]]) -> dict[str, float]:
    """``grad_norm/``, ``grad_share/`` and ``grad_cos/`` of every group (see the module doc).

    Every statistic comes from the groups' Gram matrix of trunk gradients (float64): the norms
    are its diagonal, the cosines its off-diagonal entries, the sum of the KD terms' gradients
    (the ``kd`` statistics) enters through sums of its entries — so a per-term measurement and
    a ``per_term=False`` one give the same ``grad_*/kd``.

    Args:
        grads: :func:`term_gradients`' output.
    """
    names = list(grads)
    index = {name: k for k, name in enumerate(names)}
    kd_names = [n for n in names if n != DETECTION]
    gram = _gram(grads, names)
    norms = {n: math.sqrt(max(gram[index[n]][index[n]], 0.0)) for n in names}
    total = sum(norms.values())
    stats: dict[str, float] = {}
    has_det = DETECTION in grads
    groups = [n for n in names if n != KD_TOTAL]  # the KD total's statistics: below
    for n in groups:
        stats[f"grad_norm/{n}"] = norms[n]
        stats[f"grad_share/{n}"] = norms[n] / total if total > 0 else 0.0
    d = index.get(DETECTION)
    for n in groups:
        if n == DETECTION:
            continue
        denom = norms[n] * norms.get(DETECTION, 0.0)
        stats[f"grad_cos/{n}"] = gram[index[n]][d] / denom if has_det and denom > 0 else 0.0
    if kd_names:
        kd = [index[n] for n in kd_names]
        # ‖Σ_kd g‖² = Σ_ab ⟨g_a, g_b⟩ and ⟨g_det, Σ_kd g⟩ = Σ_a ⟨g_det, g_a⟩
        kd_norm = math.sqrt(max(sum(gram[a][b] for a in kd for b in kd), 0.0))
        det_norm = norms.get(DETECTION, 0.0)
        stats[f"grad_norm/{KD_TOTAL}"] = kd_norm
        stats[f"grad_share/{KD_TOTAL}"] = kd_norm / (kd_norm + det_norm) if kd_norm > 0 else 0.0
        if has_det:
            denom = kd_norm * det_norm
            dot = sum(gram[d][a] for a in kd)
            stats[f"grad_cos/{DETECTION}"] = dot / denom if denom > 0 else 0.0
            stats[f"grad_cos/{KD_TOTAL}"] = stats[f"grad_cos/{DETECTION}"]
    return stats
