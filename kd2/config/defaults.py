"""kd2's config schema: a yacs ``CfgNode`` with Detectron2's key names.

``MODEL`` / ``INPUT`` / ``DATASETS`` / ``DATALOADER`` / ``SOLVER`` / ``TEST`` follow Detectron2.
The ``KD`` section is backend-independent and shared with the Detectron2 integration.

Backend notes (torchvision): ``MODEL.PIXEL_MEAN``/``PIXEL_STD`` are RGB in [0, 1] units (the
torchvision convention), and ``INPUT.*`` sizes drive torchvision's ``GeneralizedRCNNTransform``.
"""

from fvcore.common.config import CfgNode as CN

_C = CN()
_C.VERSION = 2

_C.MODEL = CN()
_C.MODEL.BACKEND = "torchvision"
# "FasterRCNN" | "RetinaNet" | "FCOS" | "SSD"; with KD.METHODS non-empty the KD subclass is used.
_C.MODEL.META_ARCHITECTURE = "FasterRCNN"
_C.MODEL.DEVICE = "cpu"
# A local checkpoint path; nothing is ever downloaded.
_C.MODEL.WEIGHTS = ""
_C.MODEL.PIXEL_MEAN = [0.485, 0.456, 0.406]
_C.MODEL.PIXEL_STD = [0.229, 0.224, 0.225]

_C.MODEL.BACKBONE = CN()
# resnet18 | resnet34 | resnet50 | resnet101 | mobilenet_v3_large | dinov2_vit (a DINOv2-
# architecture ViT from VIT below, kd2/tv/vit_backbone.py; needs transformers)
_C.MODEL.BACKBONE.NAME = "resnet50"
# Number of trainable backbone stages (torchvision's trainable_layers, 0..5).
_C.MODEL.BACKBONE.TRAINABLE_LAYERS = 5
# "BN" (trainable BatchNorm, for from-scratch training) or "FrozenBN".
_C.MODEL.BACKBONE.NORM = "BN"
# The dinov2_vit backbone (transformers' Dinov2Model, random init): its patch tokens after the
# final norm make one map of stride PATCH_SIZE, and a ViTDet-style simple pyramid (transposed
# convs / max pools) + FPN make the detector's levels. IMAGE_SIZE sizes the position embeddings
# (interpolated to any input). A trained one teaches as a foundation teacher (KD.TEACHER.BACKEND
# foundation with its config and weights).
_C.MODEL.BACKBONE.VIT = CN()
_C.MODEL.BACKBONE.VIT.PATCH_SIZE = 8
_C.MODEL.BACKBONE.VIT.HIDDEN_SIZE = 192
_C.MODEL.BACKBONE.VIT.DEPTH = 6
_C.MODEL.BACKBONE.VIT.NUM_HEADS = 3
_C.MODEL.BACKBONE.VIT.MLP_RATIO = 4
_C.MODEL.BACKBONE.VIT.IMAGE_SIZE = 128
_C.MODEL.BACKBONE.VIT.DROP_PATH = 0.0

_C.MODEL.FPN = CN()
_C.MODEL.FPN.OUT_CHANNELS = 256

_C.MODEL.ANCHOR_GENERATOR = CN()
# One list per FPN level; empty = the architecture's torchvision default.
_C.MODEL.ANCHOR_GENERATOR.SIZES = []
_C.MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS = [[0.5, 1.0, 2.0]]

_C.MODEL.RPN = CN()
_C.MODEL.RPN.PRE_NMS_TOPK_TRAIN = 2000
_C.MODEL.RPN.PRE_NMS_TOPK_TEST = 1000
_C.MODEL.RPN.POST_NMS_TOPK_TRAIN = 2000
_C.MODEL.RPN.POST_NMS_TOPK_TEST = 1000
_C.MODEL.RPN.NMS_THRESH = 0.7
_C.MODEL.RPN.BATCH_SIZE_PER_IMAGE = 256
_C.MODEL.RPN.POSITIVE_FRACTION = 0.5

_C.MODEL.ROI_HEADS = CN()
_C.MODEL.ROI_HEADS.NUM_CLASSES = 80
_C.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 512
_C.MODEL.ROI_HEADS.POSITIVE_FRACTION = 0.25
_C.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.05
_C.MODEL.ROI_HEADS.NMS_THRESH_TEST = 0.5
_C.MODEL.ROI_BOX_HEAD = CN()
_C.MODEL.ROI_BOX_HEAD.FC_DIM = 1024

_C.MODEL.RETINANET = CN()
_C.MODEL.RETINANET.NUM_CLASSES = 80
_C.MODEL.RETINANET.SCORE_THRESH_TEST = 0.05
_C.MODEL.RETINANET.NMS_THRESH_TEST = 0.5
_C.MODEL.RETINANET.TOPK_CANDIDATES_TEST = 1000

_C.MODEL.FCOS = CN()
_C.MODEL.FCOS.NUM_CLASSES = 80
_C.MODEL.FCOS.SCORE_THRESH_TEST = 0.2
_C.MODEL.FCOS.NMS_THRESH_TEST = 0.6
_C.MODEL.FCOS.CENTER_SAMPLING_RADIUS = 1.5

# GFL (kd2.tv.gfl; no torchvision/Detectron2 original): ATSS assignment, QFL + DFL + GIoU, one
# anchor per location, a square of OCTAVE_BASE_SCALE x stride (MODEL.ANCHOR_GENERATOR is not read).
_C.MODEL.GFL = CN()
_C.MODEL.GFL.NUM_CLASSES = 80
_C.MODEL.GFL.REG_MAX = 16  # distribution bins 0..REG_MAX per side (units of the stride)
_C.MODEL.GFL.OCTAVE_BASE_SCALE = 8
_C.MODEL.GFL.ATSS_TOPK = 9  # ATSS candidates per level and GT
_C.MODEL.GFL.QFL_BETA = 2.0
_C.MODEL.GFL.LOSS_QFL_WEIGHT = 1.0
_C.MODEL.GFL.LOSS_DFL_WEIGHT = 0.25
_C.MODEL.GFL.LOSS_GIOU_WEIGHT = 2.0
_C.MODEL.GFL.SCORE_THRESH_TEST = 0.05
_C.MODEL.GFL.NMS_THRESH_TEST = 0.6
_C.MODEL.GFL.TOPK_CANDIDATES_TEST = 1000

# SSD (torchvision): BACKBONE.NAME "vgg16" = SSD300-VGG16 (SIZE 300, torchvision's
# ssd300_vgg16 layout; set PIXEL_MEAN [0.48235, 0.45882, 0.40784] / PIXEL_STD [1/255] * 3 as its
# builder does), "mobilenet_v3_large" = SSDLite (any SIZE). Softmax head with a background class.
_C.MODEL.SSD = CN()
_C.MODEL.SSD.NUM_CLASSES = 80
_C.MODEL.SSD.SIZE = 300
_C.MODEL.SSD.SCORE_THRESH_TEST = 0.01
_C.MODEL.SSD.NMS_THRESH_TEST = 0.45
_C.MODEL.SSD.TOPK_CANDIDATES_TEST = 400

# DETR-family detectors of Hugging Face transformers (MODEL.BACKEND "transformers",
# MODEL.META_ARCHITECTURE "DETR"; kd2.hf). Built from kd2's size preset, or loaded from a local
# directory the user downloaded (config.json + *.safetensors; kd2 downloads nothing, runs no
# remote code and refuses pickled weights). Images are resized to a square IMAGE_SIZE and read
# in [0, 1] RGB (MODEL.PIXEL_MEAN / PIXEL_STD apply: RT-DETR's and D-FINE's processors do not
# normalise, so their configs set them to 0 / 1).
_C.MODEL.HF = CN()
_C.MODEL.HF.MODEL_TYPE = "d_fine"  # "rt_detr" | "rt_detr_v2" | "d_fine" | "deimv2"
_C.MODEL.HF.PRESET = "tiny"  # "pico" | "tiny" (kd2.hf.models.PRESETS)
_C.MODEL.HF.PRETRAINED_DIR = ""  # a local directory instead of MODEL_TYPE / PRESET
_C.MODEL.HF.NUM_CLASSES = 80
_C.MODEL.HF.IMAGE_SIZE = 640  # square input side, a multiple of 32
_C.MODEL.HF.NUM_QUERIES = 0  # 0 = the preset's
_C.MODEL.HF.NUM_DENOISING = -1  # contrastive-denoising queries in training; -1 = the preset's
_C.MODEL.HF.SCORE_THRESH_TEST = 0.0
_C.MODEL.HF.DETECTIONS_PER_IMAGE = 100  # top (query, class) pairs kept per image

_C.INPUT = CN()
_C.INPUT.MIN_SIZE_TRAIN = (800,)
_C.INPUT.MAX_SIZE_TRAIN = 1333
_C.INPUT.MIN_SIZE_TEST = 800
_C.INPUT.MAX_SIZE_TEST = 1333
_C.INPUT.RANDOM_FLIP = "horizontal"  # "horizontal" | "none"

_C.DATASETS = CN()
_C.DATASETS.TRAIN = ()
_C.DATASETS.TEST = ()
# COCO-format datasets to register by name before the datasets are read: a list of
# [name, json_file, image_root] triples, e.g. [["my_train", "data/train.json", "data/images"]]
# (command line: DATASETS.REGISTER "[['my_train','data/train.json','data/images']]"). Relative
# paths are relative to the current directory (like "instances.json:image_dir" names, which
# need no registration). Registering a name again with the same files is a no-op; a builtin's
# name or other files under a registered name is an error. Shared with the Detectron2 backend.
_C.DATASETS.REGISTER = []

_C.DATALOADER = CN()
_C.DATALOADER.NUM_WORKERS = 0
# A truncated/corrupt image file: "error" stops with an error naming the file; "skip" replaces
# it (training only, deterministically: the next decodable index) and logs a running count.
# Evaluation never skips. See kd2.data.loader.
_C.DATALOADER.CORRUPT_IMAGES = "error"  # "error" | "skip"

_C.SOLVER = CN()
_C.SOLVER.MAX_ITER = 40000
_C.SOLVER.BASE_LR = 0.02
_C.SOLVER.MOMENTUM = 0.9  # SGD only
_C.SOLVER.OPTIMIZER = "SGD"  # "SGD" | "AdamW" (the DETR family's)
# the backbone's learning rate is BASE_LR x this (RT-DETR / D-FINE train it at 0.1-1x); 1 = one rate
_C.SOLVER.BACKBONE_LR_FACTOR = 1.0
_C.SOLVER.WEIGHT_DECAY = 1e-4
_C.SOLVER.GAMMA = 0.1
_C.SOLVER.STEPS = (30000,)
_C.SOLVER.WARMUP_FACTOR = 1.0 / 1000
_C.SOLVER.WARMUP_ITERS = 1000
_C.SOLVER.IMS_PER_BATCH = 16
_C.SOLVER.CHECKPOINT_PERIOD = 5000
_C.SOLVER.CLIP_GRADIENTS = CN({"ENABLED": False})
_C.SOLVER.CLIP_GRADIENTS.CLIP_TYPE = "norm"  # "norm" | "value"
_C.SOLVER.CLIP_GRADIENTS.CLIP_VALUE = 10.0
_C.SOLVER.CLIP_GRADIENTS.NORM_TYPE = 2.0
_C.SOLVER.AMP = CN({"ENABLED": False})
# The divergence guard (kd2.engine.divergence): stop before the optimizer step when a loss term
# exceeds MAX_LOSS, or the total exceeds FACTOR x its median over the last WINDOW iterations
# (after MIN_ITERS iterations). Like the NaN stop, it writes no checkpoint.
_C.SOLVER.DIVERGENCE = CN({"ENABLED": True})
_C.SOLVER.DIVERGENCE.MAX_LOSS = 1e4
_C.SOLVER.DIVERGENCE.FACTOR = 50.0
_C.SOLVER.DIVERGENCE.WINDOW = 50
_C.SOLVER.DIVERGENCE.MIN_ITERS = 20
# Learning rate and batch size (see kd2.engine.batch_scaling). BASE_LR_BATCH_SIZE is the
# IMS_PER_BATCH that BASE_LR was set for: when unset in a file it follows the IMS_PER_BATCH in
# effect where BASE_LR is set (a config file of the _BASE_ chain or an override). A run whose
# learning rate per image is more than 2x off warns with the linearly scaled BASE_LR, or applies
# it with SCALE_LR_WITH_BATCH True.
_C.SOLVER.BASE_LR_BATCH_SIZE = 16
_C.SOLVER.SCALE_LR_WITH_BATCH = False
# Detectron2's convention: when non-zero and different from the number of processes, scale
# IMS_PER_BATCH and BASE_LR by (processes / REFERENCE_WORLD_SIZE) and the iteration counts
# (MAX_ITER, STEPS, WARMUP_ITERS, CHECKPOINT_PERIOD, TEST.EVAL_PERIOD) by its inverse.
_C.SOLVER.REFERENCE_WORLD_SIZE = 0
# Iterations between metrics.json lines (and log lines when the progress bar is off; the first
# 5 iterations are always logged).
_C.SOLVER.LOG_PERIOD = 20

_C.TEST = CN()
# 0 = evaluate only at the end of training.
_C.TEST.EVAL_PERIOD = 0
_C.TEST.DETECTIONS_PER_IMAGE = 100
# COCO evaluation: "pycocotools" (the reference), "faster_coco_eval" (the same metrics, a C++
# core, ~5x faster on the COCO subset: docs/export.md, "Faster evaluation"), or "auto" =
# faster_coco_eval where it is installed (a kd2 dependency), else pycocotools.
_C.TEST.COCO_EVAL_BACKEND = "auto"

_C.OUTPUT_DIR = "./output"
_C.SEED = 0

# ---------------------------------------------------------------------------------------------
# Knowledge distillation (backend-independent; shared with the Detectron2 integration).
# ---------------------------------------------------------------------------------------------
_C.KD = CN()
# Names registered in kd2.losses.KD_METHOD_REGISTRY, e.g. ["DeFeat", "Hinton"]. Empty = no KD.
_C.KD.METHODS = []
# KD losses are scaled by min(1, iter / WARMUP_ITERS); 0 disables the warm-up.
_C.KD.WARMUP_ITERS = 0
# Evaluate the teacher once before distillation starts and log/report its AP.
_C.KD.EVAL_TEACHER = False
_C.KD.TEACHER = CN()
# The teacher's own config file (a kd2 yaml) and its trained weights (a local path).
_C.KD.TEACHER.CONFIG = ""
_C.KD.TEACHER.WEIGHTS = ""
# The teacher's framework: "" = the student's, "torchvision", "detectron2", "transformers" (a
# Detectron2 config file or model-zoo name and weights for a torchvision student, a kd2 yaml for
# the others) or "foundation" (a backbone-only DINOv2 / DINOv3 / timm teacher: FOUNDATION below).
# The teacher reads the student's batch in its own input convention.
_C.KD.TEACHER.BACKEND = ""
# A cheaper teacher forward (kd2/modeling/teacher_runtime.py): the precision of its backbone + FPN
# ("float32", "bfloat16" — CPUs and GPUs —, "float16" — CUDA only), channels-last memory format,
# torch.compile of the backbone. Its maps reach the losses in float32 whatever the DTYPE.
_C.KD.TEACHER.DTYPE = "float32"
_C.KD.TEACHER.CHANNELS_LAST = False
_C.KD.TEACHER.COMPILE = False
# A teacher cache built by tools/cache_teacher.py for this config (kd2/engine/teacher_cache.py):
# training (kd2's loop and Detectron2's KDTrainer) reads the teacher's features and dense-head /
# RPN outputs from it instead of running the teacher, for every batch it holds exactly (each
# image and flip at its recorded size); other batches run live. A cache of another teacher,
# config, dataset or kd2 version is refused. "" = the teacher runs live.
_C.KD.TEACHER.CACHE = ""
# A backbone-only foundation-model teacher (KD.TEACHER.BACKEND "foundation", kd2/foundation):
# CONFIG a transformers DINOv2 / DINOv2-with-registers / DINOv3 ViT / DINOv3 ConvNeXt directory
# (config.json) or "timm:<architecture>", WEIGHTS a local .safetensors file ("" = the directory's
# model.safetensors). It has no classes or head: the feature methods (DSI, PKD, CWD, MGD, FitNet,
# ...) read its maps, resampled onto the student's FPN strides.
_C.KD.TEACHER.FOUNDATION = CN()
# The maps read: a ViT's block indices (1-based, negative from the last; [] = the last block,
# through the model's final norm, CLS and register tokens split off), a ConvNeXt's stages (1..4,
# strides 4/8/16/32; [] = all), a timm model's out_indices ([] = timm's default; a ViT: its last).
_C.KD.TEACHER.FOUNDATION.LAYERS = []
# The student strides the maps are resampled to, one map each from the nearest native stride
# ([] = each native stride rounded to a power of two: a ViT/14 gives 16, a ViT/16 at INPUT_SCALE
# 0.5 gives 32). Several ViT LAYERS: one stride per layer, in order.
_C.KD.TEACHER.FOUNDATION.STRIDES = []
# The student's batch is scaled by this factor before the teacher (0.5 = a 2x2 average pool, as
# RT-DETRv4 feeds DINOv3 at half resolution), then padded to a multiple of the patch size.
_C.KD.TEACHER.FOUNDATION.INPUT_SCALE = 1.0
# The teacher's RGB normalisation in [0, 1] units ([] = the directory's preprocessor_config.json,
# timm's pretrained config, else ImageNet's).
_C.KD.TEACHER.FOUNDATION.PIXEL_MEAN = []
_C.KD.TEACHER.FOUNDATION.PIXEL_STD = []
# More teachers, by name: KD.TEACHERS.<NAME>.{CONFIG, WEIGHTS, BACKEND}; a method learns from one
# with KD.<METHOD>.TEACHER "<NAME>" ("" = KD.TEACHER). Each teacher runs only the parts its
# methods read. Example: KD.TEACHERS.FCOS.CONFIG "configs/synthetic/fcos_R18_teacher.yaml".
_C.KD.TEACHERS = CN(new_allowed=True)
# Diagnostics: every PERIOD iterations each loss_kd_* term's, the detection losses' and the KD
# terms' sum's ("kd") gradient at the student's trunk (backbone + FPN): norm, share, cosine with
# the detection gradient -> metrics.json / TensorBoard (grad_norm/, grad_share/, grad_cos/).
# Under KD.BALANCE grad_share they run at the controller's updates instead: per term at those on
# a multiple of PERIOD, the KD sum only at the others (two trunk backward passes).
# tools/plot_kd_diagnostics.py OUTPUT_DIR draws them. 0 = off.
_C.KD.DIAG = CN()
_C.KD.DIAG.PERIOD = 50
# Pre-flight check before the first step of a distillation run: the teacher's AP on VAL_IMAGES
# images of DATASETS.TEST[0] (below MIN_TEACHER_AP, in AP points, the run stops: set 0 to accept
# any teacher), teacher/student input and classes, each KD term's value and gradient share on
# BATCHES training batches -> a table in the log and OUTPUT_DIR/preflight.json.
_C.KD.PREFLIGHT = CN()
_C.KD.PREFLIGHT.ENABLED = True
_C.KD.PREFLIGHT.BATCHES = 2
_C.KD.PREFLIGHT.VAL_IMAGES = 24
_C.KD.PREFLIGHT.MIN_TEACHER_AP = 1.0
# Automatic gradient-share control (kd2/modeling/balance.py): "none" keeps the methods' own
# weights; "grad_share" multiplies all loss_kd_* terms by one factor, adapted every PERIOD
# iterations (from WARMUP on) to keep the distillation's share of the trunk gradient,
# ||g_kd|| / (||g_kd|| + ||g_detection||) with g_kd the gradient of the loss_kd_* terms' sum
# (grad_share/kd), inside [LOW, HIGH]. The multiplier is
# logged (kd_multiplier/<term>) and checkpointed. The band is where the bundled pairs' helpful
# methods sit (CWD 0.92, PKD 0.76 on Faster R-CNN) and the unhelpful ones do not (MGD 0.06,
# diverging DeFeat > 0.9): docs/balance_and_diagnostics.md.
_C.KD.BALANCE = CN()
_C.KD.BALANCE.MODE = "none"
_C.KD.BALANCE.PERIOD = 20
_C.KD.BALANCE.WARMUP = 20
_C.KD.BALANCE.LOW = 0.5
_C.KD.BALANCE.HIGH = 0.9
# Where a share outside the band is sent: "middle" (kd2's default: half the way, in odds, to the
# band's middle per update), "nearest" (RT-DETRv4's GAM rule: the whole odds ratio to the nearest
# bound, clipped to 10x per update) or "minimal" (the multiplier nearest to 1 that keeps the share
# in the band, re-evaluated inside the band too, so the methods' own weights come back when they
# fit). docs/balance_and_diagnostics.md has them measured side by side.
_C.KD.BALANCE.TARGET = "middle"
# Calibration: on the first batch of a fresh run, before the first optimizer step, measure the
# KD share at the methods' own weights and set the multiplier in closed form so the share starts
# on the TARGET (kd2/modeling/balance.py, "Calibration"): a term that starts far out of scale is
# scaled down from iteration 0, before the divergence guard (SOLVER.DIVERGENCE) sees it. Not on
# resume (the multiplier comes from the checkpoint). False: the first update at WARMUP.
_C.KD.BALANCE.CALIBRATE = True
# Teacher-initialised student (FGD's / MGD's "inheriting strategy"): copy the teacher's weights
# into the student wherever names and shapes match, for these parts: "backbone", "neck" (the FPN),
# "head" (the dense head, or the RPN + ROI heads of a two-stage detector), or any state-dict name
# prefix. Every tensor copied or skipped is logged. Empty = no inheritance.
_C.KD.INHERIT_TEACHER = []

_C.KD.HINTON = CN()
_C.KD.HINTON.WEIGHT = 1.0
_C.KD.HINTON.TEMPERATURE = 2.0
_C.KD.HINTON.HEAD = "auto"  # "auto" | "roi" | "dense"
_C.KD.HINTON.CLASS_MEAN = False

_C.KD.FITNET = CN()
_C.KD.FITNET.WEIGHT = 1.0
_C.KD.FITNET.ADAPTER_KERNEL = 3

# FGFI, FPN port of DeFeat (ggjy/DeFeat.pytorch): per-level masks by the 56-px rule, each level
# normalised by max(1, 2*C*sum(M)), mean over levels. WEIGHT 3 = the port's hint_neck_w
# (configs/kd_faster_rcnn/voc_stu_faster_rcnn_r50_FGFI.py); the paper's single-map 0.01 does not
# carry over to that normaliser.
_C.KD.FGFI = CN()
_C.KD.FGFI.WEIGHT = 3.0
_C.KD.FGFI.PSI = 0.5
_C.KD.FGFI.ADAPTER_KERNEL = 3

_C.KD.DEFEAT = CN()
_C.KD.DEFEAT.NECK_FG_WEIGHT = 3.0
_C.KD.DEFEAT.NECK_BG_WEIGHT = 12.0
_C.KD.DEFEAT.HEAD_POS_WEIGHT = 2.0
_C.KD.DEFEAT.HEAD_NEG_WEIGHT = 2.0
_C.KD.DEFEAT.T_POS = 1.0
_C.KD.DEFEAT.T_NEG = 1.0
_C.KD.DEFEAT.ADAPTER_KERNEL = 3

# FRS (feature richness score). WEIGHT_FEAT (alpha) / WEIGHT_CLS (beta) < 0 = the paper's value
# for the detector: Faster R-CNN 0.002 / 0.1, RetinaNet 0.005 / 0.02, FCOS 0.01 / 0.05.
_C.KD.FRS = CN()
_C.KD.FRS.WEIGHT_FEAT = -1.0
_C.KD.FRS.WEIGHT_CLS = -1.0
_C.KD.FRS.WARMUP_ITERS = 500
_C.KD.FRS.ADAPTER_KERNEL = 3
# Head BCE: False = the released F.binary_cross_entropy on fp32 sigmoids (logs clamped at -100,
# no gradient at saturated student logits); True = the stable binary_cross_entropy_with_logits.
_C.KD.FRS.BCE_FROM_LOGITS = False

_C.KD.RM = CN()
_C.KD.RM.WEIGHT = 4.0
_C.KD.RM.TEMPERATURE = 1.0

_C.KD.PFI = CN()
_C.KD.PFI.WEIGHT = 1.5
# Detach the prediction-difference factor (a pure weight); the 3P code does not detach it.
_C.KD.PFI.DETACH_PREDICTION = True
# 0 = no adapter (identity; needs equal channels), 1 or 3 = Conv adapter kernel.
_C.KD.PFI.ADAPTER_KERNEL = 0

# Global Knowledge (prototypes + robust distilling, ECCV 2022); defaults = the released config.
_C.KD.GLOBALKD = CN()
_C.KD.GLOBALKD.FG_WEIGHT = 1.0
_C.KD.GLOBALKD.BG_WEIGHT = 4.0
# eta-weighted soft labels, T = 2 (two-stage: positive ROIs; one-stage: positive anchors).
_C.KD.GLOBALKD.SOFT_WEIGHT = 1.0
_C.KD.GLOBALKD.TEMPERATURE = 2.0
# 1 - epoch / num_epochs on the feature (and global) terms.
_C.KD.GLOBALKD.ATTENUATION = True
# The paper's explicit global-knowledge loss; the released code never adds it (False).
_C.KD.GLOBALKD.GLOBAL_LOSS = False
_C.KD.GLOBALKD.GLOBAL_WEIGHT = 5.0
_C.KD.GLOBALKD.ADAPTER_KERNEL = 3
# PGM: prototypes per class and level, cross-space weight alpha, density bandwidth / quantile.
_C.KD.GLOBALKD.NUM_PROTOTYPES = 10
_C.KD.GLOBALKD.ALPHA = 10.0
_C.KD.GLOBALKD.BANDWIDTH = 0.1
_C.KD.GLOBALKD.QUANTILE = 0.4
# PGM data: training GT boxes strictly larger than MIN_BOX_SIZE x MIN_BOX_SIZE original pixels
# (width and height > 30, the released _filter_predictions), at most
# MAX_IMAGES_PER_CLASS images per class drawn once with SEED.
_C.KD.GLOBALKD.MIN_BOX_SIZE = 30
_C.KD.GLOBALKD.MAX_IMAGES_PER_CLASS = 800
_C.KD.GLOBALKD.SEED = 1
# Refresh period in iterations; 0 = one epoch (len(DATASETS.TRAIN) / IMS_PER_BATCH).
_C.KD.GLOBALKD.REFRESH_PERIOD = 0
# Images per forward pass while extracting PGM instance features.
_C.KD.GLOBALKD.BATCH_SIZE = 8

# Feature methods of wave 2. STRIDES: the FPN strides to distil; empty = the released configs'
# levels for the detector (Faster R-CNN P2-P5, one-stage P3-P7, unless a method says otherwise).
# A negative weight or temperature = the method's published value for the detector.

# CWD (channel-wise distillation, ICCV 2021): per-channel spatial softmax at TAU, KL(t || s).
# RECIPE "neck" = the FPN outputs (mmrazor 1.x: weight 10 per level, 5 levels); "logits" = the
# dense head's classification logits (the 0.x GFL recipe behind the published 41.9: weight 5, one-
# stage only); "auto" = neck for Faster R-CNN and RetinaNet, logits for FCOS.
_C.KD.CWD = CN()
_C.KD.CWD.RECIPE = "auto"
_C.KD.CWD.WEIGHT = -1.0
_C.KD.CWD.TAU = 1.0
_C.KD.CWD.STRIDES = []

# PKD (Pearson-correlation KD, NeurIPS 2022): MSE of per-channel standardised FPN maps / 2.
# Defaults as the released configs really use them: Faster R-CNN P2-P5 weight 6; one-stage P3-P6
# (P7 is not distilled) weight 10.
_C.KD.PKD = CN()
_C.KD.PKD.WEIGHT = -1.0
_C.KD.PKD.STRIDES = []

# MGD (masked generative distillation, ECCV 2022): a generator per level rebuilds the teacher's
# map from the randomly masked student map. Defaults: one-stage ALPHA 2e-5, MASK_RATIO 0.65 (5
# levels); Faster R-CNN ALPHA 5e-7, MASK_RATIO 0.45 (P2-P5). The released one-stage rows also
# inherit the teacher's neck and head (KD.INHERIT_TEACHER ["neck", "head"]).
_C.KD.MGD = CN()
_C.KD.MGD.ALPHA = -1.0
_C.KD.MGD.MASK_RATIO = -1.0
_C.KD.MGD.STRIDES = []

# DSI (RT-DETRv4's Deep Semantic Injector, kd2/losses/dsi.py): a 1x1 projector from the student's
# FPN map to the teacher's feature space, loss mean(1 - cos) per location (RT-DETRv4's code), for
# a foundation-model teacher (KD.TEACHER.BACKEND foundation) or any feature teacher. WEIGHT 5 =
# RT-DETRv4-S; STRIDES [] = every stride both have; SMOOTH_L1_WEIGHT > 0 adds a smooth-L1 term
# (kd2's variant, not in the official code). Recommended with KD.BALANCE.MODE grad_share (RT-DETRv4
# steers this weight by the gradient share: its GAM).
_C.KD.DSI = CN()
_C.KD.DSI.WEIGHT = 5.0
_C.KD.DSI.STRIDES = []
_C.KD.DSI.SMOOTH_L1_WEIGHT = 0.0
_C.KD.DSI.SMOOTH_L1_BETA = 1.0

# D-FINE localization KD (kd2/losses/dfine_ld.py): D-FINE's decoupled distillation focal loss
# with a teacher D-FINE / DEIM as the source: its final per-edge distributions teach the paired
# student queries' (Hungarian pairing of the two decoders' last-layer predictions). Needs the same
# max_num_bins / reg_scale / up in both models. WEIGHT 1.5 = D-FINE's and RT-DETRv4's DDF weight.
_C.KD.DFINELD = CN()
_C.KD.DFINELD.WEIGHT = 1.5
_C.KD.DFINELD.TEMPERATURE = 5.0
_C.KD.DFINELD.LAYERS = "all"  # "all" student decoder layers (as GO-LSD) | "last"

# Teach-DETR (kd2/losses/teach_detr.py): the teacher's detections (any detector, any backend)
# scoring >= SCORE_THRESH as a second set of one-to-one targets of a DETR student, through the
# Hungarian criterion, each matched term weighted by the box's score (official SetCriterion,
# is_ensemble). WEIGHT = lambda_ensemble; CLS / BBOX / GIOU = H-Deformable-DETR's 2 / 5 / 2.
_C.KD.TEACHDETR = CN()
_C.KD.TEACHDETR.WEIGHT = 1.0
_C.KD.TEACHDETR.CLS_WEIGHT = 2.0
_C.KD.TEACHDETR.BBOX_WEIGHT = 5.0
_C.KD.TEACHDETR.GIOU_WEIGHT = 2.0
_C.KD.TEACHDETR.SCORE_THRESH = 0.3  # kd2's choice: the official boxes are computed offline
_C.KD.TEACHDETR.ALPHA = 0.25
_C.KD.TEACHDETR.GAMMA = 2.0
# "code": 1 - GIoU * score (the official criterion); "paper": (1 - GIoU) * score
_C.KD.TEACHDETR.GIOU_WEIGHTING = "code"

# DETRDistill (kd2/losses/detr_distill.py, ICCV 2023), the official distiller's three parts:
# Hungarian-matched logits KD per decoder layer (the teacher's predictions as targets; soft-BCE /
# L1 / GIoU at 1 / 5 / 2, the official loss_*_distill and DistillHungarianAssigner weights),
# target-aware feature KD (masks from the teacher's top-TOPK queries, MSE, weight 1) and the
# teacher's queries decoded by the student under the teacher's assignment (GROUP, 2 / 5 / 2).
_C.KD.DETRDISTILL = CN()
_C.KD.DETRDISTILL.WEIGHT = 1.0
_C.KD.DETRDISTILL.CLS_WEIGHT = 1.0
_C.KD.DETRDISTILL.BBOX_WEIGHT = 5.0
_C.KD.DETRDISTILL.GIOU_WEIGHT = 2.0
# student layer l learns the teacher layer as far from the last (is_layer_by_layer_distill);
# False: every student layer learns the teacher's last
_C.KD.DETRDISTILL.LAYER_BY_LAYER = True
_C.KD.DETRDISTILL.FEATURE_WEIGHT = 1.0  # 0 turns the target-aware feature part off
_C.KD.DETRDISTILL.TOPK = 100  # the teacher's (query, class) pairs weighting the mask (max_per_img)
_C.KD.DETRDISTILL.GROUP = True  # the query-prior assignment part (use_teacher_group)
_C.KD.DETRDISTILL.GROUP_CLS_WEIGHT = 2.0
_C.KD.DETRDISTILL.GROUP_BBOX_WEIGHT = 5.0
_C.KD.DETRDISTILL.GROUP_GIOU_WEIGHT = 2.0

# KD-DETR (kd2/losses/kd_detr.py, CVPR 2024): the teacher's and the student's decoders answer the
# same distillation points, the teacher's own selected queries ("specific") and RANDOM_POINTS
# random boxes ("general", sigmoid of a standard normal, drawn each step); every student decoder
# layer learns the teacher's last layer on them: KL (softmax, T = TEMPERATURE) on classes, L1 and
# GIoU on boxes, each point weighted by the teacher's max class sigmoid. Weights = the official
# KDCriterion's (1 / 5 / 2, T 10) and training script's (300 random points). Both DETR-family.
_C.KD.KDDETR = CN()
_C.KD.KDDETR.WEIGHT = 1.0
_C.KD.KDDETR.CLS_WEIGHT = 1.0
_C.KD.KDDETR.BBOX_WEIGHT = 5.0
_C.KD.KDDETR.GIOU_WEIGHT = 2.0
_C.KD.KDDETR.TEMPERATURE = 10.0
_C.KD.KDDETR.TEACHER_POINTS = True
_C.KD.KDDETR.RANDOM_POINTS = 300

# FGD (focal and global distillation, CVPR 2022): foreground / background feature imitation
# weighted by the teacher's attention, attention imitation and a GcBlock relation loss.
# Defaults per detector (ALPHA, BETA, GAMMA, LAMBDA, TEMPERATURE): RetinaNet 1e-3, 5e-4, 5e-4,
# 5e-6, 0.5; Faster R-CNN (P2-P5) 5e-5, 2.5e-5, 5e-5, 5e-7, 0.5; FCOS 1.6e-3, 8e-4, 8e-4, 8e-6,
# 0.8. The released same-family rows inherit the teacher's neck and head.
_C.KD.FGD = CN()
_C.KD.FGD.ALPHA = -1.0
_C.KD.FGD.BETA = -1.0
_C.KD.FGD.GAMMA = -1.0
_C.KD.FGD.LAMBDA = -1.0
_C.KD.FGD.TEMPERATURE = -1.0
_C.KD.FGD.STRIDES = []

# FBKD (attention-guided and non-local distillation, ICLR 2021; "FKD"), the official code's form
# as ported by mmrazor: Faster R-CNN P2-P5 (the published protocol), one-stage P3-P7.
_C.KD.FBKD = CN()
_C.KD.FBKD.MASK_WEIGHT = 7e-5
_C.KD.FBKD.CHANNEL_WEIGHT = 4e-3
_C.KD.FBKD.SPATIAL_WEIGHT = 4e-3
_C.KD.FBKD.NONLOCAL_WEIGHT = 7e-5
_C.KD.FBKD.TEMPERATURE = 0.5
_C.KD.FBKD.STRIDES = []

# RKD (relational KD, CVPR 2019) on the GT instances' pooled FPN features (distance and angle
# potentials, SmoothL1); weights of the Global-Knowledge code's detection RKD.
_C.KD.RKD = CN()
_C.KD.RKD.DISTANCE_WEIGHT = 5.0
_C.KD.RKD.ANGLE_WEIGHT = 10.0

# CrossKD (CVPR 2024): the student's head features after SPLIT conv blocks run through the
# frozen teacher head; its predictions mimic the teacher's. Values < 0 = the released config of
# the student's detector (RetinaNet k 3, cls 1.0, GIoU 1.0; FCOS k 2, cls 0.4, IoU 0.75;
# GFL k 3, cls 1.0, KL 3.0, GIoU 2.0). BOX_WEIGHT is GFL's extra GIoU term.
_C.KD.CROSSKD = CN()
_C.KD.CROSSKD.SPLIT = -1
_C.KD.CROSSKD.CLS_WEIGHT = -1.0
_C.KD.CROSSKD.REG_WEIGHT = -1.0
_C.KD.CROSSKD.BOX_WEIGHT = -1.0
_C.KD.CROSSKD.BETA = 1.0
_C.KD.CROSSKD.REG_TEMPERATURE = 1.0

# GID (CVPR 2021): general instances = top-K boxes by max_c |p_t - p_s| after NMS; feature
# (RoIAlign 10x10, shared 3x3 adapter), relation (RKD distance) and response terms. Weights of the
# author's Detectron2 port. Dense sigmoid heads (RetinaNet, FCOS, GFL).
_C.KD.GID = CN()
_C.KD.GID.FEATURE_WEIGHT = 0.005
_C.KD.GID.RELATION_WEIGHT = 40.0
_C.KD.GID.CLS_WEIGHT = 0.1
_C.KD.GID.REG_WEIGHT = 0.1
_C.KD.GID.TOP_K = 10
_C.KD.GID.PRE_NMS_TOPK = 3000
_C.KD.GID.NMS_THRESH = 0.3
_C.KD.GID.POOL_SIZE = 10
# an anchor's predictions enter the response terms when its IoU with an instance reaches this
_C.KD.GID.MATCH_IOU = 0.5

# LD (CVPR 2022) on a GFL student and teacher: KL of each box side's distribution at T on the
# ATSS positives (weighted by the student's max class score) and on the valuable localisation
# region (VLR_WEIGHT, 0 = off), plus classification KD on the positives (CLS_WEIGHT, 0 = off).
# Weights of the official GFL configs.
_C.KD.LD = CN()
_C.KD.LD.WEIGHT = 0.25
_C.KD.LD.TEMPERATURE = 10.0
_C.KD.LD.VLR_WEIGHT = 0.25
_C.KD.LD.CLS_WEIGHT = 10.0
_C.KD.LD.CLS_TEMPERATURE = 2.0
# ATSS candidates per level and GT for the VLR's IoU threshold (the detector's own topk)
_C.KD.LD.ATSS_TOPK = 9

# BCKD (ICCV 2023) on a dense head (RetinaNet, FCOS, GFL): binary KD of every class score
# (BCE against the teacher's sigmoid, focused by |σ(t) − σ(s)|^BETA) and a GIoU loss between the
# decoded boxes weighted by max_k |σ(t) − σ(s)|, both over the valid locations / N_pos. Weights of
# the official GFL config (TinyTigerPan/BCKD).
_C.KD.BCKD = CN()
_C.KD.BCKD.CLS_WEIGHT = 1.0
_C.KD.BCKD.LOC_WEIGHT = 4.0
_C.KD.BCKD.BETA = 1.0

# Classifier-to-detector distillation (NeurIPS 2021): an image classifier trained on GT crops
# (tools/train_crop_classifier.py) teaches the classification (KD-cls) and box regression
# (KD-loc) of the detector. Needs no detector teacher; composable with detector-teacher methods.
_C.KD.CLASSIFIERKD = CN()
_C.KD.CLASSIFIERKD.TEACHER = CN()
# The classifier checkpoint (the "model_final.pth" written by tools/train_crop_classifier.py).
_C.KD.CLASSIFIERKD.TEACHER.WEIGHTS = ""
# lambda_kc (the KD-cls loss already carries T^2: 0.4 * 4 = 1.6 effective) and lambda_kl.
_C.KD.CLASSIFIERKD.CLS_WEIGHT = 0.4
_C.KD.CLASSIFIERKD.LOC_WEIGHT = 0.15
_C.KD.CLASSIFIERKD.TEMPERATURE = 2.0
# Crop side; 0 = the classifier's training crop size (112 in the paper).
_C.KD.CLASSIFIERKD.CROP_SIZE = 0
# KD-loc's teacher-stem term (pixels 4x4 + stem 8x8, the code's layer=[-1, 0]); False = pixels.
_C.KD.CLASSIFIERKD.LOC_FEATURES = True

# Every detector-teacher method's TEACHER: the name of its teacher in KD.TEACHERS ("" = KD.TEACHER).
for _node in (
    "HINTON", "FITNET", "FGFI", "DEFEAT", "FRS", "RM", "PFI", "GLOBALKD", "CWD", "PKD", "MGD",
    "FGD", "FBKD", "RKD", "CROSSKD", "GID", "LD", "DSI",
):  # fmt: skip
    _C.KD[_node].TEACHER = ""
