#!/usr/bin/env bash
# Records docs/terminal_session.txt: the README's quantize commands, each with everything it
# printed (stdout and stderr together, piped, so progress shows as one plain line per stage).
# Rerun: bash docs/record_terminal_session.sh [OUTDIR]   (a few minutes per MobileNetV2 run)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-$(mktemp -d)}
log=docs/terminal_session.txt
# DYADIQ: the command to run (e.g. a checkout's `python -m dyadiq.cli`); the log shows `dyadiq`
read -r -a dyadiq <<< "${DYADIQ:-.venv/bin/dyadiq}"
python=${PYTHON:-.venv/bin/python}
# model.onnx and DATA of the README's generic lines: the zoo's Fashion-MNIST CNN and one .npz
# of its calibration batches
"$python" - "$out" <<'PY'
import sys
from pathlib import Path

import numpy as np

from dyadiq import zoo

out = Path(sys.argv[1])
artifacts = zoo.get("fashion_cnn")
(out / "model.onnx").write_bytes(Path(artifacts.model_path).read_bytes())
batch = next(artifacts.calibration_batches())
np.savez(out / "one.npz", **batch)
PY
run() {
    echo "\$ dyadiq $*" | sed "s|$out/|/tmp/demo/|g"
    nice -n 10 "${dyadiq[@]}" "$@" 2>&1 | sed "s|$out/|/tmp/demo/|g"
    echo "[exit status ${PIPESTATUS[0]}]"
    echo
}
{
    echo "# dyadiq quantize, the README's commands, output piped (one progress line per stage)"
    echo "# recorded with: bash docs/record_terminal_session.sh; /tmp/demo stands for its folder"
    echo "# code: commit ${DYADIQ_COMMIT:-$(git rev-parse --short HEAD)}"
    echo
    run quantize --zoo fashion_cnn --compare-ort -o "$out/fashion_cnn"
    run quantize "$out/model.onnx" -o "$out/npz" --calib "$out/one.npz" --exclude Gemm
    run quantize "$out/model.onnx" -o "$out/trt" --calib "$out/one.npz" --qdq-style tensorrt
    run quantize --zoo ppocr_cls -o "$out/ppocr_int" --integer
    run quantize --zoo fashion_cnn -o "$out/maxdrop" --max-drop 0.5%
    run quantize --zoo fashion_cnn -o "$out/x86" --target x86
    run quantize --zoo ppocr_cls -o "$out/m4" --target cortex-m4
    run quantize --zoo mobilenet_v2 -o "$out/mnv2_budget" --budget avg-wbits=5
    run quantize --zoo mobilenet_v2 -o "$out/mnv2" --calibrator percentile --compare-ort
    run --quiet quantize --zoo fashion_cnn -o "$out/quiet"
} > "$log"
echo "wrote $log"
