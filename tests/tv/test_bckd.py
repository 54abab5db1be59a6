"""BCKD on the torchvision backend's dense detectors (RetinaNet, FCOS, GFL): both terms finite
and positive, gradients reach the student's classification and box branches, the teacher stays
untouched; Faster R-CNN is refused when the model is built."""

from __future__ import annotations

import pytest
import torch

from kd2.tv.build import build_detector
from tests.helpers import batch, kd_cfg


@pytest.mark.parametrize("arch", ["RetinaNet", "FCOS", "GFL"])
def test_bckd_trains_every_dense_head(tmp_path, arch):
    model = build_detector(kd_cfg(tmp_path, arch, ["BCKD"], teacher_backbone="resnet18")).train()
    teacher = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    images, targets = batch(arch, with_empty=True)
    losses = model(images, targets)
    for key in ("loss_kd_bckd_cls", "loss_kd_bckd_loc"):
        assert torch.isfinite(losses[key]) and losses[key].item() > 0, key
    model.zero_grad(set_to_none=True)
    losses["loss_kd_bckd_loc"].backward(retain_graph=True)
    grads = [p.grad for n, p in model.named_parameters() if "head" in n and p.grad is not None]
    assert grads and any(float(g.abs().sum()) > 0 for g in grads)
    sum(losses.values()).backward()
    for k, v in model.teacher.state_dict().items():
        torch.testing.assert_close(v, teacher[k], rtol=0, atol=0)


def test_bckd_refuses_a_two_stage_detector(tmp_path):
    with pytest.raises(ValueError, match="BCKD"):
        build_detector(kd_cfg(tmp_path, "FasterRCNN", ["BCKD"], teacher_backbone="resnet18"))
