"""The interface every distillation method implements, and its registry.

A method is an ``nn.Module`` (it may own trainable adapter layers) whose ``forward`` reads two
:class:`~kd2.structures.StepRecord` objects — the student's (with gradients) and the teacher's
(computed under ``torch.no_grad()``) — and returns a dict of scalar losses named
``loss_kd_<something>``, already multiplied by their configured weights. Methods never see a
framework object: only the record.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, FrozenSet, Mapping

from fvcore.common.registry import Registry
from torch import Tensor, nn

from kd2.structures import StepRecord

__all__ = ["FAMILIES", "KD_METHOD_REGISTRY", "KDMethod", "MethodCard", "TEACHER_PARTS"]

KD_METHOD_REGISTRY = Registry("KD_METHOD")
KD_METHOD_REGISTRY.__doc__ = (
    """Distillation methods, keyed by the name used in ``cfg.KD.METHODS``."""
)

#: The parts of the teacher a method may ask for. ``features`` = FPN maps, ``dense`` = the
#: one-stage head, ``rpn`` = the RPN head, ``roi`` = the ROI head run on the student's sampled
#: proposals, ``queries`` = a DETR-family decoder's predictions on its matching queries,
#: ``points`` = a DETR-family decoder's answers to distillation points it shares with the
#: student (KD-DETR), ``detections`` = the teacher's inference (boxes, scores, labels) on the
#: student's input.
TEACHER_PARTS = frozenset({"features", "dense", "rpn", "roi", "queries", "points", "detections"})


#: The detector families a method may apply to, and their names in tables.
FAMILIES = {
    "faster_rcnn": "Faster R-CNN",
    "retinanet": "RetinaNet",
    "fcos": "FCOS",
    "gfl": "GFL",
    "ssd": "SSD",
    "detr": "DETR",
}


@dataclass(frozen=True)
class MethodCard:
    """What a method declares once, beside its code: the README's and the docs' methods tables
    are generated from it (``docs/gen_methods_table.py``), and the tests hold it to the code —
    its families to the build-time checks, its terms to what ``forward`` returns. Its config
    node and defaults are declared once too, in ``kd2/config/defaults.py``.

    Attributes:
        title: the method's short name (the README's table).
        summary: one line on what it distils (the docs' table).
        paper: authors, title and venue.
        code: the repository kd2's implementation was checked against, ``owner/name``, marked
            ``(port)`` where it is not the authors' own.
        project: the folder under ``projects/`` with its README, configs and results.
        terms: every ``loss_kd_*`` name its ``forward`` may return.
        families: the student detector families it applies to (keys of :data:`FAMILIES`),
            with a teacher of the same family.
    """

    title: str
    summary: str
    paper: str
    code: str
    project: str
    terms: tuple[str, ...]
    families: tuple[str, ...]

    def __post_init__(self) -> None:
        unknown = sorted(set(self.families) - set(FAMILIES))
        if unknown:
            raise ValueError(f"unknown detector families {unknown}; known: {sorted(FAMILIES)}")
        bad = [t for t in self.terms if not t.startswith("loss_kd_")]
        if bad:
            raise ValueError(f"loss terms must be named loss_kd_*, got {bad}")


class KDMethod(nn.Module):
    """Base class of a distillation method.

    Subclasses set :attr:`teacher_parts` (what they read from the teacher record), implement
    :meth:`forward`, and build themselves in :meth:`from_config` from their own config node
    (``cfg.KD.<NAME>``) plus the geometry of the two detectors.
    """

    #: The method's declaration (:class:`MethodCard`); every registered method has one.
    card: MethodCard | None = None

    #: Teacher parts this method reads; the teacher runs only the union over methods.
    teacher_parts: FrozenSet[str] = frozenset({"features"})

    #: Whether the method's dense-head terms handle a softmax dense head with a background class
    #: (SSD). A method reading the teacher's ``dense`` part is assumed to be written for sigmoid
    #: heads (RetinaNet, FCOS) unless it sets this.
    supports_softmax_dense: bool = False

    #: When set (an int ``k``), both records' ``dense.head_split`` carry the head towers'
    #: features after block ``k`` and the teacher's can resume its head from there (CrossKD).
    head_split: int | None = None

    #: The method's dense-head terms compare class logits only, location by location: a
    #: teacher of another dense family with the same predictions per location qualifies (CWD's
    #: logits recipe). Otherwise a method reading ``dense`` needs a teacher of the student's
    #: family.
    dense_across_families: bool = False

    #: With ``points`` in :attr:`teacher_parts`: the groups of distillation points that the
    #: student's and the teacher's decoders both answer each step (KD-DETR), group name -> count:
    #: ``"teacher"`` the teacher's own selected queries (the count is the teacher's), ``"random"``
    #: that many random boxes, drawn afresh each step.
    point_groups: Mapping[str, int] = {}

    #: the student's detector family, set by :meth:`bind_detector` (``None`` before)
    family: str | None = None

    def unsupported_reason(self, arch: str, dense_softmax: bool) -> str | None:
        """Why this built method cannot apply to the detector, or ``None`` when it can.

        Checked by :class:`kd2.modeling.distiller.DistillerMixin` for every configured method
        when the model is built, before any data pass.

        Args:
            arch: ``"two_stage"`` or ``"one_stage"``.
            dense_softmax: the detector's dense head is a softmax classifier (SSD).
        """
        if dense_softmax and not self.supports_softmax_dense and "dense" in self.teacher_parts:
            from .utils import softmax_dense_reason

            return softmax_dense_reason(type(self).__name__)
        return None

    @classmethod
    def from_config(
        cls,
        node,
        *,
        student_channels: Mapping[int, int],
        teacher_channels: Mapping[int, int],
        num_classes: int,
        arch: str,
    ) -> KDMethod:
        """Build from ``cfg.KD.<NAME>``.

        Args:
            node: the method's ``CfgNode``, every key of the schema present
                (``kd2/config/defaults.py`` is the one place a method's defaults are written;
                the backends pass ``cfg.KD.<NAME>`` of a config built on it).
            student_channels / teacher_channels: FPN channels keyed by stride.
            num_classes: ``K``, identical for teacher and student.
            arch: ``"two_stage"`` or ``"one_stage"``.
        """
        raise NotImplementedError

    def bind_detector(self, family: str) -> None:
        """Called by the distiller right after :meth:`from_config`, before the teacher parts of
        all methods are collected: ``family`` is the student's detector, ``"faster_rcnn"``,
        ``"retinanet"``, ``"fcos"`` or ``"ssd"``. Methods whose published defaults differ per
        detector (levels, weights, which tensors they read) resolve them here (default: keep it
        as :attr:`family`, which :meth:`unsupported_reason` may consult)."""
        self.family = family

    def before_step(self, iteration: int) -> None:
        """Called by both trainers before every training step (default: nothing).

        Methods with periodic work — e.g. refreshing prototypes every epoch — do it here."""

    def forward(self, student: StepRecord, teacher: StepRecord) -> Dict[str, Tensor]:
        raise NotImplementedError
