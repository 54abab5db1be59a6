"""The transformers backend's :class:`~kd2.engine.predictor.Predictor`: a kd2 config's plain
detector with its trained weights, RGB ``uint8`` images in, contiguous labels out."""

from __future__ import annotations

from kd2.engine.predictor import Predictor, load_own_loop_predictor

from .build import build_plain_detector

__all__ = ["load_predictor"]


def load_predictor(config_file: str, opts: list) -> Predictor:
    """The plain detector of a kd2 config with its ``MODEL.WEIGHTS`` (loaded strictly)."""
    return load_own_loop_predictor(config_file, opts, "transformers", build_plain_detector)
