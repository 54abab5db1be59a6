"""LazyConfig teacher for ``lazy_faster_rcnn_R18_DeFeat_quick.py``: the ResNet-34 Faster R-CNN
that experiment loads, trained from scratch (CPU, short side 256 px, builtin coco_2017_*).

    python tools/lazyconfig_train_net.py --config-file \\
        configs/Detectron2-Quick/lazy_faster_rcnn_R34_teacher_quick.py
"""

from .lazy_faster_rcnn_quick_common import (  # noqa: F401 - the LazyConfig's top-level keys
    dataloader,
    faster_rcnn,
    lr_multiplier,
    optimizer,
    train,
)

model = faster_rcnn(34)
train.output_dir = "./output/d2_quick/lazy_teacher_R34"
