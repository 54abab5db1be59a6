"""The backend-independent half of the KD meta-architectures: the distiller
(:mod:`kd2.modeling.distiller`), the backend seam (:mod:`kd2.modeling.backends`), teachers,
level pairing, balance and diagnostics. Each module is imported from its own path."""
