#!/usr/bin/env bash
# The GPU path in one prepared run (at most ~8 minutes on one H100/H200):
#   1. a virtual environment with kd2 built with its CUDA kernels (reused when present);
#   2. the CUDA tests (tests/test_ops.py and everything else that skips without a GPU);
#   3. benchmarks/pgm.py --device cuda   (pgm_speedup_cuda=, box_pool_speedup_cuda=);
#   4. benchmarks/step_overhead.py on CUDA, the demo pair and the R50-FPN -> MobileNetV3 pair at
#      320 px, with the teacher options (kd_step_vs_student_step=, teacher_forward_speedup_*=);
# every figure goes to $OUT/gpu_check.json (OUT defaults to output/gpu_check), a summary is
# printed. `--dry-run` runs the same steps on the CPU, tiny, with the current python (CI runs it,
# so the script cannot rot).
set -euo pipefail
cd "$(dirname "$0")/.."
DRY=0
[[ "${1:-}" == "--dry-run" ]] && DRY=1
OUT="${OUT:-output/gpu_check}"
mkdir -p "$OUT"
if [[ $DRY == 1 ]]; then
    PY="${PYTHON:-python}"
    DEVICE=cpu; ITERS=1; WARMUP=0; SIZES="64"; OPTIONS="bfloat16"; CONFIGS_LARGE=""
    TESTS="tests/test_ops.py -k cuda"
else
    if [[ ! -x .venv-gpu/bin/python ]]; then
        python3 -m venv .venv-gpu
        .venv-gpu/bin/pip install -q --upgrade pip "setuptools<80" wheel
        .venv-gpu/bin/pip install -q torch torchvision
        FORCE_CUDA=1 .venv-gpu/bin/pip install -q --no-build-isolation -e ".[dev]"
    fi
    PY=.venv-gpu/bin/python
    DEVICE=cuda; ITERS=15; WARMUP=3; SIZES="500 2000 4000"; OPTIONS="bfloat16 float16 channels_last"
    CONFIGS_LARGE="configs/synthetic/timing/faster_rcnn_MNv3_PKD_from_R50_320.yaml"
    TESTS="tests/test_ops.py"
fi
export DETECTRON2_DATASETS="${DETECTRON2_DATASETS:-$PWD/datasets}"
"$PY" -c "import kd2, torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
set +e
"$PY" -m pytest -q $TESTS -p no:cacheprovider > "$OUT/tests.log" 2>&1
TESTS_RC=$?
set -e
"$PY" benchmarks/pgm.py --device "$DEVICE" --sizes $SIZES --repeats 1 > "$OUT/pgm.log" 2>&1 \
    || { echo "pgm benchmark failed: $OUT/pgm.log"; exit 1; }
"$PY" benchmarks/step_overhead.py --device "$DEVICE" --iters "$ITERS" --warmup "$WARMUP" \
    --teacher-options $OPTIONS --json "$OUT/step_overhead_demo.json" > "$OUT/step_demo.log" 2>&1 \
    || { echo "step overhead (demo pair) failed: $OUT/step_demo.log"; exit 1; }
if [[ -n "$CONFIGS_LARGE" ]]; then
    "$PY" benchmarks/step_overhead.py --device "$DEVICE" --iters "$ITERS" --warmup "$WARMUP" \
        --configs $CONFIGS_LARGE --teacher-options $OPTIONS \
        --json "$OUT/step_overhead_large.json" > "$OUT/step_large.log" 2>&1 \
        || { echo "step overhead (large pair) failed: $OUT/step_large.log"; exit 1; }
fi
"$PY" - "$OUT" "$TESTS_RC" "$DRY" <<'PY'
import json, os, platform, re, sys

out, tests_rc, dry = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
import torch

figures = {}
for log in ("pgm.log", "step_demo.log", "step_large.log"):
    path = os.path.join(out, log)
    if os.path.isfile(path):
        for m in re.finditer(r"^([a-z0-9_]+)=([0-9.eE+-]+)$", open(path).read(), re.M):
            figures[f"{log[:-4]}/{m.group(1)}"] = float(m.group(2))
tail = open(os.path.join(out, "tests.log")).read().strip().splitlines()[-1:]
result = {
    "dry_run": dry,
    "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu",
    "torch": torch.__version__,
    "tests_rc": tests_rc,
    "tests": tail[0] if tail else "",
    "figures": figures,
}
json.dump(result, open(os.path.join(out, "gpu_check.json"), "w"), indent=1)
print(json.dumps(result, indent=1))
sys.exit(0 if tests_rc in (0, 5) else 1)  # 5: every test deselected (the dry run's CUDA tests)
PY
