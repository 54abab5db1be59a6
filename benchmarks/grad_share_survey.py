#!/usr/bin/env python
"""How large a share of the trunk gradient do the KD terms take in runs that helped, and in runs
that hurt? The data behind ``KD.BALANCE``'s band.

For every distilled run of the gains benchmark (``benchmarks/results/gains/<pair>/*.json``)
whose training output still holds its diagnostics (``output/bench/<pair>/<run>/metrics.json``,
``grad_share/`` lines every ``KD.DIAG.PERIOD`` iterations), it averages over the iterations from
``--from-iter`` on: the KD terms' summed share of the trunk gradient, the largest single term's
share and the KD terms' cosine with the detection gradient — next to the run's gain over the
baseline student of the same seed. Writes ``benchmarks/results/grad_share_survey.json`` and prints
one row per method and pair (seeds averaged).

    python benchmarks/grad_share_survey.py
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results", "gains")


def run_shares(metrics_file: str, from_iter: int) -> dict | None:
    """Mean KD share, largest term share and detection cosine of one run's diagnostics."""
    totals, largest, cos = [], [], []
    with open(metrics_file) as f:
        for line in f:
            d = json.loads(line)
            if d.get("iteration", -1) < from_iter or "grad_share/detection" not in d:
                continue
            kd = {k: v for k, v in d.items() if k.startswith("grad_share/loss_kd_")}
            totals.append(sum(kd.values()))
            largest.append(max(kd.values()) if kd else 0.0)
            cos.append(d.get("grad_cos/detection", 0.0))
    if not totals:
        return None
    return {
        "kd_share": statistics.fmean(totals),
        "largest_term_share": statistics.fmean(largest),
        "cos_detection_kd": statistics.fmean(cos),
        "measurements": len(totals),
    }


def survey(from_iter: int) -> list[dict]:
    rows = []
    for pair_dir in sorted(glob.glob(os.path.join(RESULTS, "*"))):
        pair = os.path.basename(pair_dir)
        runs = []
        for path in sorted(glob.glob(os.path.join(pair_dir, "*.json"))):
            with open(path) as f:
                runs.append(json.load(f))
        students = {r["seed"]: r["bbox"]["AP"] for r in runs if r["kind"] == "student"}
        by_config: dict[str, list] = {}
        for r in runs:
            if r["kind"] != "distilled" or r["seed"] not in students:
                continue
            metrics = os.path.join(ROOT, "output", "bench", pair, r["run"], "metrics.json")
            if not os.path.isfile(metrics):
                continue
            shares = run_shares(metrics, from_iter)
            if shares is None:
                continue
            shares["gain"] = r["bbox"]["AP"] - students[r["seed"]]
            by_config.setdefault(r["config"], []).append(shares)
        for config, items in by_config.items():
            row = {"pair": pair, "config": config, "seeds": len(items)}
            for key in ("gain", "kd_share", "largest_term_share", "cos_detection_kd"):
                row[key] = statistics.fmean(x[key] for x in items)
            rows.append(row)
    rows.sort(key=lambda r: -r["gain"])
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--from-iter", type=int, default=50)
    p.add_argument(
        "--out", default=os.path.join(ROOT, "benchmarks", "results", "grad_share_survey.json")
    )
    args = p.parse_args(argv)
    rows = survey(args.from_iter)
    print(
        f"{'pair':<12} {'config':<40} {'seeds':>5} {'gain':>7} {'KD share':>9} "
        f"{'max term':>9} {'cos':>7}"
    )
    for r in rows:
        print(
            f"{r['pair']:<12} {os.path.basename(r['config']):<40} {r['seeds']:>5} "
            f"{r['gain']:>+7.2f} {r['kd_share']:>9.3f} {r['largest_term_share']:>9.3f} "
            f"{r['cos_detection_kd']:>7.3f}"
        )
    with open(args.out, "w") as f:
        json.dump({"from_iter": args.from_iter, "rows": rows}, f, indent=1)
        f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
