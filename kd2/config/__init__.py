from .config import (
    BACKENDS,
    CfgNode,
    base_chain,
    config_backend,
    get_cfg,
    method_node_name,
    validate_values,
)

__all__ = [
    "BACKENDS",
    "CfgNode",
    "base_chain",
    "config_backend",
    "get_cfg",
    "method_node_name",
    "validate_values",
]
