"""Every method's declaration (:class:`kd2.losses.MethodCard`) holds for its code: the families it
names are exactly those the distiller's build-time checks accept, its project exists, and the
tables generated from it are current (``tests/test_docs.py``). Its terms are checked against what
``forward`` returns by the float64 cases (``tests/losses/test_float64.py``)."""

from __future__ import annotations

import pytest

from kd2.losses import FAMILIES, KD_METHOD_REGISTRY
from kd2.modeling.distiller import _applicable_methods
from kd2.modeling.level_map import TeacherInfo, detector_parts
from tests.helpers import REPO

METHODS = sorted(KD_METHOD_REGISTRY)


def _info(family: str) -> TeacherInfo:
    anchors = None if family == "faster_rcnn" else (6 if family == "ssd" else 1)
    channels = {s: 32 for s in (8, 16, 32, 64, 128)}
    return TeacherInfo(channels, 5, detector_parts(family), family, anchors, family)


@pytest.mark.parametrize("name, cls", METHODS)
def test_every_method_has_a_card_and_a_project(name, cls):
    card = cls.card
    assert card is not None, f"{name} declares no MethodCard"
    assert (REPO / "projects" / card.project / "README.md").is_file(), card.project
    assert card.terms and card.families and card.paper and card.code
    assert len(set(card.terms)) == len(card.terms)


def family_mismatch(family: str) -> tuple[list[str], list[str]]:
    """(methods the build checks accept for ``family`` that their cards do not name, methods
    whose cards name it that the checks refuse), over every registered method."""
    info = _info(family)
    arch = "two_stage" if family == "faster_rcnn" else "one_stage"
    applies = set(_applicable_methods(info, info, arch, family == "ssd", 5))
    # ClassifierKD learns from an image classifier, not from this teacher: its families are the
    # detectors of its end-to-end test (tests/modeling/test_classifier_kd.py reads its card)
    declared = {n for n, cls in sorted(KD_METHOD_REGISTRY) if family in cls.card.families} - {
        "ClassifierKD"
    }
    return sorted(applies - declared), sorted(declared - applies)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_declared_families_are_where_the_build_checks_let_a_method_apply(family):
    extra, missing = family_mismatch(family)
    assert not extra and not missing, (
        f"{family}: the checks accept {extra} beyond the cards and refuse {missing} that the "
        "cards name"
    )
