from .config import CfgNode, base_chain, get_cfg, method_node_name, validate_values

__all__ = ["CfgNode", "base_chain", "get_cfg", "method_node_name", "validate_values"]
