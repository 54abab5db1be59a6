"""Two processes on Detectron2 (``tools/train_net.py --num-gpus 2`` on CPU: gloo) end with
identical replicas, plain and distilled (skipped where detectron2 is not installed).

Detectron2 wraps the model in DDP with ``broadcast_buffers=False``, so without
:func:`kd2.d2.engine.replica_sync_hook` the BatchNorm running statistics of the two ranks differ
(each rank normalises its own images); the synthetic configs use trainable BatchNorm, so the
buffer checksums below would differ without it.
"""

from __future__ import annotations

import math
import os
import re

import pytest
import torch

pytest.importorskip("detectron2", reason="detectron2 is not installed (see README)")

from detectron2.checkpoint import DetectionCheckpointer  # noqa: E402
from detectron2.config import get_cfg  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402

from kd2.d2 import add_kd_config  # noqa: E402
from tests.helpers import REPO, run_cli  # noqa: E402

SYN = os.path.join(REPO, "configs", "Detectron2-Synthetic")
CHECKSUM = re.compile(r"rank (\d) final parameter checksum (\S+) buffer checksum (\S+)")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from kd2.data import generate_synthetic_dataset

    root = tmp_path_factory.mktemp("d2_mp_data")
    paths = generate_synthetic_dataset(str(root), num_train=12, num_val=4, image_size=64)
    return (
        f"{paths['train_json']}:{paths['train_image_root']}",
        f"{paths['val_json']}:{paths['val_image_root']}",
    )


def tiny_overrides(out, train, test=None):
    return [
        "SOLVER.MAX_ITER",
        "4",
        "SOLVER.STEPS",
        "(3,)",
        "SOLVER.WARMUP_ITERS",
        "1",
        "SOLVER.IMS_PER_BATCH",
        "4",  # 2 images per process
        "SOLVER.CHECKPOINT_PERIOD",
        "2",
        "INPUT.MIN_SIZE_TRAIN",
        "(64,)",
        "INPUT.MAX_SIZE_TRAIN",
        "64",
        "INPUT.MIN_SIZE_TEST",
        "64",
        "INPUT.MAX_SIZE_TEST",
        "64",
        "DATASETS.TRAIN",
        f"('{train}',)",
        "DATASETS.TEST",
        f"('{test}',)" if test else "()",
        "OUTPUT_DIR",
        str(out),
    ]


def rank_checksums(out) -> dict:
    """``{rank: (parameter checksum, buffer checksum)}`` from ``log.txt`` / ``log.txt.rank1``."""
    found = {}
    for name in ("log.txt", "log.txt.rank1"):
        text = (out / name).read_text()
        matches = CHECKSUM.findall(text)
        assert len(matches) == 1, f"{name}: {matches}\n{text[-3000:]}"
        rank, params, buffers = matches[0]
        found[int(rank)] = (params, buffers)
    assert sorted(found) == [0, 1], found
    return found


def train_two_processes(config, overrides):
    r = run_cli(["--config-file", config, "--num-gpus", "2", *overrides], timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-5000:]
    return r


def d2_cfg(config, *opts):
    cfg = get_cfg()
    add_kd_config(cfg)
    cfg.merge_from_file(config)
    cfg.merge_from_list(list(opts))
    return cfg


def test_two_processes_end_with_identical_replicas_and_save_them(tmp_path, tiny):
    config = os.path.join(SYN, "faster_rcnn_R18_FPN_student.yaml")
    assert d2_cfg(config).MODEL.RESNETS.NORM == "BN"  # buffers that training changes
    out = tmp_path / "out"
    train_two_processes(config, tiny_overrides(out, tiny[0]))
    sums = rank_checksums(out)
    assert sums[0] == sums[1], sums

    # the saved model is the replicas' model: rank 0's buffers were broadcast before the save
    model = build_model(d2_cfg(config))
    DetectionCheckpointer(model).load(str(out / "model_final.pth"))
    params = sum(float(p.detach().double().sum()) for p in model.parameters())
    buffers = sum(float(b.detach().double().sum()) for b in model.buffers())
    assert math.isclose(params, float(sums[0][0]), rel_tol=1e-9), (params, sums)
    assert math.isclose(buffers, float(sums[0][1]), rel_tol=1e-9), (buffers, sums)


def test_two_processes_distilled_defeat_identical_replicas_and_evaluates(tmp_path, tiny):
    teacher_cfg = d2_cfg(os.path.join(SYN, "faster_rcnn_R34_FPN_teacher.yaml"))
    torch.manual_seed(0)
    DetectionCheckpointer(build_model(teacher_cfg), save_dir=str(tmp_path)).save("teacher")
    out = tmp_path / "out"
    overrides = tiny_overrides(out, tiny[0], tiny[1])
    overrides += ["TEST.EVAL_PERIOD", "2", "KD.TEACHER.WEIGHTS", str(tmp_path / "teacher.pth")]
    overrides += ["KD.PREFLIGHT.ENABLED", "False"]  # a random teacher (the check has its own tests)
    r = train_two_processes(os.path.join(SYN, "faster_rcnn_R18_FPN_DeFeat.yaml"), overrides)
    sums = rank_checksums(out)
    assert sums[0] == sums[1], sums
    log = (out / "log.txt").read_text()
    assert log.count("copypaste: AP,AP50") == 2, (r.stdout + r.stderr)[-3000:]  # iter 2 + final
    assert "kd" in torch.load(out / "model_final.pth", weights_only=False)
