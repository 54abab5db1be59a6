#!/usr/bin/env bash
# Build Detectron2 offline into kd2's environment from a source tarball (no network).
#
#   tools/install_detectron2.sh PYTHON TARBALL BUILD_DIR STAMP
#
# Does nothing when PYTHON already imports detectron2 and STAMP names TARBALL's checksum (a warm
# .venv is never rebuilt). Otherwise extracts TARBALL into BUILD_DIR (the Makefile's is .venv/src/, so the
# sources of the editable install live and die with the environment) and runs
# `pip install --no-build-isolation -e` on it; torch must already be installed. Without TARBALL
# (a user without ../shared) it says how to install Detectron2 the official way and succeeds:
# everything but kd2.d2 works without it.
set -euo pipefail
PY=$1 TARBALL=$2 BUILD=$3 STAMP=$4
if [[ ! -f "$TARBALL" ]]; then
    if "$PY" -c "import detectron2" 2>/dev/null; then
        echo "detectron2: installed ($("$PY" -c 'import detectron2, os; print(os.path.dirname(detectron2.__file__))'))"
    else
        echo "detectron2: not installed and no source tarball at $TARBALL; kd2.d2 needs it —"
        echo "  install it from its official repository (README, 'Install')."
    fi
    exit 0
fi
sum=$(sha256sum "$TARBALL" | cut -d' ' -f1)
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$sum" ]] && "$PY" -c "import detectron2._C" 2>/dev/null; then
    exit 0
fi
start=$(date +%s)
echo "detectron2: building from $TARBALL into $BUILD (offline, a few minutes on 2 cores)"
rm -rf "$BUILD"
mkdir -p "$BUILD"
tar -xzf "$TARBALL" -C "$BUILD"
src="$BUILD/detectron2"
[[ -f "$src/setup.py" ]] || { echo "kd2: error: $TARBALL has no detectron2/setup.py — use the tarball from shared/third_party"; exit 2; }
MAX_JOBS="${MAX_JOBS:-$(nproc)}" "$PY" -m pip install -q --no-build-isolation -e "$src"
"$PY" -c "import detectron2._C, detectron2; print('detectron2', detectron2.__version__, 'built')"
echo "$sum" > "$STAMP"
echo "detectron2: built in $(( $(date +%s) - start )) s"
