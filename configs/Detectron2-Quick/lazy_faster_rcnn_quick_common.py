"""What the quick LazyConfig teacher and experiment share: the Faster R-CNN builder, the data
(builtin coco_2017_*, short side 256 px), the optimizer and the 100-iteration schedule. The
teacher that ``lazy_faster_rcnn_R34_teacher_quick.py`` trains is ``faster_rcnn(34)``, the very
network ``lazy_faster_rcnn_R18_DeFeat_quick.py`` loads as its teacher."""

import copy

import detectron2.data.transforms as T
from detectron2.config import LazyCall as L
from detectron2.model_zoo import get_config


def faster_rcnn(depth):
    m = copy.deepcopy(get_config("common/models/mask_rcnn_fpn.py").model)
    for key in ("mask_in_features", "mask_pooler", "mask_head"):  # Faster R-CNN: no mask head
        m.roi_heads.pop(key)
    m.backbone.bottom_up.stages.depth = depth
    m.backbone.bottom_up.stages.pop("stride_in_1x1")  # basic blocks take no such argument
    m.backbone.bottom_up.stages.norm = "BN"
    m.backbone.bottom_up.stem.norm = "BN"
    m.roi_heads.num_classes = 80
    m.roi_heads.batch_size_per_image = 128
    m.proposal_generator.post_nms_topk = (300, 300)
    return m


dataloader = get_config("common/data/coco.py").dataloader
dataloader.train.mapper.use_instance_mask = False
dataloader.train.mapper.augmentations = [
    L(T.ResizeShortestEdge)(short_edge_length=(256,), max_size=384, sample_style="choice"),
    L(T.RandomFlip)(horizontal=True),
]
dataloader.train.total_batch_size = 2
dataloader.train.num_workers = 0
dataloader.test.mapper.augmentations = [L(T.ResizeShortestEdge)(short_edge_length=256, max_size=384)]
dataloader.test.num_workers = 0

optimizer = get_config("common/optim.py").SGD
optimizer.lr = 0.005

lr_multiplier = get_config("common/coco_schedule.py").lr_multiplier_1x
lr_multiplier.scheduler.milestones = [70, 90]
lr_multiplier.scheduler.num_updates = 100
lr_multiplier.warmup_length = 0.1

train = get_config("common/train.py").train
train.device = "cpu"
train.max_iter = 100
train.init_checkpoint = ""
train.checkpointer.period = 50
train.eval_period = 0
