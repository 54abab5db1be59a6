from .config import (
    BACKENDS,
    NUM_CLASSES_KEYS,
    CfgNode,
    base_chain,
    config_backend,
    get_cfg,
    method_node_name,
    num_classes_of,
    validate_values,
)

__all__ = [
    "BACKENDS",
    "NUM_CLASSES_KEYS",
    "CfgNode",
    "base_chain",
    "config_backend",
    "get_cfg",
    "method_node_name",
    "num_classes_of",
    "validate_values",
]
