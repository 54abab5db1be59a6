#!/usr/bin/env bash
# The GPU path in one prepared run, with only the working tree and a Python that has torch (the
# carried .venv): it never installs anything and reaches no package index (PIP_NO_INDEX=1).
#   1. build: when kd2._C is missing, or lacks its CUDA kernels on a machine with a GPU and a
#      CUDA toolkit, it is rebuilt in place (FORCE_CUDA=1 python setup.py build_ext --inplace,
#      no network; the log says so);
#   2. tests: tests/ops/test_ops.py (the CUDA tests run where a GPU is);
#   3. pgm: benchmarks/pgm.py                      (pgm_speedup_<dev>=, box_pool_speedup_<dev>=);
#   4. step_demo: benchmarks/step_overhead.py, the demo pair (--config) and FGD under KD.BALANCE
#      grad_share side by side, with the teacher options and the student / KD step under autocast
#      bfloat16 and float16 next to float32 (kd_step_vs_student_step=, teacher_forward_speedup_*=,
#      amp_{bf16,fp16}_{student,kd}_step_vs_fp32=, diag_overhead_<config>=);
#   5. step_large: the same for the R50-FPN -> MobileNetV3 pair at 320 px.
# It runs on the GPU when torch sees one, else the same steps on the CPU. Every figure goes to
# $OUT/gpu_check.json with each step's exit status and seconds; a summary is printed. The exit
# status is non-zero when any step failed (or no test passed); every step runs regardless.
#
# Usage: benchmarks/gpu_check.sh [--size small|full] [--config FILE] [--only STEP,...]
#   --size full  (default) the real sizes: about 3-4 min on one H100 (< 8 min);
#   --size small tiny iterations, batches and sizes, the same code path (CI runs it on the CPU);
#   --config     the demo pair's KD config (default configs/synthetic/faster_rcnn_MNv3_DeFeat.yaml);
#   --only       run only these steps (build, tests, pgm, step_demo, step_large).
# Environment: PYTHON (default .venv/bin/python, else python3), OUT (default output/gpu_check),
# THREADS (CPU threads, default: all cores), DETECTRON2_DATASETS (default ./datasets).
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE=full
CONFIG=configs/synthetic/faster_rcnn_MNv3_DeFeat.yaml
ONLY=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --size) SIZE="${2:-}"; shift 2 ;;
        --size=*) SIZE="${1#*=}"; shift ;;
        --config) CONFIG="${2:-}"; shift 2 ;;
        --config=*) CONFIG="${1#*=}"; shift ;;
        --only) ONLY="${2:-}"; shift 2 ;;
        --only=*) ONLY="${1#*=}"; shift ;;
        -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
[[ $SIZE == small || $SIZE == full ]] || { echo "gpu_check.sh: --size small|full" >&2; exit 2; }
for step in ${ONLY//,/ }; do
    case "$step" in
        build|tests|pgm|step_demo|step_large) ;;
        *) echo "gpu_check.sh: --only: unknown step $step" >&2; exit 2 ;;
    esac
done
# nothing here may reach a package index, whatever pip configuration the machine has
export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1
if [[ -n "${PYTHON:-}" ]]; then
    PY="$PYTHON"
elif [[ -x .venv/bin/python ]]; then
    PY=.venv/bin/python
else
    PY=python3
fi
OUT="${OUT:-output/gpu_check}"
mkdir -p "$OUT"
for f in build tests pgm step_demo step_large; do rm -f "$OUT/$f.log"; done
rm -f "$OUT/gpu_check.json" "$OUT/steps.tsv" "$OUT"/step_overhead_{demo,large}.json
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # kd2 from this working tree
export DETECTRON2_DATASETS="${DETECTRON2_DATASETS:-$PWD/datasets}"
THREADS="${THREADS:-$(nproc)}"
START=$SECONDS

wants() { [[ -z "$ONLY" || ",$ONLY," == *",$1,"* ]]; }
# run_step NAME LOG CMD...: runs CMD with its output in $OUT/LOG, records status and seconds
run_step() {
    local name="$1" log="$OUT/$2" t0=$SECONDS rc=0
    shift 2
    echo "== $name: $*" | tee "$log"
    "$@" >> "$log" 2>&1 || rc=$?
    printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" >> "$OUT/steps.tsv"
    if [[ $rc != 0 ]]; then
        echo "   FAILED (exit $rc): $log"; tail -n 5 "$log" | sed 's/^/   | /'
    else
        echo "   ok ($((SECONDS - t0)) s)"
    fi
}
probe() {
    "$PY" - <<'PY'
import torch
from kd2.ops._ext import extension_available, extension_has_cuda
cuda = torch.cuda.is_available()
print("DEVICE=" + ("cuda" if cuda else "cpu"))
print("EXT=" + ("1" if extension_available() else "0"))
print("EXT_CUDA=" + ("1" if extension_has_cuda() else "0"))
PY
}

"$PY" -c "import torch" 2>/dev/null || {
    echo "gpu_check.sh: $PY cannot import torch; build .venv here (make install) and carry it," \
        "or set PYTHON" >&2
    exit 2
}
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda,
    'GPU', torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)"
PROBE="$(probe)" || { echo "gpu_check.sh: kd2 cannot be imported with $PY" >&2; exit 2; }
eval "$PROBE"
REBUILT=0
NVCC="$(command -v nvcc || true)"
CUDA_ROOT="${CUDA_HOME:-/usr/local/cuda}"
[[ -z "$NVCC" && -x "$CUDA_ROOT/bin/nvcc" ]] && NVCC="$CUDA_ROOT/bin/nvcc"
if wants build; then
    if [[ $EXT == 0 || ( $DEVICE == cuda && $EXT_CUDA == 0 ) ]]; then
        if [[ $DEVICE == cuda && -z "$NVCC" ]]; then
            echo "kd2._C has no CUDA kernels and no CUDA toolkit (nvcc) is here: the CUDA tests" \
                "will skip and the pgm benchmark runs kd2's fallbacks"
        else
            [[ $DEVICE == cuda ]] && export FORCE_CUDA=1
            echo "kd2._C is $([[ $EXT == 0 ]] && echo 'not importable' || echo 'built without' \
                'its CUDA kernels'): rebuilding it in place (setup.py build_ext --inplace," \
                "FORCE_CUDA=${FORCE_CUDA:-0}; no network)"
            run_step build build.log env MAX_JOBS="${MAX_JOBS:-$THREADS}" \
                "$PY" setup.py build_ext --inplace
            REBUILT=1
            PROBE="$(probe)" || { echo "gpu_check.sh: kd2 cannot be imported" >&2; exit 2; }
            eval "$PROBE"
        fi
    fi
fi
echo "device $DEVICE, kd2._C importable $EXT, with CUDA kernels $EXT_CUDA"

if [[ $SIZE == small ]]; then
    ITERS=1; WARMUP=0; SIZES="64"; REPEATS=1; BOXES=50; SMALL=(--batch 2 --input 64)
    TESTS=(tests/ops/test_ops.py -k "cuda or matches_reference")
else
    ITERS=15; WARMUP=3; SIZES="500 2000 4000"; REPEATS=3; BOXES=2000; SMALL=()
    TESTS=(tests/ops/test_ops.py)
fi
if [[ $DEVICE == cuda ]]; then
    OPTIONS=(bfloat16 float16 channels_last)
else
    OPTIONS=(bfloat16 channels_last)  # a float16 teacher needs CUDA (a clear error on the CPU)
fi
LARGE=configs/synthetic/timing/faster_rcnn_MNv3_PKD_from_R50_320.yaml
STEP=(benchmarks/step_overhead.py --device "$DEVICE" --iters "$ITERS" --warmup "$WARMUP"
    --threads "$THREADS" --teacher-options "${OPTIONS[@]}" --amp bfloat16 float16
    ${SMALL[@]+"${SMALL[@]}"})

wants tests && run_step tests tests.log "$PY" -m pytest -q -p no:cacheprovider "${TESTS[@]}"
# shellcheck disable=SC2086
wants pgm && run_step pgm pgm.log "$PY" benchmarks/pgm.py --device "$DEVICE" --sizes $SIZES \
    --repeats "$REPEATS" --boxes "$BOXES" --threads "$THREADS"
# with a 4-term method under KD.BALANCE grad_share: the diagnostics every 20 steps
wants step_demo && run_step step_demo step_demo.log "$PY" "${STEP[@]}" --configs "$CONFIG" \
    configs/synthetic/faster_rcnn_MNv3_FGD_gradshare.yaml --json "$OUT/step_overhead_demo.json"
wants step_large && run_step step_large step_large.log "$PY" "${STEP[@]}" --configs "$LARGE" \
    --json "$OUT/step_overhead_large.json"

"$PY" - "$OUT" "$SIZE" "$DEVICE" "$EXT_CUDA" "$REBUILT" "$((SECONDS - START))" <<'PY'
import json, os, platform, re, sys

out, size, device, ext_cuda, rebuilt, seconds = sys.argv[1:]
import torch

steps = {}
if os.path.isfile(os.path.join(out, "steps.tsv")):
    for line in open(os.path.join(out, "steps.tsv")):
        name, rc, secs = line.rstrip("\n").split("\t")
        steps[name] = {"rc": int(rc), "seconds": int(secs)}
figures = {}
for step in ("pgm", "step_demo", "step_large"):
    path = os.path.join(out, step + ".log")
    if os.path.isfile(path):
        text = open(path).read()
        for m in re.finditer(r"^([A-Za-z0-9_]+)=([0-9.eE+-]+|unsupported)$", text, re.M):
            value = m.group(2)
            figures[f"{step}/{m.group(1)}"] = value if value == "unsupported" else float(value)
tests = {}
if os.path.isfile(os.path.join(out, "tests.log")):
    lines = [ln for ln in open(os.path.join(out, "tests.log")).read().splitlines() if ln.strip()]
    summary = lines[-1] if lines else ""
    tests["summary"] = summary
    for key in ("passed", "failed", "skipped", "deselected", "error", "errors"):
        m = re.search(rf"(\d+) {key}\b", summary)
        tests[key] = int(m.group(1)) if m else 0
failed = [name for name, s in steps.items() if s["rc"] != 0]
if tests and tests["passed"] == 0:
    failed.append("tests (none passed)")
if device == "cuda" and ext_cuda != "1":
    failed.append("kd2._C without CUDA kernels")
result = {
    "size": size,
    "device": torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or "cpu",
    "torch": torch.__version__,
    "cuda": torch.version.cuda,
    "kd2_cuda_kernels": ext_cuda == "1",
    "kd2_rebuilt": rebuilt == "1",
    "seconds": int(seconds),
    "steps": steps,
    "tests": tests,
    "figures": figures,
    "failed": failed,
}
with open(os.path.join(out, "gpu_check.json"), "w") as f:
    json.dump(result, f, indent=1)
print(json.dumps(result, indent=1))
print("gpu_check: " + ("FAILED: " + ", ".join(failed) if failed else "ok"), f"({seconds} s)")
sys.exit(1 if failed else 0)
PY
