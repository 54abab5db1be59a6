"""LazyConfig experiment on the transformers backend: a D-FINE "pico" student distilled from the
D-FINE "tiny" teacher of ``lazy_dfine_tiny_teacher_quick.py`` with KD-DETR (both decoders answer
the teacher's queries and random points) and PKD on the hybrid encoder's maps, in Detectron2's
LazyConfig flow (its data loaders, evaluator, hooks and checkpointer):

    python tools/lazyconfig_train_net.py --config-file \\
        configs/Detectron2-Quick/lazy_dfine_tiny_teacher_quick.py
    python tools/lazyconfig_train_net.py --config-file \\
        configs/Detectron2-Quick/lazy_dfine_pico_KDDETR_quick.py
"""

from detectron2.config import LazyCall as L

from kd2.d2.lazy import kd_config, load_teacher
from kd2.lazyconfig import DistillTransformersDetector

from .lazy_dfine_quick_common import (  # noqa: F401 - the LazyConfig's top-level keys
    dataloader,
    dfine,
    lr_multiplier,
    optimizer,
    train,
)

model = dfine("pico")
model._target_ = DistillTransformersDetector
model.teacher = L(load_teacher)(
    model=dfine("tiny"), weights="./output/d2_quick/lazy_teacher_dfine_tiny/model_final.pth"
)
model.kd_cfg = L(kd_config)(
    METHODS=["KDDETR", "PKD"],
    # a 100-iteration teacher is at ≈ 0 AP by design: the pre-flight check reports it, no stop
    PREFLIGHT={"MIN_TEACHER_AP": 0.0},
)
train.output_dir = "./output/d2_quick/lazy_KDDETR_dfine_pico"
