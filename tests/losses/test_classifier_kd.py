"""Classifier-to-detector KD, functional core: crops and the KD-cls loss on hand-computed cases."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kd2.losses.classifier_kd import classifier_kd_cls_loss, crop_boxes


def _crop_one(image: torch.Tensor, box, size: int) -> torch.Tensor:
    """Per-box reference: the same θ written out for one box."""
    _, h, w = image.shape
    x1, y1, x2, y2 = [float(v) for v in box]
    x1, x2 = min(max(x1, 0), w), min(max(x2, 0), w)
    y1, y2 = min(max(y1, 0), h), min(max(y2, 0), h)
    theta = torch.tensor(
        [[[(x2 - x1) / w, 0, (x1 + x2) / w - 1], [0, (y2 - y1) / h, (y1 + y2) / h - 1]]],
        dtype=image.dtype,
    )
    grid = F.affine_grid(theta, [1, 3, size, size], align_corners=False)
    return F.grid_sample(image[None], grid, mode="bilinear", align_corners=False)[0]


def test_crop_boxes_matches_per_box_reference():
    g = torch.Generator().manual_seed(0)
    images = torch.rand(3, 3, 40, 56, generator=g)
    boxes = torch.tensor(
        [
            [4.0, 6.0, 30.0, 20.0],
            [0.0, 0.0, 56.0, 40.0],  # the whole image
            [-10.0, 5.0, 20.0, 60.0],  # partly outside: clamped
            [50.0, 30.0, 70.0, 45.0],
            [10.0, 10.0, 10.0, 25.0],  # zero width
        ]
    )
    index = torch.tensor([2, 0, 1, 2, 0])
    got = crop_boxes(images, boxes, index, size=16)
    assert got.shape == (5, 3, 16, 16)
    for m in range(5):
        want = _crop_one(images[index[m]], boxes[m], 16)
        torch.testing.assert_close(got[m], want)


def test_crop_of_the_whole_image_at_its_own_size_is_the_image():
    image = torch.arange(2 * 3 * 8 * 8, dtype=torch.float64).view(2, 3, 8, 8)
    crops = crop_boxes(
        image,
        torch.tensor([[0.0, 0.0, 8.0, 8.0]] * 2, dtype=torch.float64),
        torch.tensor([1, 0]),
        size=8,
    )
    torch.testing.assert_close(crops, image.flip(0))


def test_crop_boxes_gradcheck_wrt_boxes_and_empty_input():
    g = torch.Generator().manual_seed(1)
    images = torch.rand(2, 3, 12, 14, generator=g, dtype=torch.float64)
    boxes = torch.tensor(
        [[2.3, 1.7, 9.1, 8.4], [3.2, 2.6, 12.5, 10.9]], dtype=torch.float64, requires_grad=True
    )
    index = torch.tensor([0, 1])
    assert torch.autograd.gradcheck(lambda b: crop_boxes(images, b, index, size=5), (boxes,))
    empty = crop_boxes(images, boxes[:0], index[:0])
    assert empty.shape == (0, 3, 112, 112)
    with pytest.raises(IndexError, match="outside the batch"):
        crop_boxes(images, boxes.detach(), torch.tensor([0, 2]))


def test_kd_cls_softmax_pads_a_zero_background_probability():
    student = torch.tensor([[1.0, 0.0, -1.0]], requires_grad=True)  # K = 2 + background
    teacher = torch.tensor([[2.0, 0.0]])
    got = classifier_kd_cls_loss(student, teacher, temperature=2.0, head="softmax")
    pt = torch.softmax(teacher[0] / 2, -1).tolist() + [0.0]
    ps = torch.softmax(student[0].detach() / 2, -1).tolist()
    eps = 1e-10
    want = 4 * sum(a * (math.log(a + eps) - math.log(b + eps)) for a, b in zip(pt, ps))
    assert float(got) == pytest.approx(want, rel=1e-5)
    got.backward()
    assert student.grad[0, 2] > 0  # mass on background is pushed down
    with pytest.raises(ValueError, match="K \\+ 1"):
        classifier_kd_cls_loss(student[:, :2], teacher)


def test_kd_cls_sigmoid_variant_normalises_sigmoids():
    student = torch.tensor([[0.0, 2.0], [1.0, -1.0]])
    teacher = torch.tensor([[1.0, 1.0], [1.0, -1.0]])
    got = classifier_kd_cls_loss(student, teacher, temperature=1.0, head="sigmoid")
    s = torch.sigmoid(student)
    s = s / s.sum(-1, keepdim=True)
    u = torch.sigmoid(teacher)
    u = u / u.sum(-1, keepdim=True)
    kl0 = float((u[0] * (u[0].log() - s[0].log())).sum())
    assert float(got) == pytest.approx(kl0 / 2, rel=1e-4)  # row 1 identical: KL 0
    zero = classifier_kd_cls_loss(student[:0], teacher[:0], head="sigmoid")
    assert float(zero) == 0.0


def _stem():
    import torchvision

    net = torchvision.models.resnet18(weights=None).eval().requires_grad_(False)
    return torch.nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool), net


def test_kd_loc_zero_at_the_target_and_gradients_reach_only_the_predicted_boxes():
    from kd2.losses.classifier_kd import classifier_kd_loc_loss

    torch.manual_seed(0)
    stem, net = _stem()
    images = torch.rand(2, 3, 48, 64)
    target = torch.tensor([[4.0, 5.0, 30.0, 40.0], [10.0, 8.0, 50.0, 30.0]])
    index = torch.tensor([0, 1])
    same = classifier_kd_loc_loss(
        images, target.clone().requires_grad_(), target, index, stem, size=32
    )
    assert float(same) == 0.0
    pred = (target + torch.tensor([3.0, -2.0, 4.0, 1.0])).requires_grad_()
    images.requires_grad_()
    loss = classifier_kd_loc_loss(images, pred, target, index, stem, size=32)
    pixels_only = classifier_kd_loc_loss(images, pred, target, index, None, size=32)
    assert float(loss) > float(pixels_only) > 0  # the stem term adds a positive part
    loss.backward()
    assert pred.grad is not None and float(pred.grad.abs().sum()) > 0
    assert images.grad is None  # the input is a constant
    assert all(p.grad is None for p in net.parameters())  # the teacher stays frozen
    # moving the prediction onto its target lowers the loss
    with torch.no_grad():
        closer = classifier_kd_loc_loss(images, (pred + target) / 2, target, index, stem, size=32)
    assert float(closer) < float(loss)
    empty = classifier_kd_loc_loss(images, pred[:0], target[:0], index[:0], stem)
    assert float(empty) == 0.0
