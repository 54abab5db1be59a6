"""Which student FPN level learns from which teacher level, decided once when the model is built.

Levels are paired **by stride** where both detectors have the stride (a Faster R-CNN P2–P6
teacher and an FCOS P3–P7 student share P3–P6; the student's P7 and the teacher's P2 are not
distilled). When they share no stride at all, they are paired **by index**, finest first, and the
student's map is resized bilinearly to the teacher's before every loss (PKD's rule); the
student's feature record is then keyed by the teacher's strides, so box geometry on the maps
stays consistent. The pairing is logged as a table (:func:`level_table`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Dict, List, Mapping

import torch.nn.functional as F

from kd2.structures import StepRecord

__all__ = [
    "LevelPair",
    "TeacherInfo",
    "detector_parts",
    "foreign_teacher_info",
    "level_table",
    "method_channels",
    "pair_levels",
    "student_view",
]


@dataclass(frozen=True)
class TeacherInfo:
    """What the distiller needs to know about a detector (teacher or student) before any step.

    Attributes:
        channels: FPN channels keyed by stride.
        num_classes: foreground classes ``K`` (``None``: a backbone-only teacher, which has none).
        parts: the record parts it can fill (``features``, ``dense``, ``rpn``, ``roi``).
        family: ``faster_rcnn``, ``retinanet``, ``fcos``, ``gfl`` or ``ssd``.
        anchors_per_location: of its dense head (``None`` without one).
        name: the detector's class, for messages.
    """

    channels: Mapping[int, int]
    num_classes: int | None
    parts: frozenset
    family: str
    anchors_per_location: int | None
    name: str


def detector_parts(family: str) -> frozenset:
    """The record parts a detector of ``family`` fills: two-stage ones an RPN and an ROI head,
    DETR-family ones their decoder's ``queries`` and its answers to distillation ``points`` (and
    their encoder's maps as ``features``), the others a dense head; all their FPN ``features``
    and their ``detections`` (inference)."""
    if family == "faster_rcnn":
        return frozenset({"features", "rpn", "roi", "detections"})
    if family == "detr":
        return frozenset({"features", "queries", "points", "detections"})
    return frozenset({"features", "dense", "detections"})


def foreign_teacher_info(info: TeacherInfo) -> TeacherInfo:
    """A teacher of the other framework: the parts that do not depend on either framework's
    anchor layout — ``features``, and the ROI head of a two-stage teacher (run on the student's
    proposals); not ``dense`` or ``rpn`` (per-anchor)."""
    return replace(
        info,
        parts=frozenset(info.parts) & {"features", "roi", "detections"},
        name=f"{info.name}, other framework",
    )


@dataclass(frozen=True)
class LevelPair:
    student_stride: int
    teacher_stride: int
    student_channels: int
    teacher_channels: int

    @property
    def resized(self) -> bool:
        return self.student_stride != self.teacher_stride


def pair_levels(student: Mapping[int, int], teacher: Mapping[int, int]) -> List[LevelPair]:
    """The level pairs of two FPNs given as ``{stride: channels}`` (see the module docstring)."""
    shared = sorted(set(student) & set(teacher))
    if shared:
        return [LevelPair(s, s, student[s], teacher[s]) for s in shared]
    return [
        LevelPair(s, t, student[s], teacher[t]) for s, t in zip(sorted(student), sorted(teacher))
    ]


def method_channels(pairs: List[LevelPair]) -> tuple[Dict[int, int], Dict[int, int]]:
    """``(student, teacher)`` channels keyed by the stride the methods see (the teacher's)."""
    return (
        {p.teacher_stride: p.student_channels for p in pairs},
        {p.teacher_stride: p.teacher_channels for p in pairs},
    )


def level_table(
    pairs: List[LevelPair],
    student: Mapping[int, int],
    teacher: Mapping[int, int],
    title: str,
) -> str:
    """A readable table: every student level, its teacher level (or "not distilled"), the
    channels and how the widths are bridged."""
    by_student = {p.student_stride: p for p in pairs}
    paired_teacher = {p.teacher_stride for p in pairs}
    rows = [title, f"  {'student level':<16}{'teacher level':<16}{'channels':<12}pairing"]
    for s in sorted(student):
        p = by_student.get(s)
        if p is None:
            rows.append(f"  {f'stride {s}':<16}{'—':<16}{student[s]:<12}not distilled")
            continue
        how = "by index, student resized" if p.resized else "same stride"
        width = "adapter per method" if p.student_channels != p.teacher_channels else "equal widths"
        chans = f"{p.student_channels}->{p.teacher_channels}"
        rows.append(
            f"  {f'stride {s}':<16}{f'stride {p.teacher_stride}':<16}{chans:<12}{how}, {width}"
        )
    unused = sorted(set(teacher) - paired_teacher)
    if unused:
        rows.append(f"  teacher levels not used: strides {unused}")
    return "\n".join(rows)


def student_view(student: StepRecord, pairs: List[LevelPair], teacher: StepRecord) -> StepRecord:
    """The student record as the methods of this teacher see it: unchanged when every pair has
    one stride; else its features re-keyed by the teacher's strides, each map resized bilinearly
    to the teacher map's size (the graph is kept)."""
    if not any(p.resized for p in pairs):
        return student
    features = {}
    for p in pairs:
        s_map = student.features[p.student_stride]
        t_map = teacher.features.get(p.teacher_stride)
        size = tuple(t_map.shape[-2:]) if t_map is not None else tuple(s_map.shape[-2:])
        if tuple(s_map.shape[-2:]) != size:
            s_map = F.interpolate(s_map, size=size, mode="bilinear", align_corners=False)
        features[p.teacher_stride] = s_map
    return replace(student, features=features)
