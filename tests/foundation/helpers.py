"""Random-init foundation models saved as a user's download would be (no network)."""

from __future__ import annotations

import os

import torch

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]

#: the kinds the tests build: transformers model types and a timm architecture
KINDS = ("dinov2", "dinov2_with_registers", "dinov3_vit", "dinov3_convnext", "timm")


def hf_config(kind: str):
    import transformers as T

    vit = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=64,
    )
    if kind == "dinov2":
        return T.Dinov2Config(patch_size=14, **vit)
    if kind == "dinov2_with_registers":
        return T.Dinov2WithRegistersConfig(patch_size=16, num_register_tokens=4, **vit)
    if kind == "dinov3_vit":
        return T.DINOv3ViTConfig(patch_size=16, num_register_tokens=4, **vit)
    if kind == "dinov3_convnext":
        return T.DINOv3ConvNextConfig(hidden_sizes=[16, 24, 32, 48], depths=[1, 1, 1, 1])
    raise ValueError(kind)


def save_foundation(tmp_path, kind: str, seed: int = 0) -> tuple[str, str]:
    """``(CONFIG, WEIGHTS)`` of a random-init foundation model of ``kind`` on disk: a
    transformers directory (config.json, model.safetensors, preprocessor_config.json) or
    ``timm:resnet18`` and its safetensors file."""
    torch.manual_seed(seed)
    out = os.path.join(str(tmp_path), f"foundation_{kind}")
    if kind == "timm":
        import timm
        from safetensors.torch import save_file

        model = timm.create_model("resnet18", pretrained=False)
        os.makedirs(out, exist_ok=True)
        path = os.path.join(out, "model.safetensors")
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
        return "timm:resnet18", path
    from transformers import AutoModel, BitImageProcessor

    model = AutoModel.from_config(hf_config(kind))
    model.save_pretrained(out)
    BitImageProcessor(image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD).save_pretrained(out)
    return out, ""


def use_foundation_teacher(cfg, tmp_path, kind: str, **options) -> None:
    """Point ``cfg.KD.TEACHER`` at a saved random-init foundation model of ``kind``."""
    cfg.KD.TEACHER.CONFIG, cfg.KD.TEACHER.WEIGHTS = save_foundation(tmp_path, kind)
    cfg.KD.TEACHER.BACKEND = "foundation"
    for k, v in options.items():
        cfg.KD.TEACHER.FOUNDATION[k] = v
