"""A dense head's towers cut open after their ``k``-th conv: CrossKD's tap point.

RetinaNet, FCOS and GFL heads (torchvision's, Detectron2's and kd2's) share one shape: per FPN
level, a classification tower and a box tower of ``conv → [norm] → activation`` blocks, each
followed by a 3×3 predictor. :class:`TowerHead` names those pieces for one head; the backends
build it (:func:`kd2.tv.record.tower_head`, ``kd2.d2.meta_arch._tower_head``), the rest is
framework-free:

* :func:`capture_tower_taps` records, while the head's own ``forward`` runs, the output of the
  ``k``-th conv (after its norm, **before** its activation) of both towers at every level — the
  student's taps keep their graph, so the detection forward is not run twice;
* :func:`resume_head` runs the rest of a head (the activation when ``k > 0``, the remaining
  blocks, the predictors and the per-level output op such as GFL's ``Scale``) on other features,
  and lays the predictions out as :class:`kd2.structures.DenseOutputs` does.

The split index counts **activation** modules (``k`` blocks = the ``k``-th activation), so it
works whether a block is a ``Conv2dNormActivation`` (torchvision), a flat ``conv, GN, ReLU``
sequence (Detectron2, torchvision's FCOS) or has no norm at all (torchvision's RetinaNet).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Callable, Dict, Iterator, List, Sequence, Tuple

from torch import Tensor, nn

from kd2.structures import HeadSplit

__all__ = [
    "ACTIVATIONS",
    "TowerHead",
    "capture_tower_taps",
    "flat_layers",
    "resume_head",
    "run_with_head_split",
    "split_index",
]

#: module types treated as a block's activation (the cut is made right before one).
ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.SiLU, nn.GELU, nn.Hardswish)


def flat_layers(tower: nn.Module) -> List[nn.Module]:
    """The leaf layers of a tower in call order (nested ``nn.Sequential`` blocks expanded)."""
    if not isinstance(tower, nn.Sequential):
        return [tower]
    out: List[nn.Module] = []
    for child in tower.children():
        out += flat_layers(child)
    return out


def split_index(layers: Sequence[nn.Module], k: int) -> int:
    """Position of the ``k``-th activation in ``layers`` (``0`` for ``k = 0``): the layers
    before it produce the tap, the layers from it on resume.

    Raises:
        ValueError: the tower has fewer than ``k`` activations.
    """
    if k == 0:
        return 0
    seen = 0
    for i, layer in enumerate(layers):
        if isinstance(layer, ACTIVATIONS):
            seen += 1
            if seen == k:
                return i
    raise ValueError(
        f"the head tower has {seen} conv blocks, cannot cut it after block {k}; lower the "
        "method's split index (CrossKD: KD.CROSSKD.SPLIT)"
    )


@dataclass
class TowerHead:
    """The pieces of one dense head, by role.

    Attributes:
        cls_tower / reg_tower: flat layers of the two towers (:func:`flat_layers`).
        cls_predictor: ``(N, C, H, W) -> (N, A K, H, W)`` class logits.
        reg_predictor: ``(N, C, H, W) -> (N, A D, H, W)`` box outputs (``D = 4``, or
            ``4 (reg_max + 1)`` distribution logits).
        num_anchors: ``A``, predictions per location.
        reg_output: ``(raw box map, level index) -> box map``, the head's per-level op after the
            predictor (GFL's learnable ``Scale``, torchvision FCOS's ReLU); ``None`` = identity.
        dist_to_deltas: for a distribution head, ``(..., 4 (reg_max + 1)) -> (..., 4)`` expected
            side distances (the record's ``box_deltas``); ``None`` for a plain box head.
    """

    cls_tower: Sequence[nn.Module]
    reg_tower: Sequence[nn.Module]
    cls_predictor: nn.Module
    reg_predictor: nn.Module
    num_anchors: int
    reg_output: Callable[[Tensor, int], Tensor] | None = None
    dist_to_deltas: Callable[[Tensor], Tensor] | None = None


def _tap_hook(store: List[Tensor], protect: bool):
    def hook(module, inputs, output):
        store.append(output)
        # An in-place activation next would overwrite the stored tap: hand it a copy instead.
        return output.clone() if protect else None

    return hook


def _tap_pre_hook(store: List[Tensor]):
    def hook(module, inputs):
        store.append(inputs[0])

    return hook


@contextmanager
def capture_tower_taps(head: TowerHead, k: int) -> Iterator[Tuple[List[Tensor], List[Tensor]]]:
    """Within the block, every call of the head's towers appends the feature at the cut to the
    yielded ``(cls_taps, reg_taps)`` lists (one ``(N, C, H, W)`` per level, in call order).

    Adds forward hooks for the duration of the block only; the head's outputs are unchanged.
    """
    taps: Tuple[List[Tensor], List[Tensor]] = ([], [])
    handles = []
    for tower, store in zip((head.cls_tower, head.reg_tower), taps):
        cut = split_index(tower, k)
        if cut == 0:
            handles.append(tower[0].register_forward_pre_hook(_tap_pre_hook(store)))
        else:
            protect = bool(getattr(tower[cut], "inplace", False))
            handles.append(tower[cut - 1].register_forward_hook(_tap_hook(store, protect)))
    try:
        yield taps
    finally:
        for h in handles:
            h.remove()


def _rows(x: Tensor, num_anchors: int) -> Tensor:
    """``(N, A D, H, W)`` -> ``(N, H W A, D)`` (location-major, anchor fastest)."""
    n, ad, h, w = x.shape
    d = ad // num_anchors
    return x.view(n, num_anchors, d, h, w).permute(0, 3, 4, 1, 2).reshape(n, h * w * num_anchors, d)


def _run(layers: Sequence[nn.Module], x: Tensor) -> Tensor:
    if layers and getattr(layers[0], "inplace", False):
        x = x.clone()  # never overwrite the caller's tensor
    for layer in layers:
        x = layer(x)
    return x


def resume_head(
    head: TowerHead, k: int, cls_features: List[Tensor], reg_features: List[Tensor]
) -> Dict[str, List[Tensor] | None]:
    """Run ``head`` from its cut after block ``k`` on other per-level features.

    Args:
        head: the head whose remaining layers run (a teacher's: its parameters stay frozen, the
            gradient flows to the inputs).
        k: the cut (as in :func:`capture_tower_taps`).
        cls_features / reg_features: per level ``(N, C, H_l, W_l)`` at the cut.

    Returns:
        ``{"cls_logits": [(N, R_l, K)], "box_deltas": [(N, R_l, 4)], "box_dist":
        [(N, R_l, 4 (reg_max + 1))] or None}``, laid out as :class:`kd2.structures.DenseOutputs`.
    """
    cls_rest = list(head.cls_tower)[split_index(head.cls_tower, k) :]
    reg_rest = list(head.reg_tower)[split_index(head.reg_tower, k) :]
    cls_logits, box_out = [], []
    for level, (c, r) in enumerate(zip(cls_features, reg_features)):
        cls_logits.append(_rows(head.cls_predictor(_run(cls_rest, c)), head.num_anchors))
        box = head.reg_predictor(_run(reg_rest, r))
        if head.reg_output is not None:
            box = head.reg_output(box, level)
        box_out.append(_rows(box, head.num_anchors))
    if head.dist_to_deltas is None:
        return {"cls_logits": cls_logits, "box_deltas": box_out, "box_dist": None}
    deltas = [head.dist_to_deltas(d) for d in box_out]
    return {"cls_logits": cls_logits, "box_deltas": deltas, "box_dist": box_out}


def run_with_head_split(
    run: Callable[[], tuple], split: int | None, make_head: Callable[[], TowerHead]
):
    """``run()`` (a backend's head forward returning ``(DenseOutputs, ...)``); when ``split`` is
    set, with the towers' features after block ``split`` and the head's ``resume`` in the record's
    :class:`~kd2.structures.HeadSplit` (``make_head`` names the head's pieces)."""
    if split is None:
        return run()
    head = make_head()
    with capture_tower_taps(head, split) as (cls_taps, reg_taps):
        out = run()
    out[0].head_split = HeadSplit(split, cls_taps, reg_taps, partial(resume_head, head, split))
    return out
