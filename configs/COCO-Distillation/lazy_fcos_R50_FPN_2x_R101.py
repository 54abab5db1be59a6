"""FCOS protocol of FRS and RM + PFI on full COCO (algorithms.md §2.2, §3): an FCOS R101-FPN
teacher -> an FCOS R50-FPN student from ImageNet, 2x schedule, as a LazyConfig experiment.

Detectron2's model zoo has no FCOS R101, so train the teacher first with Detectron2's own
``COCO-Detection/fcos_R_50_FPN_1x.py`` at depth 101 (2x), then::

    python tools/lazyconfig_train_net.py --num-gpus 8 --config-file \\
        configs/COCO-Distillation/lazy_fcos_R50_FPN_2x_R101.py \\
        model.teacher.weights=path/to/fcos_R101_2x.pth 'model.kd_cfg.METHODS=[FRS]'

``model.kd_cfg.METHODS`` picks the method: ``[FRS]`` (FCOS weights alpha 0.01 / beta 0.05),
``[RM,PFI]`` (4 / 1.5), ``[CrossKD]`` (k = 2, class KD 0.4, IoU 0.75: the released FCOS recipe,
38.5 -> 41.1 with an R101 2x-ms teacher in the paper), ``[GID]``, or any composition of kd2's
methods.
"""

import copy

from detectron2.config import LazyCall as L
from detectron2.model_zoo import get_config

from kd2.d2 import DistillFCOS
from kd2.d2.lazy import kd_config, load_teacher


def fcos(depth):
    m = copy.deepcopy(get_config("common/models/fcos.py").model)
    m.backbone.bottom_up.stages.depth = depth
    m.backbone.bottom_up.freeze_at = 2
    return m


model = fcos(50)
model._target_ = DistillFCOS
model.teacher = L(load_teacher)(model=fcos(101), weights="")
model.kd_cfg = L(kd_config)(METHODS=["FRS"])

dataloader = get_config("common/data/coco.py").dataloader
dataloader.train.mapper.use_instance_mask = False

optimizer = get_config("common/optim.py").SGD
optimizer.lr = 0.01

lr_multiplier = get_config("common/coco_schedule.py").lr_multiplier_2x

train = get_config("common/train.py").train
train.init_checkpoint = "detectron2://ImageNetPretrained/MSRA/R-50.pkl"
train.max_iter = 180000
train.output_dir = "./output/COCO-Distillation/lazy_fcos_R50_FPN_2x_R101"
