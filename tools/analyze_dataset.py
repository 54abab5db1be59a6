#!/usr/bin/env python
"""Check a training set against a detector config before training (kd2.data.report).

Loads the config like tools/train_net.py, reads the records of every ``DATASETS.TRAIN`` dataset,
prints the report (images, boxes per image, image sides, the training resize, box sizes after it
vs the anchor sizes, class counts, per-image limits) with plain-English warnings saying what to
change, and writes ``dataset_report.json`` and ``dataset_report.png`` (box-size histogram with
the anchors) into ``--output`` (default: ``OUTPUT_DIR``). Exits 0 whether or not it warns.

Usage::

    python tools/analyze_dataset.py --config-file CFG [--output DIR] [KEY VALUE ...]
"""

from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from kd2.data import DatasetCatalog, MetadataCatalog  # noqa: E402
from kd2.data.report import format_report, write_dataset_report  # noqa: E402
from kd2.engine import setup_cfg  # noqa: E402
from kd2.utils.errors import run_main  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config-file", required=True, help="kd2 config of the detector to train")
    p.add_argument("--output", default="", help="directory for the JSON + PNG (default OUTPUT_DIR)")
    p.add_argument("opts", nargs=argparse.REMAINDER, default=[], help="KEY VALUE overrides")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = setup_cfg(args.config_file, args.opts)
    names = list(cfg.DATASETS.TRAIN)
    if not names:
        print("DATASETS.TRAIN is empty: nothing to analyze", file=sys.stderr)
        return 2
    records = []
    class_names = None
    for name in names:
        records.extend(DatasetCatalog.get(name))
        classes = MetadataCatalog.get(name).get("thing_classes")
        if class_names is None and classes is not None:
            class_names = list(classes)
    out = args.output or cfg.OUTPUT_DIR
    report = write_dataset_report(records, cfg, out, class_names=class_names, log=False)
    print(f"DATASETS.TRAIN: {', '.join(names)}")
    print(format_report(report))
    print(f"Wrote {os.path.join(out, 'dataset_report.json')} and dataset_report.png")
    return 0


if __name__ == "__main__":
    run_main(main)
