"""GFL protocol on full COCO as a LazyConfig experiment: a GFL R101-FPN teacher -> a GFL R50-FPN
student from ImageNet, 1x schedule (the GFL paper's lr 0.01 at batch 16), kd2's Detectron2 GFL
(:mod:`kd2.d2.gfl`: ATSS, QFL + DFL + GIoU; the same detector as the torchvision backend's).

Neither Detectron2 nor its model zoo has GFL, so train the teacher first, e.g. this file's plain
teacher (``kd2.d2.gfl.gfl_lazy_model(101)``) with Detectron2's ``lazyconfig_train_net.py``, then::

    python tools/lazyconfig_train_net.py --num-gpus 8 --config-file \\
        configs/COCO-Distillation/lazy_gfl_R50_FPN_1x_R101.py \\
        model.teacher.weights=path/to/gfl_R101_1x.pth 'model.kd_cfg.METHODS=[LD]'

``model.kd_cfg.METHODS`` picks the method: ``[LD]`` (the default: LD 0.25 / T 10 on the
positives and the valuable localisation region, class KD 10 / T 2; the paper's GFL-R50 1x row is
40.1 -> 41.1 on the main region, 42.1 with the full scheme), ``[CrossKD]`` (k = 3, KL 3.0 + GIoU
2.0; 40.2 -> 43.7 with an R101 2x-ms teacher in the paper), ``[GID]``, ``[FRS]`` (GFL weights
alpha 0.1 / beta 0.05), ``[CWD]`` (its ``auto`` recipe distils GFL's logits), or a composition.
"""

from detectron2.config import LazyCall as L
from detectron2.model_zoo import get_config

from kd2.d2.gfl import gfl_lazy_model
from kd2.d2.lazy import kd_config, load_teacher
from kd2.d2.meta_arch import DistillGFL


def gfl(depth):
    m = gfl_lazy_model(depth)
    m.backbone.bottom_up.freeze_at = 2
    return m


model = gfl(50)
model._target_ = DistillGFL
model.teacher = L(load_teacher)(model=gfl(101), weights="")
model.kd_cfg = L(kd_config)(METHODS=["LD"])

dataloader = get_config("common/data/coco.py").dataloader
dataloader.train.mapper.use_instance_mask = False

optimizer = get_config("common/optim.py").SGD
optimizer.lr = 0.01

lr_multiplier = get_config("common/coco_schedule.py").lr_multiplier_1x

train = get_config("common/train.py").train
train.init_checkpoint = "detectron2://ImageNetPretrained/MSRA/R-50.pkl"
train.max_iter = 90000
train.output_dir = "./output/COCO-Distillation/lazy_gfl_R50_FPN_1x_R101"
