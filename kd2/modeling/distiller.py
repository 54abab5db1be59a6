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

from typing import Dict, FrozenSet, Mapping, Sequence, Tuple

from torch import Tensor, nn

from kd2.config import method_node_name
from kd2.losses import KD_METHOD_REGISTRY
from kd2.structures import StepRecord

__all__ = ["DistillerMixin", "needs_detector_teacher"]


def needs_detector_teacher(kd_cfg) -> bool:
    """Whether any method of ``kd_cfg.METHODS`` reads a part of a detector teacher."""
    return any(KD_METHOD_REGISTRY.get(name).teacher_parts for name in kd_cfg.METHODS)


class DistillerMixin:
    """Mix into an ``nn.Module`` subclass of a framework detector (listed before it)."""

    #: ``"two_stage"`` or ``"one_stage"``; set by the backend class.
    arch_kind: str = "one_stage"
    #: The dense head is a softmax classifier with a background class (SSD); set by the backend.
    dense_softmax: bool = False

    def _init_distiller(
        self,
        kd_cfg,
        teacher: nn.Module | None,
        *,
        num_classes: int,
        teacher_num_classes: int | None,
        student_channels: Mapping[int, int],
        teacher_channels: Mapping[int, int],
        input_normalization: Tuple[Sequence[float], Sequence[float], str, float] | None = None,
    ) -> None:
        """Attach ``teacher`` (frozen, eval, unregistered) and build ``kd_cfg.METHODS``.

        ``*_channels`` map FPN stride -> channels of the student and teacher. ``teacher`` is
        ``None`` when no method needs a detector teacher (:func:`needs_detector_teacher`).
        ``input_normalization`` = ``(pixel_mean, pixel_std, channels, scale)`` of the student's
        input (see :class:`kd2.modeling.classifier_teacher.ClassifierTeacher`), needed by
        methods with a classifier teacher.
        """
        object.__setattr__(self, "_classifier_teachers", [])
        if teacher is None:
            if needs_detector_teacher(kd_cfg):
                raise ValueError(
                    f"KD.METHODS {list(kd_cfg.METHODS)} need a detector teacher: set "
                    "KD.TEACHER.CONFIG and KD.TEACHER.WEIGHTS"
                )
        else:
            if teacher_num_classes != num_classes:
                raise ValueError(
                    f"teacher and student disagree on the number of classes: teacher has "
                    f"{teacher_num_classes}, student has {num_classes}. Distillation needs the "
                    "same label space; fix the NUM_CLASSES of one of the configs"
                )
            if not set(student_channels) & set(teacher_channels):
                raise ValueError(
                    f"student FPN strides {sorted(student_channels)} and teacher FPN strides "
                    f"{sorted(teacher_channels)} have none in common; kd2 pairs levels by stride"
                )
            teacher.eval().requires_grad_(False)
        object.__setattr__(self, "_teacher", teacher)  # deliberately not a submodule
        self.num_classes_kd = num_classes
        self.kd_warmup_iters = kd_cfg.WARMUP_ITERS
        self.kd_iteration = 0
        methods = {}
        for name in kd_cfg.METHODS:
            node = getattr(kd_cfg, method_node_name(name), None)
            methods[name] = KD_METHOD_REGISTRY.get(name).from_config(
                node,
                student_channels=dict(student_channels),
                teacher_channels=dict(teacher_channels),
                num_classes=num_classes,
                arch=self.arch_kind,
            )
            methods[name].bind_detector(self._detector_family())
            reason = methods[name].unsupported_reason(self.arch_kind, self.dense_softmax)
            if reason:
                raise ValueError(
                    f"KD method {name!r} (KD.METHODS) does not apply to the "
                    f"{self._detector_name()} student: {reason}"
                )
        for method in methods.values():
            if getattr(method, "needs_classifier_teacher", False):
                method.attach_classifier(
                    self._build_classifier_teacher(method, input_normalization)
                )
        self.kd_methods = nn.ModuleDict(methods)
        splits = {m.head_split for m in methods.values() if m.head_split is not None}
        if len(splits) > 1:
            raise ValueError(
                f"KD.METHODS {list(kd_cfg.METHODS)} ask to cut the dense head at different "
                f"blocks {sorted(splits)}; the head is cut at one place per step"
            )
        #: the dense head's towers are cut after this many blocks (CrossKD), else ``None``
        self.kd_head_split: int | None = splits.pop() if splits else None
        self.teacher_parts: FrozenSet[str] = frozenset().union(
            *(m.teacher_parts for m in methods.values())
        )
        self._init_kd_control(kd_cfg)
        inherit = list(getattr(kd_cfg, "INHERIT_TEACHER", []) or [])
        if inherit:
            if teacher is None:
                raise ValueError(
                    f"KD.INHERIT_TEACHER {inherit} copies weights from a detector teacher, but "
                    f"KD.METHODS {list(kd_cfg.METHODS)} build none; set a detector-teacher method"
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
            raise ValueError(f"KD.BALANCE.MODE must be 'none' or 'grad_share', got {mode!r}")
        self.kd_balance = None
        if mode == "grad_share":
            from kd2.modeling.balance import GradShareBalancer

            self.kd_balance = GradShareBalancer(
                balance.LOW, balance.HIGH, balance.PERIOD, balance.WARMUP
            )

    def _detector_family(self) -> str:
        """``"faster_rcnn"`` (any two-stage), ``"ssd"``, ``"gfl"``, ``"fcos"`` or ``"retinanet"``
        (any other sigmoid dense head): the key of the methods' per-detector defaults."""
        if self.arch_kind == "two_stage":
            return "faster_rcnn"
        if self.dense_softmax:
            return "ssd"
        name = self._detector_name().upper()
        if "GFL" in name:
            return "gfl"
        return "fcos" if "FCOS" in name else "retinanet"

    def _build_classifier_teacher(self, method, input_normalization) -> nn.Module:
        from kd2.modeling.classifier_teacher import build_classifier_teacher

        if input_normalization is None:
            raise ValueError("this backend gives no input normalisation for a classifier teacher")
        mean, std, channels, scale = input_normalization
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

    def distill_losses(self, student: StepRecord, teacher: StepRecord) -> Dict[str, Tensor]:
        """Every configured method's losses on the two records, times the warm-up factor."""
        factor = self.kd_warmup_factor()
        balance = self.kd_balance
        losses: Dict[str, Tensor] = {}
        for method_name, method in self.kd_methods.items():
            for name, value in method(student, teacher).items():
                self.kd_term_owner[name] = method_name
                m = balance.multiplier(name) if balance is not None else 1.0
                losses[name] = value * (factor * m)
        return losses

    def kd_diagnostics_due(self) -> bool:
        """Whether this training step measures the gradient diagnostics (``KD.DIAG.PERIOD``, or
        an update of the ``KD.BALANCE`` controller)."""
        it = self.kd_iteration
        if self.kd_balance is not None and self.kd_balance.due(it):
            return True
        return self.kd_diag_period > 0 and it % self.kd_diag_period == 0

    def finalize_kd_losses(self, losses: Dict[str, Tensor]) -> Dict[str, Tensor]:
        """The end of every training forward (both backends): when due, measure each term's
        gradient at the trunk (:mod:`kd2.modeling.kd_diagnostics`) into :attr:`kd_diag_last`
        and let the ``KD.BALANCE`` controller update its multipliers (used from the next step).
        ``losses`` is returned unchanged."""
        if not self.training or not self.kd_diagnostics_due():
            return losses
        from kd2.modeling.kd_diagnostics import (
            gradient_statistics,
            term_gradients,
            trunk_parameters,
        )

        params = trunk_parameters(self)
        stats = gradient_statistics(term_gradients(losses, params))
        stats = _mean_over_processes(stats)
        if self.kd_balance is not None:
            if self.kd_balance.due(self.kd_iteration):
                kd_share = sum(v for k, v in stats.items() if k.startswith("grad_share/loss_kd_"))
                self.kd_balance.update(kd_share)
            for name in losses:
                if name.startswith("loss_kd_"):
                    stats[f"kd_multiplier/{name}"] = self.kd_balance.multiplier(name)
        self.kd_diag_last = {"iteration": self.kd_iteration, **stats}
        _put_event_scalars(stats)
        return losses


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


def _put_event_scalars(stats: Dict[str, float]) -> None:
    """Into Detectron2's event storage when training under Detectron2 (its metrics.json and
    TensorBoard writers pick them up); kd2's own trainer reads :attr:`kd_diag_last` instead."""
    try:
        from detectron2.utils.events import get_event_storage
    except ImportError:
        return
    try:
        storage = get_event_storage()
    except AssertionError:  # no storage: not inside a Detectron2 training loop
        return
    storage.put_scalars(**stats, smoothing_hint=False)
