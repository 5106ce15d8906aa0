"""Train the zoo's small Fashion-MNIST CNN once and export it to ONNX (not run in CI).

Usage (about 3-5 minutes on 2 CPU cores)::

    python examples/train_fashion_cnn.py --out dyadiq/zoo/data

Needs torch (``pip install torch==2.13.0``) and the Debian package ``dataset-fashion-mnist``.
Writes ``fashion_cnn.onnx`` (opset 17, input ``input`` of shape Nx1x28x28 float32, output
``logits`` Nx10) and ``fashion_cnn.json`` (float test accuracy, seed, epochs, command).
Preprocessing expected by the model: ``(pixel / 255 - 0.2860) / 0.3530``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shlex
import sys
import time
from typing import Any

import numpy as np

from dyadiq.zoo.fashion_cnn import MEAN, STD, load_idx, preprocess

SEED = 20240611


def build_model() -> Any:
    import torch.nn as nn

    def block(cin: int, cout: int) -> list[Any]:
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    return nn.Sequential(
        *block(1, 16),
        nn.MaxPool2d(2),  # 14x14
        *block(16, 32),
        nn.MaxPool2d(2),  # 7x7
        *block(32, 48),
        nn.MaxPool2d(2),  # 3x3
        nn.Flatten(),
        nn.Linear(48 * 3 * 3, 10),
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="/usr/share/datasets/fashion-mnist")
    parser.add_argument("--out", default="dyadiq/zoo/data")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--train-limit", type=int, help="train on the first N images only (a smoke run)"
    )
    args = parser.parse_args()

    import torch
    import torch.nn.functional as nnf

    torch.manual_seed(SEED)
    np.random.seed(SEED)
    torch.set_num_threads(args.threads)
    data = pathlib.Path(args.data)
    x_train = torch.from_numpy(preprocess(load_idx(data / "train-images-idx3-ubyte.gz")))
    y_train = torch.from_numpy(load_idx(data / "train-labels-idx1-ubyte.gz").astype(np.int64))
    if args.train_limit:
        x_train, y_train = x_train[: args.train_limit], y_train[: args.train_limit]
    x_test = torch.from_numpy(preprocess(load_idx(data / "t10k-images-idx3-ubyte.gz")))
    y_test = torch.from_numpy(load_idx(data / "t10k-labels-idx1-ubyte.gz").astype(np.int64))

    model = build_model()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"parameters: {n_params}")
    steps_per_epoch = (len(x_train) + args.batch_size - 1) // args.batch_size
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=6e-3, total_steps=args.epochs * steps_per_epoch
    )
    gen = torch.Generator().manual_seed(SEED)

    def test_accuracy() -> float:
        model.eval()
        correct = 0
        with torch.no_grad():
            for i in range(0, len(x_test), 1000):
                pred = model(x_test[i : i + 1000]).argmax(1)
                correct += int((pred == y_test[i : i + 1000]).sum())
        return correct / len(x_test)

    t0 = time.time()
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(x_train), generator=gen)
        total = 0.0
        for i in range(0, len(x_train), args.batch_size):
            idx = perm[i : i + args.batch_size]
            xb, yb = x_train[idx], y_train[idx]
            # Augmentation: random horizontal flip and a random shift of up to 2 pixels.
            flip = torch.rand(len(idx), generator=gen) < 0.5
            xb = torch.where(flip[:, None, None, None], xb.flip(3), xb)
            dx, dy = (int(v) for v in torch.randint(-2, 3, (2,), generator=gen))
            pad_value = float((0.0 - MEAN) / STD)
            xb = nnf.pad(xb, (2, 2, 2, 2), value=pad_value)[
                :, :, 2 + dy : 30 + dy, 2 + dx : 30 + dx
            ]
            loss = nnf.cross_entropy(model(xb), yb, label_smoothing=0.05)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        acc = test_accuracy()
        print(
            f"epoch {epoch + 1}/{args.epochs} loss {total / len(x_train):.4f} "
            f"test acc {acc:.4f} ({time.time() - t0:.0f}s)",
            flush=True,
        )

    model.eval()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    onnx_path = out / "fashion_cnn.onnx"
    torch.onnx.export(
        model,
        (torch.zeros(1, 1, 28, 28),),
        str(onnx_path),
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        opset_version=17,
        do_constant_folding=True,
        dynamo=False,  # the TorchScript exporter: plain Conv/BatchNorm/Gemm, no onnxscript
    )

    # Float accuracy of the exported ONNX itself (what the zoo reports).
    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    correct = 0
    for i in range(0, len(x_test), 1000):
        logits = sess.run(None, {"input": x_test[i : i + 1000].numpy()})[0]
        correct += int((logits.argmax(1) == y_test[i : i + 1000].numpy()).sum())
    onnx_acc = correct / len(x_test)
    print(f"onnx float test accuracy: {onnx_acc:.4f}")
    meta = {
        "name": "fashion_cnn",
        "float_test_accuracy": onnx_acc,
        "test_samples": len(x_test),
        "seed": SEED,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "parameters": n_params,
        "preprocessing": f"(pixel / 255 - {MEAN}) / {STD}, NCHW 1x28x28",
        "torch": torch.__version__,
        "training_seconds": round(time.time() - t0, 1),
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
    }
    (out / "fashion_cnn.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(json.dumps(meta, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
