"""LazyConfig experiment: a ResNet-18 Faster R-CNN student distilled from a ResNet-34 teacher
with DeFeat, sized for CPU (short side 256 px) on the builtin coco_2017_* datasets. Train the
teacher first with ``lazy_faster_rcnn_R34_teacher_quick.py`` (its default output is the default
``model.teacher.weights`` below):

    python tools/lazyconfig_train_net.py --config-file \\
        configs/Detectron2-Quick/lazy_faster_rcnn_R34_teacher_quick.py
    python tools/lazyconfig_train_net.py --config-file \\
        configs/Detectron2-Quick/lazy_faster_rcnn_R18_DeFeat_quick.py
"""

from detectron2.config import LazyCall as L

from kd2.d2 import DistillGeneralizedRCNN
from kd2.d2.lazy import kd_config, load_teacher

from .lazy_faster_rcnn_quick_common import (  # noqa: F401 - the LazyConfig's top-level keys
    dataloader,
    faster_rcnn,
    lr_multiplier,
    optimizer,
    train,
)

model = faster_rcnn(18)
model._target_ = DistillGeneralizedRCNN
model.teacher = L(load_teacher)(
    model=faster_rcnn(34), weights="./output/d2_quick/lazy_teacher_R34/model_final.pth"
)
model.kd_cfg = L(kd_config)(
    METHODS=["DeFeat"],
    DEFEAT={"NECK_FG_WEIGHT": 1.0, "NECK_BG_WEIGHT": 0.25, "HEAD_POS_WEIGHT": 0.0,
            "HEAD_NEG_WEIGHT": 0.0},
    # a 100-iteration teacher is at ≈ 0 AP by design: the pre-flight check reports it, no stop
    PREFLIGHT={"MIN_TEACHER_AP": 0.0},
)
train.output_dir = "./output/d2_quick/lazy_DeFeat_R18"
