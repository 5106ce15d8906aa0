"""The smallest mixed-precision plan within a drop of your own metric, from Python.

``dyadiq.quantize(..., max_drop=..., evaluate=callback)`` measures each plan it considers by
calling ``evaluate(model_path) -> float`` (higher is better) on a complete QDQ model, as NNCF's
``quantize_with_accuracy_control`` calls its validation function. Here the zoo's Fashion-MNIST
CNN and its test images stand in for your model and your held-out data.

    python examples/max_drop_with_callback.py [OUTDIR]
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

import dyadiq
from dyadiq import zoo

ARTIFACTS = zoo.get("fashion_cnn")  # your model and data would go here
HELD_OUT = list(ARTIFACTS.evaluation_batches(500))  # (feeds, labels) batches


def accuracy(model_path: Path) -> float:
    """Top-1 accuracy on the held-out images, with onnxruntime as it would run in production."""
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    correct = total = 0
    for feeds, labels in HELD_OUT:
        logits = session.run(None, feeds)[0]
        correct += int(np.sum(logits.argmax(axis=1) == labels))
        total += len(labels)
    return correct / total


def main(out: Path) -> dyadiq.QuantizedModel:
    made = dyadiq.quantize(
        ARTIFACTS.model_path,
        list(ARTIFACTS.calibration_batches(128)),
        out=out,
        max_drop="1%",  # of a fraction: one point of accuracy
        evaluate=accuracy,
        search=dyadiq.SearchOptions(analysis_samples=16, bisect_steps=3),
    )
    info = made.allocation.info
    print(made)
    print(
        f"accuracy {info['plan_metric']:.4f} (float {info['float_metric']:.4f}), "
        f"{info['weight_bytes']:,.0f} B of weights; formats:",
        {layer: f.label for layer, f in made.plan.layers.items()},
    )
    return made


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "out/max_drop_with_callback"))
