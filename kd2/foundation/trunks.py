"""The trunks a :class:`~kd2.foundation.teacher.FoundationTeacher` runs: one module per model kind,
each returning its native maps by key (and a ViT's CLS token) from a normalised batch.

* :class:`ViTTrunk` — a transformers DINOv2 / DINOv2-with-registers / DINOv3 ViT. Its tokens are
  ``[CLS, registers, patches]`` (``num_register_tokens`` registers: 0 for DINOv2, 4 in the released
  DINOv2-reg and DINOv3 checkpoints); the chosen layers' tokens go through the model's final norm
  (the norm the released features and transformers' ``*Backbone`` classes apply), the CLS and
  register tokens are split off and the patch tokens reshaped to an ``(N, D, h, w)`` map of stride
  = the patch size. One layer = one map; several layers give several maps of the same stride.
* :class:`StagesTrunk` — a transformers DINOv3 ConvNeXt: its stage outputs, strides 4 / 8 / 16 /
  32.
* :class:`TimmTrunk` — a timm model created with ``features_only``: its feature maps at
  ``feature_info``'s reductions.
"""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

from torch import Tensor, nn

__all__ = ["StagesTrunk", "TimmTrunk", "ViTTrunk", "VIT_TYPES", "CONVNEXT_TYPES"]

#: transformers ``model_type`` -> the name of the model's final norm
VIT_TYPES = {"dinov2": "layernorm", "dinov2_with_registers": "layernorm", "dinov3_vit": "norm"}
#: transformers ``model_type`` of the ConvNeXt trunks
CONVNEXT_TYPES = ("dinov3_convnext",)


class ViTTrunk(nn.Module):
    """A transformers DINO ViT read at ``layers`` (1-based block indices; the last block is the
    model's ``last_hidden_state``).

    ``levels``: ``("layer<i>", patch_size, hidden_size)`` per layer.
    """

    def __init__(self, model: nn.Module, layers: Sequence[int]):
        super().__init__()
        config = model.config
        depth = int(config.num_hidden_layers)
        self.layers = [int(i) if int(i) > 0 else depth + 1 + int(i) for i in layers] or [depth]
        bad = [i for i in self.layers if not 1 <= i <= depth]
        if bad:
            raise ValueError(
                f"layers {list(layers)} out of range: the model has {depth} blocks (1..{depth}, "
                "or negative from the last)"
            )
        self.model = model
        self.norm_name = VIT_TYPES[config.model_type]
        self.prefix = 1 + int(getattr(config, "num_register_tokens", 0) or 0)
        self.patch = int(config.patch_size)
        self.levels: List[Tuple[str, int, int]] = [
            (f"layer{i}", self.patch, int(config.hidden_size)) for i in self.layers
        ]

    def forward(self, x: Tensor) -> Dict[str, Tensor]:
        n, _, h, w = x.shape
        gh, gw = h // self.patch, w // self.patch
        out = self.model(pixel_values=x, output_hidden_states=True)
        norm = getattr(self.model, self.norm_name)
        maps: Dict[str, Tensor] = {}
        cls = None
        for i in self.layers:
            tokens = norm(out.hidden_states[i])
            patches = tokens[:, self.prefix :]
            maps[f"layer{i}"] = patches.transpose(1, 2).reshape(n, -1, gh, gw)
            cls = tokens[:, 0]
        maps["cls"] = cls
        return maps


class StagesTrunk(nn.Module):
    """A transformers DINOv3 ConvNeXt read at its ``stages`` (1..4, strides 4 / 8 / 16 / 32)."""

    STRIDES = (4, 8, 16, 32)

    def __init__(self, model: nn.Module, stages: Sequence[int]):
        super().__init__()
        sizes = list(model.config.hidden_sizes)
        self.stages = [int(i) for i in stages] or list(range(1, len(sizes) + 1))
        bad = [i for i in self.stages if not 1 <= i <= len(sizes)]
        if bad:
            raise ValueError(f"stages {list(stages)} out of range 1..{len(sizes)}")
        self.model = model
        self.levels = [(f"stage{i}", self.STRIDES[i - 1], int(sizes[i - 1])) for i in self.stages]

    def forward(self, x: Tensor) -> Dict[str, Tensor]:
        hidden = self.model(pixel_values=x, output_hidden_states=True).hidden_states
        return {f"stage{i}": hidden[i] for i in self.stages}


class TimmTrunk(nn.Module):
    """A timm ``features_only`` model; ``levels`` from its ``feature_info``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        info = model.feature_info
        self.levels = [
            (f"feature{i}", int(r), int(c))
            for i, (r, c) in enumerate(zip(info.reduction(), info.channels()))
        ]

    def forward(self, x: Tensor) -> Dict[str, Tensor]:
        return {key: f for (key, _, _), f in zip(self.levels, self.model(x))}
