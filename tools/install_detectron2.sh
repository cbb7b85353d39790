#!/usr/bin/env bash
# Install detectron2 into the Python given as $1 (default: python3).
#
# detectron2 is not published on PyPI. This script:
#   1. keeps any detectron2 >= 0.6 that already imports (e.g. an official CUDA build from source);
#   2. otherwise downloads the registry's `sal-detectron2==0.7.2` wheel (detectron2 0.7.2's Python
#      code, tagged cp310 with a compiled _C for another Python/torch), retags it py3-none-any,
#      drops the stale _C extension and installs it. detectron2's Python code falls back cleanly
#      without _C (only rotated boxes, deformable conv and the fast COCO evaluator need it);
#   3. verifies the result: import detectron2, build a model, and fails with a clear message.
set -euo pipefail
PY=${1:-python3}
WANT=0.7.2

have_ok() {
  "$PY" - <<'PYEOF' 2>/dev/null
import sys
import detectron2
v = tuple(int(x) for x in detectron2.__version__.split(".")[:2])
sys.exit(0 if v >= (0, 6) else 1)
PYEOF
}

verify() {
  "$PY" - <<'PYEOF'
import detectron2
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.projects.point_rend.point_features import point_sample  # noqa: F401
cfg = get_cfg()
cfg.MODEL.DEVICE = "cpu"
cfg.MODEL.RESNETS.DEPTH = 18
cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
build_model(cfg)
print(f"detectron2 {detectron2.__version__} OK ({detectron2.__file__})")
PYEOF
}

if have_ok; then
  verify && exit 0
  echo "install_detectron2: an importable detectron2 is present but fails to build a model" >&2
  exit 1
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "install_detectron2: installing detectron2 $WANT (pure-Python build of sal-detectron2)"
if ! "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.10 \
    -d "$tmp/dl" "sal-detectron2==$WANT"; then
  echo "install_detectron2: could not download sal-detectron2==$WANT from the package registry." >&2
  echo "  Install official detectron2 instead: pip install 'git+https://github.com/facebookresearch/detectron2.git'" >&2
  exit 1
fi
"$PY" -m pip install -q wheel
whl=$(ls "$tmp"/dl/*.whl)
"$PY" -m wheel unpack -d "$tmp/unpacked" "$whl" >/dev/null
root=$(ls -d "$tmp"/unpacked/*/)
find "$root" -name '_C*.so' -delete
wheelfile=$(ls "$root"*.dist-info/WHEEL)
sed -i 's/^Tag: .*/Tag: py3-none-any/' "$wheelfile"
# the RECORD lists the removed _C; drop its line so pip does not complain
sed -i '/\/_C.*\.so,/d' "$root"*.dist-info/RECORD
mkdir -p "$tmp/packed"
"$PY" -m wheel pack -d "$tmp/packed" "$root" >/dev/null
"$PY" -m pip install -q --no-deps "$tmp"/packed/*.whl
# sal-detectron2 does not declare these
"$PY" -m pip install -q fvcore iopath "pycocotools" "yacs" "tabulate" "termcolor" "cloudpickle" "omegaconf" "hydra-core" "black"
if ! verify; then
  echo "install_detectron2: detectron2 installed but the check (import, build_model) failed." >&2
  exit 1
fi
