"""A cheaper teacher forward: its precision, memory format and compilation.

``KD.TEACHER.DTYPE`` / ``CHANNELS_LAST`` / ``COMPILE`` (and the same keys of a
``KD.TEACHERS.<NAME>`` entry) apply to the teacher's **backbone + FPN**, the part every feature
method runs and most of the teacher's compute:

* ``DTYPE`` ``bfloat16`` / ``float16``: the backbone's weights are cast once when the model is
  built; a forward pre-hook casts its input, a forward hook hands its maps on in float32
  (independent of the student's AMP). The teacher's heads, anchors and box coordinates stay
  exact float32, and every loss reads float32 records as before; every caller of the backbone
  (the KD record, GlobalKD's prototypes, the pre-flight evaluation) gets the same.
  ``float16`` needs CUDA (a clear error elsewhere); ``bfloat16`` runs on CPUs too.
* ``CHANNELS_LAST``: the backbone's weights and its input in channels-last memory format.
* ``COMPILE``: ``torch.compile`` of the backbone's forward (the first steps pay the
  compilation; the state-dict keys do not change).

:func:`configure_teacher` applies a node's options to a built teacher (the teacher builders of
both backends call it).
"""

from __future__ import annotations

from typing import Dict

import torch
from torch import nn

from kd2.utils.errors import ConfigError

__all__ = ["TEACHER_DTYPES", "configure_teacher"]

#: ``KD.TEACHER.DTYPE`` values.
TEACHER_DTYPES: Dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def configure_teacher(teacher: nn.Module, node, key: str, device: str) -> nn.Module:
    """Apply ``node.DTYPE`` / ``CHANNELS_LAST`` / ``COMPILE`` (absent keys: the defaults) to a
    frozen ``teacher``; ``key`` names the node in messages. Returns ``teacher``."""
    name = str(node.get("DTYPE", "float32") or "float32").lower()
    if name not in TEACHER_DTYPES:
        raise ValueError(f"{key}.DTYPE must be one of {sorted(TEACHER_DTYPES)}, got {name!r}")
    dtype = TEACHER_DTYPES[name]
    if dtype == torch.float16 and not str(device).startswith("cuda"):
        raise ValueError(
            f"{key}.DTYPE float16 needs a CUDA device (MODEL.DEVICE is {device!r}); on a CPU use "
            "bfloat16 or float32"
        )
    channels_last = bool(node.get("CHANNELS_LAST", False))
    compile_ = bool(node.get("COMPILE", False))
    backbone = getattr(teacher, "backbone", None)
    if backbone is None:  # a transformers DETR: its backbone is inside the model's own forward
        if dtype != torch.float32 or channels_last or compile_:
            raise ConfigError(
                f"{key}.DTYPE / CHANNELS_LAST / COMPILE apply to a torchvision or Detectron2 "
                f"teacher's backbone; the teacher {type(teacher).__name__} has none kd2 reaches",
                f"leave {key}.DTYPE float32, CHANNELS_LAST and COMPILE False",
            )
        teacher.kd2_teacher_dtype = dtype
        return teacher
    if dtype != torch.float32:
        backbone.to(dtype)
    if channels_last:
        backbone.to(memory_format=torch.channels_last)
    if dtype != torch.float32 or channels_last:
        backbone.register_forward_pre_hook(_input_hook(dtype, channels_last))
    if dtype != torch.float32:
        backbone.register_forward_hook(_float32_output)
    if compile_:
        backbone.forward = torch.compile(backbone.forward)  # state-dict keys unchanged
    teacher.kd2_teacher_dtype = dtype
    return teacher


def _input_hook(dtype: torch.dtype, channels_last: bool):
    def hook(module, args):
        x = args[0]
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return (x.to(dtype), *args[1:])

    return hook


def _float32_output(module, args, output):
    """The backbone's maps in float32 (a dict of maps, or one map)."""
    if isinstance(output, dict):
        return type(output)((k, v.float()) for k, v in output.items())
    return output.float()
