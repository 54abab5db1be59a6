"""kd2: knowledge distillation for object detectors.

A large frozen teacher detector teaches a small student detector. kd2 is a Detectron2 extension
that also runs on torchvision's detection models; both fill the canonical record of
:mod:`kd2.structures`, and every loss in :mod:`kd2.losses` is written once against it.
"""

from kd2.utils.env import check_torchvision

check_torchvision()

__version__ = "0.1.0"
