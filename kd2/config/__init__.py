from .config import CfgNode, get_cfg, method_node_name

__all__ = ["CfgNode", "get_cfg", "method_node_name"]
