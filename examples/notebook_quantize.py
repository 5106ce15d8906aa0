"""dyadiq from a notebook: each ``# %%`` cell runs on its own in Jupyter / VS Code, and the
whole file runs as a script (the test suite runs it).

    python examples/notebook_quantize.py [OUTDIR]
"""

# %% [markdown]
# Quantize the zoo's Fashion-MNIST CNN to W8A8. `zoo:NAME` brings its own calibration and
# held-out data, so there is nothing else to pass; the defaults are the command line's.

# %%
from __future__ import annotations

import sys
from pathlib import Path

import dyadiq

OUT = Path(sys.argv[1] if len(sys.argv) > 1 else "out/notebook")

w8 = dyadiq.quantize("zoo:fashion_cnn", out=OUT / "w8a8", eval_limit=2000)
print(w8)  # one line: size before -> after, accuracy against float, verified or not

# %% [markdown]
# Every file the run wrote, by role, and the report as a dict.

# %%
for role, path in w8.paths.items():
    print(f"{role:12s} {path}")
print(w8.report["sizes"])

# %% [markdown]
# 4-bit weights, with the classifier (by op type) kept at full precision, and a TensorRT
# flavoured QDQ model of the 8-bit one (symmetric int8, zero point 0).

# %%
w4 = dyadiq.quantize(
    "zoo:fashion_cnn", out=OUT / "w4a8", wbits=4, exclude=["Gemm"], eval_limit=2000
)
trt = dyadiq.quantize(
    "zoo:fashion_cnn", out=OUT / "tensorrt", qdq_style="tensorrt", eval_limit=2000
)

# %%
for name, made in {"W8A8": w8, "W4A8, Gemm float": w4, "TensorRT W8A8": trt}.items():
    assert made.metrics is not None
    label = next(k for k in made.metrics if k != "float")
    accuracy = made.metrics[label]["accuracy"]
    size = made.report["sizes"]["qdq_model_bytes"]
    print(f"{name:18s} accuracy {accuracy:.4f}  model {size:,} B")
