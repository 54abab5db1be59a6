"""What the quick transformers LazyConfig teacher and experiment share: the D-FINE builder and
AdamW; the data (builtin coco_2017_*, resized by the model to a 256-px square), the 100-iteration
schedule and the train settings are the quick Faster R-CNN recipe's. The teacher that
``lazy_dfine_tiny_teacher_quick.py`` trains is ``dfine("tiny")``, the very network
``lazy_dfine_pico_KDDETR_quick.py`` loads as its teacher."""

from detectron2.config import LazyCall as L
from detectron2.model_zoo import get_config

from kd2.hf.models import build_hf_detector
from kd2.lazyconfig import TransformersDetector

from .lazy_faster_rcnn_quick_common import (  # noqa: F401 - shared top-level keys
    dataloader,
    lr_multiplier,
    train,
)

IMAGE_SIZE = 256


def dfine(preset):
    return L(TransformersDetector)(
        detector=L(build_hf_detector)(model_type="d_fine", preset=preset, num_classes=80),
        image_size=IMAGE_SIZE,
        input_format="BGR",
    )


optimizer = get_config("common/optim.py").AdamW
optimizer.lr = 4e-4
optimizer.weight_decay = 1e-4

