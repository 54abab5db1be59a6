"""The backend-independent half of every distillation meta-architecture.

A backend's meta-architecture *is* the student (it subclasses the framework's detector) and mixes
in :class:`DistillerMixin`, which holds the frozen teacher **outside** the module tree — not in
``state_dict()``, ``parameters()``, the optimizer or DDP; ``.train()`` never switches it out of
eval mode and ``.to()`` moves it along — builds the configured methods of ``cfg.KD`` and turns two
records into the ``loss_kd_*`` terms. The backend only translates its framework into
:mod:`kd2.structures` records.

A run may need no detector teacher at all (``ClassifierKD`` alone reads only the student's
record): :func:`needs_detector_teacher` tells the backends whether to build one. Methods that
want a classifier teacher (``needs_classifier_teacher``) get it attached here, built for the
detector's input normalisation and held outside the module tree like the detector teacher.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Callable, Dict, FrozenSet, List, Mapping, Tuple

import torch
from torch import Tensor, nn

from kd2.config import get_cfg, method_node_name
from kd2.losses import KD_METHOD_REGISTRY
from kd2.structures import StepRecord
from kd2.utils.errors import ConfigError

from .backends import backend_of, input_convention
from .cross_framework import to_teacher_input
from .level_map import (
    LevelPair,
    TeacherInfo,
    foreign_teacher_info,
    level_table,
    method_channels,
    pair_levels,
    student_view,
)
from .teacher_cache import (
    CACHE_KEY,
    HEAD_FIELDS,
    HEAD_PARTS,
    head_from_tensors,
    require_cacheable,
)

__all__ = ["DistillerMixin", "model_family", "needs_detector_teacher", "teachers_needed"]

logger = logging.getLogger(__name__)

#: RGB in ``[0, 1]``: the images every backend's ``detect`` reads
RAW_RGB = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0), "RGB", 1.0)


def needs_detector_teacher(kd_cfg) -> bool:
    """Whether any method of ``kd_cfg.METHODS`` learns from ``KD.TEACHER`` (the default
    detector teacher)."""
    return "" in teachers_needed(kd_cfg)


def _method_teacher_name(kd_cfg, name: str) -> str:
    node = getattr(kd_cfg, method_node_name(name), None)
    value = getattr(node, "TEACHER", "") if node is not None else ""
    return value if isinstance(value, str) else ""


def teachers_needed(kd_cfg) -> set:
    """The names of the detector teachers the methods of ``kd_cfg.METHODS`` learn from (``""`` =
    ``KD.TEACHER``; others name ``KD.TEACHERS`` entries). A method reads a detector teacher when
    its class declares teacher parts (ClassifierKD declares none)."""
    return {
        _method_teacher_name(kd_cfg, name)
        for name in kd_cfg.METHODS
        if KD_METHOD_REGISTRY.get(name).teacher_parts
    }


def model_family(model: nn.Module) -> str:
    """``faster_rcnn``, ``ssd``, ``gfl``, ``fcos``, ``retinanet`` or ``detr``: a detector's family
    from its classes (any framework)."""
    names = [c.__name__ for c in type(model).__mro__]
    for family, keys in (
        ("faster_rcnn", ("GeneralizedRCNN", "FasterRCNN")),
        ("ssd", ("SSD",)),
        ("gfl", ("GFL",)),
        ("fcos", ("FCOS",)),
        ("retinanet", ("RetinaNet",)),
        ("detr", ("HFDetector",)),
    ):
        if any(k in names for k in keys):
            return family
    raise ValueError(f"{type(model).__name__} is not a detector kd2 knows")


_PART_WORDS = {
    "features": "backbone + FPN",
    "dense": "one-stage dense head",
    "rpn": "RPN",
    "roi": "ROI box head",
    "queries": "DETR decoder queries",
    "detections": "detections",
}


def _what_and_fix(message: str) -> tuple[str, str]:
    """Split a refusal into what is wrong and how to fix it: the fix is the message's last
    sentence when it says what to do (``Use ...``), else the methods
    table."""
    for marker in (". Use ", ". For ", "; use "):
        at = message.rfind(marker)
        if at > 0:
            return message[:at], message[at + 2 :].strip()
    return message, "choose a method that applies to this pair (README, 'Methods')"


def _teacher_label(tname: str) -> str:
    return f"teacher KD.TEACHERS.{tname}" if tname else "the teacher (KD.TEACHER)"


def _applicable_methods(
    info: TeacherInfo, student: TeacherInfo, arch: str, dense_softmax: bool, num_classes: int
) -> List[str]:
    """The registered methods that, at their default settings, apply to ``student`` and can
    learn from the teacher ``info`` (the same checks as a configured method)."""
    defaults = get_cfg().KD
    out = []
    for name, cls in sorted(KD_METHOD_REGISTRY):
        try:
            method = cls.from_config(
                getattr(defaults, method_node_name(name), None),
                student_channels=dict(student.channels),
                teacher_channels=dict(info.channels),
                num_classes=num_classes,
                arch=arch,
            )
        except (ValueError, KeyError):  # it needs settings of its own (ClassifierKD's teacher)
            continue
        method.bind_detector(student.family)
        if not method.teacher_parts or method.unsupported_reason(arch, dense_softmax):
            continue
        if _teacher_mismatch(method, info, student) is None:
            out.append(name)
    return out


def _teacher_mismatch(method, info: TeacherInfo, student: TeacherInfo) -> str | None:
    """Why ``method`` cannot learn from the teacher described by ``info``, or ``None``."""
    missing = sorted(set(method.teacher_parts) - set(info.parts))
    if missing:
        what = ", ".join(f"{p} ({_PART_WORDS.get(p, p)})" for p in missing)
        return f"it reads the teacher's {what}, which a {info.family} teacher does not have"
    cross_ok = method.dense_across_families and info.family != "ssd" and student.family != "ssd"
    if "dense" in method.teacher_parts and info.family != student.family and not cross_ok:
        return (
            f"it compares the two dense heads prediction by prediction, which needs a teacher of "
            f"the student's family ({student.family}), not {info.family}"
        )
    if (
        "dense" in method.teacher_parts
        and info.anchors_per_location != student.anchors_per_location
    ):
        return (
            f"its dense head places {info.anchors_per_location} predictions per location, the "
            f"student's {student.anchors_per_location}; use the same anchors"
        )
    return None


class DistillerMixin:
    """Mix into an ``nn.Module`` subclass of a framework detector (listed before it)."""

    #: ``"two_stage"`` or ``"one_stage"``; set by the backend class.
    arch_kind: str = "one_stage"
    #: The dense head is a softmax classifier with a background class (SSD); set by the backend.
    dense_softmax: bool = False
    #: The student's backend (:mod:`kd2.modeling.backends`); set by the backend class.
    kd_backend: str = ""

    def _init_distiller(
        self,
        kd_cfg,
        teacher: nn.Module | None,
        *,
        num_classes: int,
        student_channels: Mapping[int, int],
        teacher_num_classes: int | None = None,
        teacher_channels: Mapping[int, int] | None = None,
        extra_teachers: Mapping[str, nn.Module] | None = None,
    ) -> None:
        """Attach the teachers (frozen, eval, unregistered) and build ``kd_cfg.METHODS``.

        ``teacher`` is ``KD.TEACHER`` (``None`` when no method learns from it:
        :func:`teachers_needed`), ``extra_teachers`` the used ones of ``KD.TEACHERS`` by name.
        ``student_channels`` maps FPN stride -> channels; the teachers' geometry comes from
        :meth:`_kd_model_info` (``teacher_num_classes`` / ``teacher_channels`` are not needed).
        A classifier teacher (:class:`kd2.modeling.classifier_teacher.ClassifierTeacher`) reads
        the student's input in its backend's input convention. The backend provides
        :meth:`_kd_own_model_info`.

        Each method learns from the teacher its ``KD.<METHOD>.TEACHER`` names; its FPN levels
        are paired with that teacher's by :func:`kd2.modeling.level_map.pair_levels` (logged as
        a table), and a method that reads a part the teacher lacks — or a dense head of another
        family — is refused here with the methods that do apply.
        """
        object.__setattr__(self, "_classifier_teachers", [])
        student_info, infos = self._kd_attach_teachers(kd_cfg, teacher, extra_teachers, num_classes)
        self.num_classes_kd = num_classes
        self.kd_warmup_iters = kd_cfg.WARMUP_ITERS
        self.kd_iteration = 0
        self._kd_pair_levels(student_info, infos)
        #: the teacher name (``""`` = KD.TEACHER) each method learns from
        self.kd_method_teacher: Dict[str, str] = {}
        methods = {}
        for name in kd_cfg.METHODS:
            methods[name] = self._kd_build_method(
                name,
                kd_cfg,
                infos,
                student_info,
                student_channels=student_channels,
                teacher_channels=teacher_channels,
                num_classes=num_classes,
            )
        for method in methods.values():
            if getattr(method, "needs_classifier_teacher", False):
                method.attach_classifier(self._build_classifier_teacher(method))
        self.kd_methods = nn.ModuleDict(methods)
        self._kd_split_head(kd_cfg, methods)
        #: per teacher name, the record parts its methods read (each teacher runs only those)
        self.kd_teacher_parts: Dict[str, FrozenSet[str]] = {
            tname: frozenset().union(
                *(m.teacher_parts for n, m in methods.items() if self.kd_method_teacher[n] == tname)
            )
            for tname in infos
        }
        #: the parts of KD.TEACHER's methods (the default teacher)
        self.teacher_parts: FrozenSet[str] = self.kd_teacher_parts.get("", frozenset())
        self._init_kd_control(kd_cfg)
        self._kd_inherit_teacher_weights(kd_cfg, teacher)

    def _kd_attach_teachers(
        self,
        kd_cfg,
        teacher: nn.Module | None,
        extra_teachers: Mapping[str, nn.Module] | None,
        num_classes: int,
    ) -> Tuple[TeacherInfo, Dict[str, TeacherInfo]]:
        """Freeze the teachers, check their classes and keep them out of the submodules; returns
        the student's description and each teacher's, by name."""
        teachers = {"": teacher} if teacher is not None else {}
        teachers.update(extra_teachers or {})
        used = teachers_needed(kd_cfg)
        if "" in used and teacher is None:
            raise ConfigError(
                f"KD.METHODS {list(kd_cfg.METHODS)} need a detector teacher",
                "set KD.TEACHER.CONFIG and KD.TEACHER.WEIGHTS",
            )
        student_info = self._kd_model_info(self)
        infos: Dict[str, TeacherInfo] = {}
        for tname, model in teachers.items():
            info = self._kd_model_info(model)
            label = _teacher_label(tname)
            if info.num_classes is not None and info.num_classes != num_classes:
                raise ConfigError(
                    f"{label} and the student disagree on the number of classes: the teacher "
                    f"has {info.num_classes}, the student {num_classes}; distillation needs the "
                    "same label space",
                    "fix the NUM_CLASSES of one of the configs",
                )
            model.eval().requires_grad_(False)
            infos[tname] = info
        object.__setattr__(self, "_teacher", teacher)  # deliberately not a submodule
        object.__setattr__(self, "_extra_teachers", dict(extra_teachers or {}))
        #: per teacher name, its description (FPN channels by stride, parts, family)
        self.kd_teacher_infos: Dict[str, TeacherInfo] = infos
        return student_info, infos

    def _kd_pair_levels(self, student_info: TeacherInfo, infos: Dict[str, TeacherInfo]) -> None:
        """Pair the student's FPN levels with each teacher's; log each pairing as a table."""
        #: per teacher name, the student <-> teacher level pairs and their logged table
        self.kd_level_pairs: Dict[str, List[LevelPair]] = {}
        self.kd_level_tables: Dict[str, str] = {}
        for tname, info in infos.items():
            pairs = pair_levels(student_info.channels, info.channels)
            self.kd_level_pairs[tname] = pairs
            self.kd_level_tables[tname] = level_table(
                pairs,
                student_info.channels,
                info.channels,
                f"KD level pairing, {_teacher_label(tname)} ({info.name}) -> student "
                f"({student_info.name}):",
            )
            logger.info(self.kd_level_tables[tname])

    def _kd_build_method(
        self,
        name: str,
        kd_cfg,
        infos: Dict[str, TeacherInfo],
        student_info: TeacherInfo,
        *,
        student_channels: Mapping[int, int],
        teacher_channels: Mapping[int, int] | None,
        num_classes: int,
    ):
        """Build the method ``name`` from ``KD.<NAME>`` on the levels its teacher pairs; refuse
        it (with the methods that do apply) when it cannot apply to this student or teacher."""
        node = getattr(kd_cfg, method_node_name(name), None)
        tname = str(getattr(node, "TEACHER", "") or "") if node is not None else ""
        if isinstance(getattr(node, "TEACHER", None), dict):  # ClassifierKD's own node
            tname = ""
        if tname and tname not in infos:
            raise ConfigError(
                f"KD.{method_node_name(name)}.TEACHER {tname!r} names no teacher",
                f"use one that KD.TEACHERS defines: {sorted(n for n in infos if n)}",
            )
        self.kd_method_teacher[name] = tname
        s_ch, t_ch = dict(student_channels), dict(teacher_channels or {})
        if tname in infos:
            pairs = self.kd_level_pairs[tname]
            s_ch, t_ch = dict(student_info.channels), dict(infos[tname].channels)
            if any(p.resized for p in pairs):
                s_ch, t_ch = method_channels(pairs)
        method = KD_METHOD_REGISTRY.get(name).from_config(
            node,
            student_channels=s_ch,
            teacher_channels=t_ch,
            num_classes=num_classes,
            arch=self.arch_kind,
        )
        method.bind_detector(student_info.family)
        reason = method.unsupported_reason(self.arch_kind, self.dense_softmax)
        if reason:
            raise ConfigError(
                *_what_and_fix(
                    f"KD method {name!r} (KD.METHODS) does not apply to the "
                    f"{self._detector_name()} student: {reason}"
                )
            )
        if method.teacher_parts and tname in infos:
            reason = _teacher_mismatch(method, infos[tname], student_info)
            if reason:
                applicable = _applicable_methods(
                    infos[tname], student_info, self.arch_kind, self.dense_softmax, num_classes
                )
                raise ConfigError(
                    f"KD method {name!r} cannot learn from {_teacher_label(tname)} "
                    f"({infos[tname].name}): {reason}",
                    "with this teacher these methods apply: " + ", ".join(applicable),
                )
        return method

    def _kd_split_head(self, kd_cfg, methods) -> None:
        """Where the dense head's towers are cut (CrossKD): one place per step."""
        splits = {m.head_split for m in methods.values() if m.head_split is not None}
        if len(splits) > 1:
            raise ConfigError(
                f"KD.METHODS {list(kd_cfg.METHODS)} ask to cut the dense head at different "
                f"blocks {sorted(splits)}; the head is cut at one place per step",
                "give these methods the same split (e.g. KD.CROSSKD.SPLIT) or drop one",
            )
        #: the dense head's towers are cut after this many blocks (CrossKD), else ``None``
        self.kd_head_split: int | None = splits.pop() if splits else None

    def _kd_inherit_teacher_weights(self, kd_cfg, teacher: nn.Module | None) -> None:
        """``KD.INHERIT_TEACHER``: copy the named teacher modules' weights into the student."""
        inherit = list(getattr(kd_cfg, "INHERIT_TEACHER", []) or [])
        if not inherit:
            return
        if teacher is None:
            raise ConfigError(
                f"KD.INHERIT_TEACHER {inherit} copies weights from a detector teacher, but "
                f"KD.METHODS {list(kd_cfg.METHODS)} build none",
                "add a method that reads a detector teacher, or unset KD.INHERIT_TEACHER",
            )
        from kd2.modeling.inherit import inherit_teacher_weights

        inherit_teacher_weights(self.student_state_dict(), teacher.state_dict(), inherit)

    def _detector_name(self) -> str:
        """The framework detector this student subclasses (``SSD``, ``RetinaNet``, ...)."""
        for cls in type(self).__mro__:
            if issubclass(cls, nn.Module) and not issubclass(cls, DistillerMixin):
                return cls.__name__
        return type(self).__name__

    def _init_kd_control(self, kd_cfg) -> None:
        """Diagnostics (``KD.DIAG``) and the gradient-share controller (``KD.BALANCE``)."""
        diag = getattr(kd_cfg, "DIAG", None)
        self.kd_diag_period = int(getattr(diag, "PERIOD", 0) or 0)
        self.kd_diag_last: Dict[str, float] = {}
        self.kd_term_owner: Dict[str, str] = {}  # loss_kd_* term -> its method (KD.METHODS)
        balance = getattr(kd_cfg, "BALANCE", None)
        mode = str(getattr(balance, "MODE", "none")).lower()
        if mode not in ("none", "grad_share"):
            raise ConfigError(
                f"KD.BALANCE.MODE {mode!r} is not a mode", "use 'none' or 'grad_share'"
            )
        self.kd_balance = None
        self.kd_calibrate_first_step = False
        #: the terms at the methods' own weights (no warm-up factor, no multiplier), kept only
        #: on the step that calibrates the controller (:meth:`kd_calibrate`)
        self._kd_own_terms: Dict[str, Tensor] = {}
        if mode == "grad_share":
            from kd2.modeling.balance import GradShareBalancer

            self.kd_balance = GradShareBalancer(
                balance.LOW,
                balance.HIGH,
                balance.PERIOD,
                balance.WARMUP,
                target=str(getattr(balance, "TARGET", "middle")).lower(),
            )
            self.kd_calibrate_first_step = bool(getattr(balance, "CALIBRATE", True))

    def _detector_family(self) -> str:
        """``"faster_rcnn"`` (any two-stage), ``"ssd"``, ``"gfl"``, ``"fcos"`` or ``"retinanet"``:
        the key of the methods' per-detector defaults (:func:`model_family`)."""
        return model_family(self)

    def _build_classifier_teacher(self, method) -> nn.Module:
        from kd2.modeling.classifier_teacher import build_classifier_teacher

        mean, std, channels, scale = input_convention(self)
        clf = build_classifier_teacher(
            method.teacher_weights, pixel_mean=mean, pixel_std=std, channels=channels, scale=scale
        )
        self._classifier_teachers.append(clf)
        return clf

    @property
    def teacher(self) -> nn.Module | None:
        """The frozen detector teacher (``None`` when no method reads one)."""
        return self._teacher

    def _frozen_teachers(self):
        if "_teacher" not in self.__dict__:  # not yet attached while the student is being built
            return []
        teachers = [self._teacher] if self._teacher is not None else []
        teachers += list(self.__dict__.get("_extra_teachers", {}).values())
        return teachers + list(self._classifier_teachers)

    def train(self, mode: bool = True):
        super().train(mode)
        for t in self._frozen_teachers():
            t.eval()
        return self

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        for t in self._frozen_teachers():
            t._apply(fn, *args, **kwargs)
        return self

    def student_state_dict(self) -> Dict[str, Tensor]:
        """The student alone: loads into a plain detector of the student's architecture."""
        return {
            k: v
            for k, v in self.state_dict().items()
            if not k.startswith(("kd_methods.", "kd_balance."))
        }

    def kd_before_step(self, iteration: int) -> None:
        """Called by the trainers before each step: records the iteration (KD warm-up) and runs
        every method's :meth:`~kd2.losses.KDMethod.before_step` (periodic work)."""
        self.kd_iteration = iteration
        for method in self.kd_methods.values():
            method.before_step(iteration)

    def kd_warmup_factor(self) -> float:
        """``min(1, iteration / KD.WARMUP_ITERS)`` (1 without warm-up)."""
        if self.kd_warmup_iters <= 0:
            return 1.0
        return min(1.0, self.kd_iteration / self.kd_warmup_iters)

    def teacher_named(self, name: str) -> nn.Module | None:
        """The teacher a method names (``""`` = KD.TEACHER)."""
        return self._teacher if name == "" else self.__dict__.get("_extra_teachers", {}).get(name)

    @property
    def extra_teachers(self) -> Dict[str, nn.Module]:
        """The teachers of ``KD.TEACHERS`` that some method learns from, by name."""
        return dict(self.__dict__.get("_extra_teachers", {}))

    def kd_is_foreign(self, model: nn.Module) -> bool:
        """``model`` is a detector of another framework than the student's."""
        return backend_of(model).name != self.kd_backend

    def _kd_model_info(self, model: nn.Module) -> TeacherInfo:
        """A detector's description (channels, classes, parts, family): the student's backend
        describes its own detectors (:meth:`_kd_own_model_info`), a teacher of another framework
        is described by its backend and offers only the parts that cross frameworks."""
        backend = backend_of(model)
        if backend.name != self.kd_backend:
            return foreign_teacher_info(backend.model_info(model))
        return self._kd_own_model_info(model)

    #: how the student's batch is made (the pre-flight check's line on the teacher's input)
    kd_batch_words: str = "resized, padded batch"

    def kd_input_checks(self) -> list:
        """``(ok, line)`` pairs for the pre-flight check: the classes, and how the teacher's input
        is made from the student's batch."""
        s_conv, t_conv = input_convention(self), input_convention(self._teacher)
        how = (
            "the same normalised tensor"
            if s_conv == t_conv
            else f"the student's tensor converted from (mean, std, channels, scale) {s_conv} to "
            f"{t_conv}"
        )
        t_classes = self.kd_teacher_infos[""].num_classes
        return [
            (
                True,
                f"classes: teacher {t_classes}, student {self.num_classes_kd}"
                if t_classes is not None
                else f"classes: none (a backbone-only teacher), student {self.num_classes_kd}",
            ),
            (True, f"the teacher reads the student's {self.kd_batch_words} as {how}"),
        ]

    def kd_publish_scalars(self, stats: Dict[str, float]) -> None:
        """Hand the diagnostics of a step to the backend's trainer (Detectron2's event storage);
        kd2's own trainer reads :attr:`kd_diag_last` instead."""

    def _kd_own_model_info(self, model: nn.Module) -> TeacherInfo:
        """The student backend's description of one of its detectors (the student included)."""
        raise NotImplementedError

    def _kd_foreign_teacher_record(
        self, teacher: nn.Module, student: StepRecord, name: str
    ) -> StepRecord | None:
        """The record of teacher ``name`` when it is another framework's detector (``None``
        when it is of the student's): its backend runs the parts its methods read on the
        student's padded batch, converted to the teacher's input convention and padded to its
        size divisibility, so the record is in the student's coordinates."""
        backend = backend_of(teacher)
        if backend.name == self.kd_backend:
            return None
        images = to_teacher_input(
            student.images,
            input_convention(self),
            backend.input_convention(teacher),
            backend.size_divisibility(teacher),
        )
        parts = self.kd_teacher_parts.get(name, frozenset())
        strides = sorted(self.kd_teacher_infos[name].channels)
        return backend.teacher_record(teacher, images, student, parts, strides)

    def teacher_step(self, student: StepRecord) -> StepRecord:
        """KD.TEACHER's record of this step (only the parts its methods read)."""
        return self.teacher_records(student, [""])[""]

    def teacher_records(
        self, student: StepRecord, names: List[str] | None = None
    ) -> Dict[str, StepRecord]:
        """Every teacher's record of this step, by name (``""`` = KD.TEACHER), each teacher of the
        student's framework run by :meth:`_kd_own_teacher_record`."""
        return self.kd_teacher_records(student, self._kd_own_teacher_record, names)

    def _kd_own_teacher_record(
        self, teacher: nn.Module, student: StepRecord, parts: FrozenSet[str], strides: List[int]
    ) -> StepRecord:
        """The record of a teacher of the student's framework: the ``parts`` its methods read
        on the student's batch (the backend's code)."""
        raise NotImplementedError

    def kd_training_forward(self, images, targets) -> Dict[str, Tensor]:
        """The training forward of a backend whose detectors take ``(images, targets)``
        (torchvision's interface: kd2's torchvision and transformers students): the student's
        record and losses (``student_step``), every teacher's record without gradients, the
        ``loss_kd_*`` terms, then :meth:`finalize_kd_losses`."""
        if targets is None:
            raise ValueError("in training mode, targets must be given")
        keys = [t.get(CACHE_KEY) for t in targets]
        if any(k is not None for k in keys):  # the trainer's cache keys: not the framework's
            targets = [{k: v for k, v in t.items() if k != CACHE_KEY} for t in targets]
        student, losses = self.student_step(images, targets)
        if self.kd_cache is not None and all(k is not None for k in keys):
            student.extras[CACHE_KEY] = keys
        with torch.no_grad():
            teachers = self.teacher_records(student)
        self._kd_answer_points(student, teachers)
        losses.update(self.distill_losses(student, teachers))
        return self.finalize_kd_losses(losses)

    @property
    def kd_cache(self):
        """The teacher cache KD.TEACHER reads (:class:`kd2.modeling.teacher_cache.TeacherCache`),
        or ``None``."""
        return self.__dict__.get("_kd_cache")

    def kd_attach_cache(self, cache) -> None:
        """Read KD.TEACHER's record from ``cache`` instead of running it, for every batch the
        cache holds exactly (:meth:`~kd2.modeling.teacher_cache.TeacherCache.lookup`); refused
        when KD.TEACHER's methods read a part the cache does not store."""
        require_cacheable(self.kd_teacher_parts.get("", frozenset()), self.kd_head_split)
        object.__setattr__(self, "_kd_cache", cache)
        # a head's anchors, strides and box coder per padded size, from a live step (not stored)
        object.__setattr__(self, "_kd_head_templates", {})

    def _kd_cached_record(self, student: StepRecord) -> StepRecord | None:
        """KD.TEACHER's record of this batch read from the cache, or ``None`` (no cache, a batch
        the cache does not hold exactly, or the first batch of its padded size when a head is
        cached: the teacher then runs live, and gives the head's geometry for the next ones)."""
        keys = student.extras.get(CACHE_KEY)
        if self.kd_cache is None or keys is None:
            return None
        padded = tuple(student.images.shape[-2:])
        heads = self._kd_cached_heads()
        templates = self.__dict__["_kd_head_templates"].get(padded)
        if heads and templates is None:
            self.kd_cache.misses += 1
            return None
        got = self.kd_cache.lookup(keys, student.image_sizes, padded, student.images.device)
        if got is None:
            return None
        rec = student.teacher_view()
        rec.features, tensors = got
        for part in heads:
            setattr(rec, part, head_from_tensors(templates[part], part, tensors))
        return rec

    def _kd_cached_heads(self) -> set:
        """The head parts (``dense``, ``rpn``) KD.TEACHER's methods read, which a cache serves
        with the geometry of a live step."""
        return set(self.kd_teacher_parts.get("", frozenset())) & set(HEAD_PARTS)

    def _kd_remember_heads(self, student: StepRecord, rec: StepRecord) -> None:
        """Keep a live KD.TEACHER record's head geometry for the cached batches of its size."""
        if self.kd_cache is None:
            return
        heads = self._kd_cached_heads()
        if heads:
            templates = self.__dict__["_kd_head_templates"]
            geometry = {  # the per-image outputs dropped: the cache holds them
                p: dataclasses.replace(getattr(rec, p), **dict.fromkeys(HEAD_FIELDS)) for p in heads
            }
            templates.setdefault(tuple(student.images.shape[-2:]), geometry)

    def _kd_answer_points(self, student: StepRecord, teachers: Dict[str, StepRecord]) -> None:
        """Fill both records' answers to the step's distillation points (``points``, KD-DETR):
        a DETR-family backend's code, after the teachers' records (the points include the
        teacher's queries) and with gradients on for the student's answers."""

    def kd_teacher_records(
        self,
        student: StepRecord,
        own_record: Callable[[nn.Module, StepRecord, FrozenSet[str], List[int]], StepRecord],
        names: List[str] | None = None,
    ) -> Dict[str, StepRecord]:
        """The record of every teacher (``names``: all of them, ``""`` = KD.TEACHER), each
        running only the parts its methods read: a teacher without such parts records nothing
        (:meth:`~kd2.structures.StepRecord.teacher_view`), one of another framework is run by
        its backend (:meth:`_kd_foreign_teacher_record`), one of the student's by
        ``own_record(teacher, student, parts, strides)``, the backend's code."""
        out = {}
        for name in ["", *self.extra_teachers] if names is None else names:
            t, parts = self.teacher_named(name), self.kd_teacher_parts.get(name, frozenset())
            rec = self._kd_cached_record(student) if name == "" else None
            if rec is None and t is not None and parts - {"detections"}:
                rec = self._kd_foreign_teacher_record(t, student, name)
                if rec is None:
                    strides = sorted(self.kd_teacher_infos[name].channels)
                    rec = own_record(t, student, parts, strides)
                if name == "":
                    self._kd_remember_heads(student, rec)
            rec = rec if rec is not None else student.teacher_view()
            if t is not None and "detections" in parts:
                rec.detections = self._kd_teacher_detections(t, student)
            out[name] = rec
        return out

    def _kd_teacher_detections(self, teacher: nn.Module, student: StepRecord) -> list:
        """The teacher's inference on the student's input (RGB ``[0, 1]``, each image's valid
        region): its detections in the student's input pixels."""
        detect = backend_of(teacher).detect
        raw = to_teacher_input(student.images, input_convention(self), RAW_RGB)
        images = [raw[i, :, :h, :w] for i, (h, w) in enumerate(student.image_sizes)]
        return detect(teacher, images)

    def distill_losses(
        self, student: StepRecord, teacher: StepRecord | Dict[str, StepRecord]
    ) -> Dict[str, Tensor]:
        """Every configured method's losses, each on the student record and its own teacher's
        (``teacher``: the records by teacher name, ``""`` = KD.TEACHER, or KD.TEACHER's record
        alone), times the warm-up factor."""
        teachers = teacher if isinstance(teacher, dict) else {"": teacher}
        views: Dict[str, StepRecord] = {}
        factor = self.kd_warmup_factor()
        balance = self.kd_balance
        calibrating = self.kd_calibration_due()
        self._kd_own_terms = {}
        losses: Dict[str, Tensor] = {}
        for method_name, method in self.kd_methods.items():
            tname = self.kd_method_teacher.get(method_name, "")
            t_rec = teachers.get(tname, teachers.get(""))
            if tname not in views:
                pairs = self.kd_level_pairs.get(tname, [])
                views[tname] = student_view(student, pairs, t_rec) if t_rec is not None else student
            for name, value in method(views[tname], t_rec).items():
                self.kd_term_owner[name] = method_name
                m = balance.multiplier(name) if balance is not None else 1.0
                losses[name] = value * (factor * m)
                if calibrating:
                    self._kd_own_terms[name] = value
        return losses

    def kd_calibration_due(self) -> bool:
        """Whether this training step calibrates the ``KD.BALANCE`` controller: the first step
        (iteration 0) of a fresh run with ``KD.BALANCE.CALIBRATE``. A resumed run restores the
        multiplier (and the calibrated flag) from its checkpoint instead."""
        balance = self.kd_balance
        return (
            self.training
            and balance is not None
            and self.kd_calibrate_first_step
            and not balance.calibrated
            and self.kd_iteration == 0
        )

    def kd_diagnostics_due(self) -> bool:
        """Whether this training step measures the gradient diagnostics: every
        ``KD.DIAG.PERIOD`` iterations, or, under ``KD.BALANCE`` from its ``WARMUP`` on, at the
        controller's updates (every ``KD.BALANCE.PERIOD``) and only then."""
        balance = self.kd_balance
        if balance is not None and self.kd_iteration >= balance.warmup:
            return balance.due(self.kd_iteration)
        return _on_period(self.kd_iteration, self.kd_diag_period)

    def kd_diagnostics_per_term(self) -> bool:
        """Whether a diagnostics step measures every ``loss_kd_*`` term (one trunk backward per
        term) or only the detection losses and the KD terms' sum (two, what the controller
        reads). Per term at every ``KD.DIAG.PERIOD`` step; under ``KD.BALANCE`` at the updates
        that fall on a ``KD.DIAG.PERIOD`` step (every ``lcm`` of the two periods: 100 iterations
        at the defaults 50 and 20), so that the diagnostics stay a few per cent of the training
        time whatever the number of terms
        (``benchmarks/results/diag_overhead_period20_two_probes.json``)."""
        balance = self.kd_balance
        if balance is None or self.kd_iteration < balance.warmup:
            return True
        return _on_period(self.kd_iteration, self.kd_diag_period)

    def finalize_kd_losses(self, losses: Dict[str, Tensor]) -> Dict[str, Tensor]:
        """The end of every training forward (both backends): on the first step of a fresh
        ``KD.BALANCE`` run, :meth:`kd_calibrate`; otherwise, when due, measure the gradients at
        the trunk (:mod:`kd2.modeling.kd_diagnostics`; per term, or the detection losses and the
        KD terms' sum: :meth:`kd_diagnostics_per_term`) into :attr:`kd_diag_last` and let the
        controller update its multipliers from the KD total's share (used from the next step).
        ``losses`` is returned unchanged, except for the calibrated step's ``loss_kd_*`` terms,
        which carry the new multiplier — the loss the optimizer (and the divergence guard)
        sees."""
        if self.kd_calibration_due():
            losses, stats = self.kd_calibrate(losses)
        elif not self.training or not self.kd_diagnostics_due():
            return losses
        else:
            from kd2.modeling.kd_diagnostics import (
                KD_TOTAL,
                gradient_statistics,
                term_gradients,
                trunk_parameters,
            )

            params = trunk_parameters(self)
            grads = term_gradients(losses, params, per_term=self.kd_diagnostics_per_term())
            stats = _mean_over_processes(gradient_statistics(grads))
            if self.kd_balance is not None and self.kd_balance.due(self.kd_iteration):
                self.kd_balance.update(stats.get(f"grad_share/{KD_TOTAL}", 0.0))
        if self.kd_balance is not None:
            for name in losses:
                if name.startswith("loss_kd_"):
                    stats[f"kd_multiplier/{name}"] = self.kd_balance.multiplier(name)
        self.kd_diag_last = {"iteration": self.kd_iteration, **stats}
        self.kd_publish_scalars(stats)
        return losses

    def kd_calibrate(self, losses: Dict[str, Tensor]) -> Tuple[Dict[str, Tensor], Dict[str, float]]:
        """Calibrate the ``KD.BALANCE`` controller on this step's batch, before its optimizer
        step (:meth:`kd2.modeling.balance.GradShareBalancer.calibrate`).

        The trunk gradients of the detection losses and of the KD terms at the methods' own weights
        (kept by :meth:`distill_losses` on this step only; the KD warm-up factor is left out, so the
        multiplier fits the full-weight terms the warm-up leads to) give the share ``S₁`` (of the KD
        terms' sum, ``grad_share/kd``); the controller sets the multiplier that puts the share on
        its target. The gradients are measured once: each KD term's gradient is its own-weight
        gradient times ``warm-up factor × multiplier``, so the logged statistics (``grad_*``, plus
        ``kd_calibration/share``: ``S₁``) are those of the loss the optimizer receives. Nothing is
        drawn from a random generator and no batch is read: a run without ``KD.BALANCE`` never gets
        here. Returns the loss dict with the rescaled ``loss_kd_*`` terms, and the stats.
        """
        from kd2.modeling.kd_diagnostics import (
            DETECTION,
            KD_TOTAL,
            gradient_statistics,
            term_gradients,
            trunk_parameters,
        )

        own = dict(self._kd_own_terms)
        self._kd_own_terms = {}
        detection = {k: v for k, v in losses.items() if not k.startswith("loss_kd_")}
        params = trunk_parameters(self)
        grads = term_gradients({**detection, **own}, params)
        measured = _mean_over_processes(gradient_statistics(grads))
        share = measured.get(f"grad_share/{KD_TOTAL}", 0.0)
        kd_norm = measured.get(f"grad_norm/{KD_TOTAL}", 0.0)
        det_norm = measured.get(f"grad_norm/{DETECTION}", 0.0)
        self.kd_balance.calibrate(share, kd_norm / det_norm if det_norm > 0 else None)
        factor = self.kd_warmup_factor()
        out = dict(losses)
        for name, value in own.items():
            scale = factor * self.kd_balance.multiplier(name)
            out[name] = value * scale
            grads[name] = [g * scale if g is not None else None for g in grads[name]]
        stats = _mean_over_processes(gradient_statistics(grads))
        stats["kd_calibration/share"] = share
        logger.info(
            "KD.BALANCE calibration at iteration %d: KD share of the trunk gradient %.6g (KD / "
            "detection gradient norm %.3g) at the methods' own weights -> multiplier %.3g, share "
            "%.3g (band [%g, %g])",
            self.kd_iteration,
            share,
            kd_norm / det_norm if det_norm > 0 else float("inf"),
            self.kd_balance.multiplier("loss_kd_"),
            stats.get(f"grad_share/{KD_TOTAL}", 0.0),
            self.kd_balance.low,
            self.kd_balance.high,
        )
        return out, stats


def _on_period(iteration: int, period: int) -> bool:
    """Whether ``iteration`` is a step of a ``period`` (``0``: never)."""
    return period > 0 and iteration % period == 0


def _mean_over_processes(stats: Dict[str, float]) -> Dict[str, float]:
    """The average of every statistic over the processes (identical controller updates)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return stats
    keys = sorted(stats)
    backend = dist.get_backend()
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else "cpu"
    t = torch.tensor([stats[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return dict(zip(keys, t.tolist()))
