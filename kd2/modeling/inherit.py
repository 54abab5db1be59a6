"""Teacher-initialised students (``KD.INHERIT_TEACHER``): FGD's and MGD's "inheriting strategy".

The released FGD and MGD rows for same-family pairs start the student's neck and head from the
teacher's checkpoint (``init_student=True``: everything except the backbone). kd2 offers it for
any part on both backends: every student tensor (parameters and buffers) of the named parts whose
name and shape match a teacher tensor is copied; every other one is skipped. Each tensor copied or
skipped is logged, and a part that copies nothing is an error (its names or shapes all differ,
e.g. a narrower student FPN): the run would otherwise silently train without the initialisation
its recipe assumes.

Parts: ``"backbone"`` (torchvision ``backbone.body``, Detectron2 ``backbone.bottom_up``),
``"neck"`` (the rest of ``backbone.*``: the FPN and its extra levels), ``"head"`` (everything
outside ``backbone.*``: the dense head, or the RPN and ROI heads), or any literal state-dict
name prefix such as ``"roi_heads.box_predictor"``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

__all__ = ["INHERIT_PARTS", "inherit_teacher_weights", "part_of"]

logger = logging.getLogger(__name__)

INHERIT_PARTS = ("backbone", "neck", "head")
_BACKBONE_BODY = ("backbone.body.", "backbone.bottom_up.")


def part_of(name: str, part: str) -> bool:
    """Whether the state-dict entry ``name`` belongs to ``part`` (a part name or a prefix)."""
    if part == "backbone":
        return name.startswith(_BACKBONE_BODY)
    if part == "neck":
        return name.startswith("backbone.") and not name.startswith(_BACKBONE_BODY)
    if part == "head":
        return not name.startswith("backbone.")
    return name == part or name.startswith(part.rstrip(".") + ".")


@torch.no_grad()
def inherit_teacher_weights(
    student_state: Mapping[str, Tensor],
    teacher_state: Mapping[str, Tensor],
    parts: Sequence[str],
) -> dict[str, list]:
    """Copy the teacher's tensors into the student's, in place, for ``parts``.

    Args:
        student_state: the student's state dict (the student alone, no KD adapters); its tensors
            are the module's own (``state_dict(keep_vars=True)`` or ``state_dict()``, which
            share storage), so ``copy_`` initialises the module.
        teacher_state: the teacher's state dict.
        parts: part names (:data:`INHERIT_PARTS`) or state-dict name prefixes.

    Returns:
        ``{"copied": [name, ...], "skipped": [(name, reason), ...]}``.

    Raises:
        ValueError: no parts, or a part that matches no student tensor or copies none.
    """
    if not parts:
        raise ValueError("inherit_teacher_weights needs at least one part")
    copied: list[str] = []
    skipped: list[tuple[str, str]] = []
    for part in parts:
        names = [n for n in student_state if part_of(n, part)]
        if not names:
            raise ValueError(
                f"KD.INHERIT_TEACHER part {part!r} matches no tensor of the student; use one of "
                f"{list(INHERIT_PARTS)} or a state-dict name prefix (e.g. "
                f"{sorted(student_state)[0]!r})"
            )
        part_copied = 0
        for name in names:
            if name in copied:
                continue
            dst = student_state[name]
            src = teacher_state.get(name)
            if src is None:
                skipped.append((name, "not in the teacher"))
            elif src.shape != dst.shape:
                skipped.append(
                    (name, f"shape {tuple(dst.shape)} vs the teacher's {tuple(src.shape)}")
                )
            else:
                dst.copy_(src.to(device=dst.device, dtype=dst.dtype))
                copied.append(name)
                part_copied += 1
        if part_copied == 0:
            reasons = "; ".join(f"{n}: {r}" for n, r in skipped[-3:])
            raise ValueError(
                f"KD.INHERIT_TEACHER part {part!r}: no student tensor matches the teacher's in "
                f"name and shape ({reasons}). Inheritance needs a teacher of the same "
                "architecture for that part (e.g. the same FPN width); remove the part otherwise"
            )
    for name in copied:
        logger.info("KD.INHERIT_TEACHER: copied %s %s", name, tuple(student_state[name].shape))
    for name, reason in skipped:
        logger.info("KD.INHERIT_TEACHER: skipped %s (%s)", name, reason)
    logger.info(
        "KD.INHERIT_TEACHER %s: copied %d tensors (%d values) from the teacher, skipped %d",
        list(parts),
        len(copied),
        sum(student_state[n].numel() for n in copied),
        len(skipped),
    )
    return {"copied": copied, "skipped": skipped}
