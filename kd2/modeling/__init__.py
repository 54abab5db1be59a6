"""Trainable layers (adapters) and the backend-independent half of KD meta-architectures
(:mod:`kd2.modeling.distiller`, imported from its module to keep kd2.losses free of cycles)."""

from .adapters import FeatureAdapter

__all__ = ["FeatureAdapter"]
