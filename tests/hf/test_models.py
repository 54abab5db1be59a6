"""The transformers backend's first pieces: every DETR-family type builds at kd2's presets from a
config (nothing downloaded) and trains a step on kd2's targets; local directories load only
safetensors, without remote code."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")  # the hf extra; make install installs it (CI runs these)

from kd2.hf import (
    MODEL_TYPES,
    backbone_parameters,
    build_hf_config,
    build_hf_detector,
    load_hf_detector,
    to_hf_labels,
)
from kd2.utils.errors import ConfigError, MissingFileError, WeightsError


def _targets():
    return [
        {"boxes": torch.tensor([[8.0, 16.0, 40.0, 48.0], [0.0, 0.0, 128.0, 64.0]]),
         "labels": torch.tensor([1, 3])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},
    ]  # fmt: skip


def test_labels_are_normalised_cxcywh_from_zero():
    labels = to_hf_labels(_targets(), [(128, 128), (96, 128)], label_offset=1)
    assert labels[0]["class_labels"].tolist() == [0, 2]
    expected = [[24 / 128, 32 / 128, 32 / 128, 32 / 128], [0.5, 0.25, 1.0, 0.5]]
    assert torch.allclose(labels[0]["boxes"], torch.tensor(expected))
    assert labels[1]["boxes"].shape == (0, 4) and labels[1]["class_labels"].dtype == torch.int64
    with pytest.raises(ValueError, match="below label_offset"):
        to_hf_labels(_targets(), [(128, 128)] * 2, label_offset=2)


@pytest.mark.parametrize("model_type", sorted(MODEL_TYPES))
def test_every_type_builds_at_the_pico_preset_and_trains_a_step(model_type):
    torch.manual_seed(0)
    model = build_hf_detector(model_type, "pico", num_classes=6).train()
    config = model.config
    assert config.num_labels == 6 and not config.freeze_backbone_batch_norms
    assert config.num_queries == 50 and config.d_model == 64
    images = torch.rand(2, 3, 128, 128)
    out = model(pixel_values=images, labels=to_hf_labels(_targets(), [(128, 128)] * 2))
    assert torch.isfinite(out.loss) and out.loss.item() > 0
    assert out.logits.shape[-1] == 6
    out.loss.backward()
    grads = [p.grad for p in backbone_parameters(model)]
    assert grads and any(g is not None and bool(g.abs().sum()) for g in grads)  # it learns


def test_presets_and_types_are_checked():
    assert build_hf_config("d_fine", "tiny", 3, num_queries=30).num_queries == 30
    with pytest.raises(ConfigError, match="unknown transformers detector"):
        build_hf_config("detr9", "pico", 3)
    with pytest.raises(ConfigError, match="unknown size preset"):
        build_hf_config("d_fine", "huge", 3)


def test_a_local_directory_loads_only_safetensors_and_no_remote_code(tmp_path):
    torch.manual_seed(0)
    model = build_hf_detector("d_fine", "pico", num_classes=4).eval()
    model.save_pretrained(tmp_path / "ok")
    loaded = load_hf_detector(str(tmp_path / "ok")).eval()
    images = torch.rand(1, 3, 96, 96)
    with torch.no_grad():
        assert torch.equal(loaded(pixel_values=images).logits, model(pixel_values=images).logits)

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((tmp_path / "ok" / "config.json").read_text())
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    with pytest.raises(WeightsError, match="pickled weights pytorch_model.bin"):
        load_hf_detector(str(pickled))

    remote = tmp_path / "remote"
    remote.mkdir()
    config = json.loads((tmp_path / "ok" / "config.json").read_text())
    config["auto_map"] = {"AutoModelForObjectDetection": "modeling_evil.Evil"}
    (remote / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightsError, match="remote code"):
        load_hf_detector(str(remote))
    with pytest.raises(MissingFileError):
        load_hf_detector(str(tmp_path / "absent"))
