"""LazyConfig teacher recipe on the transformers backend: a D-FINE "tiny" (kd2's size preset,
built from its config, nothing downloaded) trained on the builtin coco_2017_* datasets, sized for
CPU (256-px square input). It is the teacher of ``lazy_dfine_pico_KDDETR_quick.py``:

    python tools/lazyconfig_train_net.py --config-file \\
        configs/Detectron2-Quick/lazy_dfine_tiny_teacher_quick.py
"""

from .lazy_dfine_quick_common import (  # noqa: F401 - the LazyConfig's top-level keys
    dataloader,
    dfine,
    lr_multiplier,
    optimizer,
    train,
)

model = dfine("tiny")
train.output_dir = "./output/d2_quick/lazy_teacher_dfine_tiny"
