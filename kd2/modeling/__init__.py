"""Trainable layers shared by distillation methods."""

from .adapters import FeatureAdapter

__all__ = ["FeatureAdapter"]
