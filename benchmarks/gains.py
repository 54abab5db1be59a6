#!/usr/bin/env python
"""Distillation gains on the bundled pairs, one small JSON file per finished run.

Pairs: ``faster_rcnn``, ``fcos``, ``gfl`` and ``dfine`` (D-FINE, transformers backend) on the
synthetic "ambiguous shapes" data, and
``faster_rcnn_crowded`` and ``fcos_crowded`` on the second benchmark's "crowded" profile (many
4-30 px objects on 256-512 px images, ``configs/synthetic_crowded``).

The ``tools/demo.py`` protocol (same teacher, same student, same schedule, seeds 0 / 1 / 2, COCO
AP on the pair's synthetic val split), run for any number of distilled configs, with every finished
run written to ``benchmarks/results/gains/<pair>/<run>.json`` (AP metrics, config, seed, config
digest, torch version, wall time). A run whose JSON holds the digest of the same full config is
never re-trained, so the table can grow one method at a time::

    python benchmarks/gains.py --pair faster_rcnn \
        --configs configs/synthetic/faster_rcnn_MNv3_CWD.yaml
    python benchmarks/gains.py --pair fcos --configs configs/synthetic/fcos_MNv3_PKD.yaml
    python benchmarks/gains.py --pair faster_rcnn --baselines-only   # teacher + students only
    python benchmarks/gains_table.py --write                         # the tables, docs + projects

Runs are sequential (never two at once: the wall times are recorded). Each run's training output
stays in ``output/bench/<pair>/<run>`` as with ``tools/demo.py``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # gains_table, beside this file
from gains_table import PAIR_SOURCES  # noqa: E402

from kd2.utils.checkpoint import file_sha256  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results", "gains")

#: pair -> (teacher config, baseline student config)
PAIRS = {
    "faster_rcnn": (
        "configs/synthetic/faster_rcnn_R18_teacher.yaml",
        "configs/synthetic/faster_rcnn_MNv3_student.yaml",
    ),
    "fcos": (
        "configs/synthetic/fcos_R18_teacher.yaml",
        "configs/synthetic/fcos_MNv3_student.yaml",
    ),
    # the GFL pair (kd2.tv.gfl): the head-distillation methods' detector (CrossKD, LD)
    "gfl": (
        "configs/synthetic/gfl_R18_teacher.yaml",
        "configs/synthetic/gfl_MNv3_student.yaml",
    ),
    # any teacher for any student: the other pair's teacher, this pair's students (PAIR_SOURCES)
    "fcos_to_faster_rcnn": (
        "configs/synthetic/fcos_R18_teacher.yaml",
        "configs/synthetic/faster_rcnn_MNv3_student.yaml",
    ),
    "faster_rcnn_to_fcos": (
        "configs/synthetic/faster_rcnn_R18_teacher.yaml",
        "configs/synthetic/fcos_MNv3_student.yaml",
    ),
    # the DETR pair (transformers backend): D-FINE tiny teacher, D-FINE pico student
    "dfine": (
        "configs/synthetic/dfine_tiny_teacher.yaml",
        "configs/synthetic/dfine_pico_student.yaml",
    ),
    # across backends and families: a CNN teacher for the DETR student, a DETR teacher for FCOS
    "faster_rcnn_to_dfine": (
        "configs/synthetic/faster_rcnn_R18_teacher.yaml",
        "configs/synthetic/dfine_pico_student.yaml",
    ),
    "dfine_to_fcos": (
        "configs/synthetic/dfine_tiny_teacher.yaml",
        "configs/synthetic/fcos_MNv3_student.yaml",
    ),
    # a foundation-style teacher: a DINOv2-architecture ViT detector trained by kd2 on the
    # bundled data, whose trunk teaches the FCOS students as a backbone-only teacher
    "vit_to_fcos": (
        "configs/synthetic/fcos_ViT_teacher.yaml",
        "configs/synthetic/fcos_MNv3_student.yaml",
    ),
    # pseudo-labels: 75 % of the training labels hidden (synthetic_train_labeled); teacher and
    # baseline learn from the labelled quarter, the distilled rows also from the teacher's
    # pseudo-labels on the hidden images (tools/cache_teacher.py --pseudo-labels)
    "fcos_semi": (
        "configs/synthetic/semi/fcos_R18_teacher.yaml",
        "configs/synthetic/semi/fcos_MNv3_student.yaml",
    ),
    # the second benchmark: many small objects on 256-512 px images (synthetic_crowded_*)
    "faster_rcnn_crowded": (
        "configs/synthetic_crowded/faster_rcnn_R18_teacher.yaml",
        "configs/synthetic_crowded/faster_rcnn_MNv3_student.yaml",
    ),
    "fcos_crowded": (
        "configs/synthetic_crowded/fcos_R18_teacher.yaml",
        "configs/synthetic_crowded/fcos_MNv3_student.yaml",
    ),
}


#: pair -> (the dataset whose images its pseudo-labels label, {pseudo-label file: score
#: threshold}): each file its configs train on is written by ``tools/cache_teacher.py
#: --pseudo-labels`` with the pair's teacher before the runs
PSEUDO_LABELS = {
    "fcos_semi": (
        "synthetic_train_hidden",
        {
            "output/bench/fcos_semi/pseudo_labels.json": 0.5,
            "output/bench/fcos_semi/pseudo_labels_t03.json": 0.3,
        },
    ),
}


def _pseudo_files(cfg) -> list:
    """The pseudo-label files of :data:`PSEUDO_LABELS` that ``cfg``'s DATASETS.TRAIN reads."""
    files = [f for _, by_file in PSEUDO_LABELS.values() for f in by_file]
    return [f for f in files if any(f + ":" in str(t) for t in cfg.DATASETS.TRAIN)]


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _demo():
    spec = importlib.util.spec_from_file_location("kd2_demo", os.path.join(ROOT, "tools/demo.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def result_path(pair: str, run_name: str) -> str:
    return os.path.join(RESULTS, pair, f"{run_name}.json")


def _weights(out_dir: str) -> str:
    return os.path.join(out_dir, "model_final.pth")


def teacher_of(opts: list) -> dict | None:
    """The teacher checkpoint a distilled run read (``KD.TEACHER.WEIGHTS`` in ``opts``): its
    path, sha256 and the AP its own run measured (``demo_result.json`` beside it)."""
    if "KD.TEACHER.WEIGHTS" not in opts:
        return None
    weights = str(opts[opts.index("KD.TEACHER.WEIGHTS") + 1])
    if not os.path.isfile(weights):
        return None
    info = {"weights": os.path.relpath(weights, ROOT), "weights_sha256": file_sha256(weights)}
    done = os.path.join(os.path.dirname(weights), "demo_result.json")
    if os.path.isfile(done):
        with open(done) as f:
            info["AP"] = round(float(json.load(f)["bbox"]["AP"]), 4)
    return info


def run_and_record(demo, pair: str, kind: str, config: str, opts: list, run_name: str) -> dict:
    """Train (or reuse) one run and write its JSON; returns the JSON's content."""
    import torch

    out_dir = os.path.join(ROOT, "output", "bench", pair, run_name)
    path = result_path(pair, run_name)
    cfg = demo.setup_cfg(os.path.join(ROOT, config), list(opts) + ["OUTPUT_DIR", out_dir])
    digest = demo.config_digest(cfg)
    if kind == "teacher" and os.path.isfile(path) and not os.path.isfile(_weights(out_dir)):
        # The teacher's record outlives its checkpoint (output/ is not committed). Its rows were
        # distilled from that checkpoint, so the record stays; a retrained teacher gets its own
        # record, and every distilled run names the teacher it read (``teacher_of``).
        path = result_path(pair, "teacher_retrained")
    if os.path.isfile(path):
        with open(path) as f:
            old = json.load(f)
        if old.get("config_sha") == digest and old.get("torch") == torch.__version__:
            print(f"[gains] {pair}/{run_name}: finished result reused ({path})", flush=True)
            return old
    t0 = time.time()
    try:
        done = demo.run(run_name, config, opts, out_dir, fresh=False)
    except FloatingPointError as err:  # the divergence guard / NaN stop: a result too
        print(f"[gains] {pair}/{run_name}: stopped: {str(err).splitlines()[0]}", flush=True)
        done = {"bbox": {"AP": 0.0}, "diverged": str(err).split(". Training stopped")[0]}
    record = {
        "pair": pair,
        "kind": kind,
        "run": run_name,
        "config": config,
        "opts": [
            os.path.relpath(str(o), ROOT) if str(o).startswith(ROOT) else str(o) for o in opts
        ],
        "seed": int(cfg.SEED),
        "methods": list(cfg.KD.METHODS),
        "inherit_teacher": list(getattr(cfg.KD, "INHERIT_TEACHER", [])),
        "config_sha": digest,
        "bbox": {k: round(float(v), 4) for k, v in done["bbox"].items()},
        "diverged": done.get("diverged"),
        "train_seconds": round(float(done.get("train_seconds", time.time() - t0)), 1),
        "torch": torch.__version__,
        "machine": f"{platform.machine()} {os.cpu_count()} cpu",
        "threads": torch.get_num_threads(),
    }
    if kind == "teacher" and os.path.isfile(_weights(out_dir)):
        record["weights_sha256"] = file_sha256(_weights(out_dir))
    pseudo = _pseudo_files(cfg)
    if pseudo:
        record["pseudo_labels"] = pseudo[0]
    if kind == "distilled":
        record["teacher"] = teacher_of(opts)
        balanced = cfg.KD.BALANCE.MODE != "none"
        record["balance_calibrate"] = bool(cfg.KD.BALANCE.CALIBRATE) if balanced else None
        # the share the controller holds: of the KD terms' sum (since December 2026; before,
        # the sum of the terms' own norms — the same for a one-term method)
        record["balance_share"] = "kd_sum" if balanced else None
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(record, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)
    print(f"[gains] {pair}/{run_name}: AP {record['bbox']['AP']:.2f} -> {path}", flush=True)
    # a diverged run counts as AP 0 (the run produced no usable model), marked in the table
    return record


def _file_config(config: str):
    """The config file as written (no overrides): what the per-config options are read from."""
    from kd2.config import get_cfg

    cfg = get_cfg()
    cfg.merge_from_file(os.path.join(ROOT, config))
    return cfg


def _extra_teacher_weights(cfg) -> list:
    """``KD.TEACHERS.<NAME>.WEIGHTS`` options pointing each extra teacher whose config is a
    pair's teacher config at that pair's benchmark teacher."""
    teachers = {t: p for p, (t, _) in PAIRS.items() if p not in PAIR_SOURCES}
    opts = []
    for name, node in cfg.KD.TEACHERS.items():
        if node.CONFIG in teachers:
            path = os.path.join(ROOT, "output", "bench", teachers[node.CONFIG], "teacher")
            opts += [f"KD.TEACHERS.{name}.WEIGHTS", os.path.join(path, "model_final.pth")]
    return opts


def _classifier_teacher_weights(demo, cfg, s_pair: str, student_cfg: str) -> list:
    """``KD.CLASSIFIERKD.TEACHER.WEIGHTS`` for a ClassifierKD config: the crop classifier that
    ``tools/demo.py`` trains with its default settings on the student's data (trained once per
    pair, in ``output/bench/<pair>/crop_classifier``)."""
    if "ClassifierKD" not in cfg.KD.METHODS:
        return []
    args = demo.parse_args(["--student", student_cfg])
    weights = demo.classifier_teacher(args, os.path.join(ROOT, "output", "bench", s_pair))
    return ["KD.CLASSIFIERKD.TEACHER.WEIGHTS", weights]


def _teacher_cache(demo, config: str, opts: list) -> None:
    """Build (or finish) the ``KD.TEACHER.CACHE`` a config reads, with the pair's teacher
    (``opts``), before its runs: ``tools/cache_teacher.py``'s code, once per config (the cache
    does not depend on the seed)."""
    from kd2.engine.teacher_cache import build_teacher_cache
    from kd2.modeling.backends import get_backend

    cfg = demo.setup_cfg(os.path.join(ROOT, config), list(opts))
    directory = os.path.join(ROOT, cfg.KD.TEACHER.CACHE)
    manifest = os.path.join(directory, "manifest.json")
    if os.path.isfile(manifest):
        with open(manifest) as f:
            if json.load(f).get("complete"):
                return
    trainer = get_backend(cfg.MODEL.BACKEND).trainer
    model = trainer.build_model(cfg)
    done = build_teacher_cache(
        cfg, model, directory, target_offset=trainer.label_offset(model), progress=False
    )
    print(f"[gains] teacher cache {os.path.relpath(directory, ROOT)}: {done['stats']}", flush=True)


def _pseudo_labels(pair: str, path: str, teacher_cfg: str, teacher_weights: str) -> None:
    """Write (or reuse) ``pair``'s pseudo-label file ``path`` with its teacher, and commit its
    summary (provenance, counts, precision / recall against the hidden labels) under the file's
    name beside the pair's runs."""
    from kd2.data import DatasetCatalog, MetadataCatalog

    dataset, by_file = PSEUDO_LABELS[pair]
    summary_path = result_path(pair, os.path.splitext(os.path.basename(path))[0])
    sha = file_sha256(teacher_weights)
    if os.path.isfile(path) and os.path.isfile(summary_path):
        with open(summary_path) as f:
            if json.load(f)["teacher_weights_sha256"] == sha:
                print(f"[gains] pseudo-labels {path}: reused", flush=True)
                return
    DatasetCatalog.get(dataset)  # makes the split on first use
    meta = MetadataCatalog.get(dataset)
    labeled = MetadataCatalog.get(dataset.replace("_hidden", "_labeled"))
    DatasetCatalog.get(dataset.replace("_hidden", "_labeled"))
    data = _tool("cache_teacher").main(
        ["--config-file", teacher_cfg, "--pseudo-labels", meta.image_root, "--output", path]
        + ["--labeled", labeled.json_file, "--ground-truth", meta.json_file]
        + ["--score-threshold", str(by_file[path])]
        + ["MODEL.WEIGHTS", teacher_weights]
    )
    info = dict(data["info"]["pseudo_labels"])
    for key in ("image_dir", "teacher_weights"):
        info[key] = os.path.relpath(info[key], ROOT)
    info["file"] = path
    info["pair"] = pair
    with open(summary_path, "w") as f:
        json.dump(info, f, indent=1)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--pair", choices=sorted(PAIRS), required=True)
    p.add_argument("--configs", nargs="*", default=[], help="distilled student configs")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--baselines-only", action="store_true")
    p.add_argument("--threads", type=int, default=int(os.environ.get("KD2_BENCH_THREADS", 1)))
    args = p.parse_args(argv)
    os.chdir(ROOT)
    os.environ.setdefault("DETECTRON2_DATASETS", os.path.join(ROOT, "datasets"))
    demo = _demo()
    import torch

    # One thread by default: on a shared 2-core machine two threads per process, competing
    # with any other job, made a step up to 10x slower. AP does not depend on it in principle,
    # but float reductions may: the JSON records the thread count.
    torch.set_num_threads(args.threads)
    demo.setup_logger(os.path.join(ROOT, "output", "bench", args.pair))
    teacher_cfg, student_cfg = PAIRS[args.pair]
    t_pair, s_pair = PAIR_SOURCES.get(args.pair, (args.pair, args.pair))
    jobs = [(t_pair, "teacher", teacher_cfg, [], "teacher")]
    jobs += [
        (s_pair, "student", student_cfg, ["SEED", str(s)], f"student_seed{s}") for s in args.seeds
    ]
    teacher_weights = os.path.join(ROOT, "output", "bench", t_pair, "teacher", "model_final.pth")
    if not args.baselines_only:
        for config in args.configs:
            name = os.path.splitext(os.path.basename(config))[0]
            cfg = _file_config(config)
            extra = _extra_teacher_weights(cfg)
            extra += _classifier_teacher_weights(demo, cfg, s_pair, student_cfg)
            for path in _pseudo_files(cfg):
                if not any(j[1] == "pseudo" and j[4] == path for j in jobs):
                    jobs.append((args.pair, "pseudo", teacher_cfg, [teacher_weights], path))
            if cfg.KD.TEACHER.CACHE:
                jobs.append(
                    (args.pair, "cache", config, ["KD.TEACHER.WEIGHTS", teacher_weights], "")
                )
            for s in args.seeds:
                opts = ["SEED", str(s), "KD.TEACHER.WEIGHTS", teacher_weights] + extra
                jobs.append((args.pair, "distilled", config, opts, f"{name}_seed{s}"))
    t0 = time.time()
    for i, (pair, kind, config, opts, run_name) in enumerate(jobs, 1):
        print(
            f"[gains] [{i}/{len(jobs)}] {pair}/{run_name} ({config}), "
            f"{time.time() - t0:.0f}s elapsed",
            flush=True,
        )
        if kind == "cache":
            _teacher_cache(demo, config, opts)
            continue
        if kind == "pseudo":
            _pseudo_labels(pair, run_name, config, opts[0])
            continue
        run_and_record(demo, pair, kind, config, opts, run_name)
    print(f"[gains] done in {time.time() - t0:.0f}s", flush=True)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
