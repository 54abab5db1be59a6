"""Decode distillation points with a transformers DETR-family decoder (KD-DETR's consistent
distillation points on RT-DETR, RT-DETRv2, D-FINE and DEIMv2).

KD-DETR (Wang et al., CVPR 2024; Myleswork/KD-DETR on DAB-DETR) feeds one set of query points to
both the teacher's and the student's decoder, so that their answers correspond one to one
without matching. A DAB-DETR query is an anchor box with a zero content vector. An RT-DETR-family
query is a reference box plus a content vector gathered from the encoder memory at the token the
query was selected from (``output_memory.gather(topk_ind)``, detached). kd2 gives a point the
same two things, computed by each network from its own memory:

* the reference box: the point itself (inverse-sigmoid ``cxcywh``, as the model's
  ``init_reference_points``);
* the content: the network's ``enc_output(memory)`` at the token whose anchor the box would
  have been selected from — the level whose anchor size (``0.05 · 2^l`` of the input, the
  models' ``generate_anchors``) is nearest to the box's ``sqrt(w · h)`` in log scale, and the
  cell holding the box centre — detached, as the model detaches its own.

Each group of points is decoded on its own (KD-DETR runs its groups as separate decoder passes),
without the detection queries and without the denoising attention mask.
"""

from __future__ import annotations

from typing import List, Tuple

import torch
from torch import Tensor, nn

__all__ = ["decode_points", "decoder_memory", "point_tokens", "random_points"]

#: the anchor side of level 0 in the models' ``generate_anchors`` (``grid_size``)
ANCHOR_GRID_SIZE = 0.05


def decoder_memory(model: nn.Module, maps: List[Tensor]):
    """The decoder's inputs from the hybrid encoder's output ``maps`` (finest first), as
    ``<Model>Model.forward`` prepares them: ``(source_flatten (N, S, D), spatial_shapes (L, 2),
    spatial_shapes_list, level_start_index (L,), output_memory (N, S, D))``. ``model`` is the
    ``<Model>Model`` (``detector.model``)."""
    sources = [model.decoder_input_proj[level](m) for level, m in enumerate(maps)]
    for level in range(len(sources), int(model.config.num_feature_levels)):
        sources.append(model.decoder_input_proj[level](maps[-1]))
    shapes_list = [tuple(int(v) for v in s.shape[-2:]) for s in sources]
    flat = torch.cat([s.flatten(2).transpose(1, 2) for s in sources], 1)
    shapes = torch.tensor(shapes_list, dtype=torch.long, device=flat.device)
    start = torch.cat((shapes.new_zeros((1,)), shapes.prod(1).cumsum(0)[:-1]))
    _, valid = model.generate_anchors(tuple(shapes_list), device=flat.device, dtype=flat.dtype)
    output_memory = model.enc_output(valid.to(flat.dtype) * flat)
    return flat, shapes, shapes_list, start, output_memory


def point_tokens(boxes: Tensor, shapes_list: List[Tuple[int, int]]) -> Tensor:
    """``(N, P)`` indices into the flattened levels of the token each box ``(N, P, 4)``
    (normalised ``cxcywh``) reads its content from: the level whose anchor size is nearest to
    ``sqrt(w · h)`` (log scale), the cell holding the centre."""
    side = (boxes[..., 2] * boxes[..., 3]).clamp(min=1e-12).sqrt()
    level = torch.round(torch.log2(side / ANCHOR_GRID_SIZE)).clamp(0, len(shapes_list) - 1).long()
    heights = boxes.new_tensor([h for h, _ in shapes_list]).long()
    widths = boxes.new_tensor([w for _, w in shapes_list]).long()
    sizes = heights * widths
    starts = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    h, w = heights[level], widths[level]
    row = (boxes[..., 1] * h).long().clamp(min=0).minimum(h - 1)
    col = (boxes[..., 0] * w).long().clamp(min=0).minimum(w - 1)
    return starts[level] + row * w + col


def random_points(batch: int, count: int, like: Tensor) -> Tensor:
    """``(batch, count, 4)`` random points as KD-DETR draws them each step: inverse-sigmoid boxes
    from a standard normal (``nn.Embedding(count, 4).weight``), i.e. ``sigmoid(z)`` boxes."""
    return torch.randn(batch, count, 4, device=like.device, dtype=like.dtype)


def decode_points(detector: nn.Module, memory_inputs, reference: Tensor) -> Tuple[Tensor, Tensor]:
    """A ``<Model>ForObjectDetection``'s decoder answering the points ``reference`` ``(N, P, 4)``
    (inverse-sigmoid ``cxcywh``) on its decoder inputs ``memory_inputs``
    (:func:`decoder_memory` of its encoder maps, computed once for every group of points):
    ``(logits (L, N, P, K), boxes (L, N, P, 4))`` of its decoder layers (those the record keeps,
    :func:`kd2.hf.record.query_outputs`). Gradients reach the decoder and the encoder through
    the memory, not the points."""
    from .record import query_outputs

    model = detector.model
    flat, shapes, shapes_list, start, memory = memory_inputs
    reference = reference.detach().to(flat.dtype)
    tokens = point_tokens(reference.sigmoid(), shapes_list)
    content = memory.gather(1, tokens[..., None].expand(-1, -1, memory.shape[-1])).detach()
    out = model.decoder(
        inputs_embeds=content,
        encoder_hidden_states=flat,
        encoder_attention_mask=None,
        reference_points=reference,
        spatial_shapes=shapes,
        spatial_shapes_list=shapes_list,
        level_start_index=start,
    )
    answered = query_outputs(detector, out)
    return answered.logits, answered.boxes
