"""Gemma 3 270M, GPTQ int4 g128: which change to the quantizer brings it closer to float
(issue 17, target: within 3% of float perplexity).

Each variant quantizes every weight (the tied embedding / LM head included) at 4 bits and is
scored without writing a model: the dequantised weights are fed to one onnxruntime session
of the float graph in which every weight is an input (the session the sensitivity analysis
uses), on the same evaluation windows as ``benchmarks.llm`` (perplexity = exp(mean NLL) of
all 63 predicted tokens of each window). This path is not the exported one: it gives 57.01
for ``baseline`` (exported: 57.60) and 84.69 for ``rtn`` (exported: 84.98), so compare its
rows with each other; ``exported=PATH`` scores a written model on the same windows
(``exported-float=PATH``: with the MatMulNBits onnxruntime fuses from DequantizeLinear ->
MatMul computing in float instead of on int8 activations).

Variants (names for ``--variants``):

- ``baseline``: GPTQ as it was before the tied table had its own dampening (asymmetric,
  act order, static groups, damp 0.01 everywhere, per-group range shrink of least squared
  rounding error), from llm_gptq_ilp's cache;
- ``rtn``: round to nearest (with the range shrink);
- ``minmax``: the same without the range shrink;
- ``damp0.1``: dampening 0.1;
- ``hclip``: the range shrink chosen by the layer's input second moments (diag H weighted
  rounding error) instead of the plain squared error;
- ``salient1``, ``salient2``: the 1% / 2% input channels with the largest E[x_j^2] kept out
  of the 4-bit grid: swept last (GPTQ pushes every other column's error onto them) and then
  stored at 8 bits (per-row scale, symmetric) as in PB-LLM / PTQ1.61;
- ``calib256``: Hessians from 256 calibration windows instead of 64;
- ``default``: today's defaults (the tied table at dampening 0.3), computed here;
- ``BODY+table=T``: the tied embedding / LM head by ``T`` instead (``rtn``, ``rtnclip``,
  ``b<bits>``: the cached GPTQ at that width, ``gptq-d<damp>``: llm_gptq_ilp's cached
  4-bit table at that dampening, or any body name);
- ``seq<S>``: sequential GPTQ (today's defaults; S inputs per stage, default 4: each
  transformer block's Hessians from the quantized prefix);
- ``wo-salient<P>``: the weight-only pipeline proper (``WeightOnlySettings(salient_fraction=
  P / 100)``, today's other defaults, ``wo-salient0``: none), written as a blocked
  DequantizeLinear model under ``--work`` and scored as ``benchmarks.llm`` scores a file
  (onnxruntime's default optimizations); with ``--verify N`` also its first N windows with
  float compute against the fed path of the same dequantised weights;
- ``VARIANT@TEXTN``: Hessians from ``N`` calibration windows of ``TEXT`` (``plays``, or
  ``britannica-tail``: the last N windows of the evaluation text, disjoint from the first
  windows that are scored) instead of the first 64 windows of the plays.

    .venv/bin/python -m benchmarks.llm_gptq_variants --work /tmp/wo6 --variants baseline,salient1
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import math
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.llm_gptq_ilp import CachedGptq, hessians
from dyadiq import zoo
from dyadiq.backends.onnx.weight_only import WeightOnlyForm
from dyadiq.ort_sessions import Kernels
from dyadiq.passes.compensation.gptq import gptq_factor, gptq_group_codes
from dyadiq.passes.weight_only.groupwise import (
    GroupwiseWeight,
    clipped_group_scales,
    dequantize,
)
from dyadiq.passes.weight_only.layers import WeightLayer, find_weights
from dyadiq.passes.weight_only.model_file import (
    EXTERNAL_FOLDER_KEY,
    ModelFile,
    session_options,
    with_fed_weights,
)
from dyadiq.passes.weight_only.pipeline import MODEL_FILE, Prepared, run
from dyadiq.passes.weight_only.quantize import (
    LayerQuantizer,
    Method,
    WeightOnlySettings,
    layer_hessian,
    quantize_weight,
)
from dyadiq.passes.weight_only.sensitivity import log_softmax32
from dyadiq.passes.weight_only.sequential import sequential_quantize
from dyadiq.zoo import gemma3

log = logging.getLogger("benchmarks.llm_gptq_variants")

# layer, its float W [R, K], its H (None: no MatMul reader) -> dequantised W and code bits
Quantizer = Callable[[WeightLayer, np.ndarray, "np.ndarray | None"], tuple[np.ndarray, float]]


class FedScorer:
    """Perplexity of the float graph with every weight-only weight fed as an input."""

    def __init__(self, source: ModelFile, layers: Sequence[WeightLayer], windows: int) -> None:
        self.layers = list(layers)
        shapes = {
            x.initializer: tuple(int(d) for d in source.array(x.initializer).shape)
            for x in self.layers
        }
        self.session = source.session(with_fed_weights(source.header, shapes))
        self.output = self.session.get_outputs()[0].name
        self.windows = gemma3.evaluation_windows(windows)
        self.bytes = sum(gemma3.window_bytes(w) for w in self.windows)

    def perplexity(self, weights: Mapping[str, np.ndarray], session: Any = None) -> dict[str, Any]:
        """Perplexity, bits per byte and each window's NLL (for paired comparisons);
        ``session``: another model's session (an exported one) on the same windows."""
        run = session or self.session
        output = run.get_outputs()[0].name
        per_window = []
        for window in self.windows:
            feeds = {gemma3.INPUT_NAME: window[None, :], **(weights if session is None else {})}
            log_p = log_softmax32(run.run([output], feeds)[0])[:-1]
            picked = log_p[np.arange(len(window) - 1), window[1:]]
            per_window.append(-float(np.sum(picked, dtype=np.float64)))
        nll, tokens = sum(per_window), sum(len(w) - 1 for w in self.windows)
        return {
            "perplexity": math.exp(nll / tokens),
            "bits_per_byte": nll / math.log(2) / self.bytes,
            "nll_per_window": per_window,
        }


def _kept_columns(h: np.ndarray, fraction: float) -> np.ndarray:
    """The ``fraction`` of input channels with the largest E[x_j^2] (at least one)."""
    count = max(1, round(fraction * h.shape[0]))
    mask = np.zeros(h.shape[0], bool)
    mask[np.argsort(-np.diag(h), kind="stable")[:count]] = True
    return mask


def _int8_rows(values: np.ndarray) -> np.ndarray:
    """Symmetric 8-bit per-row round trip of ``values`` [R, k]."""
    scale = np.abs(values).max(axis=1, keepdims=True) / 127
    scale = np.where(scale > 0, scale, 1.0)
    return (np.clip(np.round(values / scale), -127, 127) * scale).astype(np.float32)


def salient_quantizer(settings: WeightOnlySettings, fraction: float, bits: int = 4) -> Quantizer:
    fmt = settings.format(bits)
    factors: dict[int, Any] = {}

    def quantize(
        layer: WeightLayer, w: np.ndarray, h: np.ndarray | None
    ) -> tuple[np.ndarray, float]:
        if h is None:  # no reader with inputs: nothing is salient
            raise ValueError(f"{layer.id} has no Hessian")
        kept = _kept_columns(h, fraction)
        key = id(h)
        if key not in factors:
            factors[key] = gptq_factor(h[None], damp=settings.damp, act_order=True, last=kept[None])
        scales, zeros = clipped_group_scales(w, fmt)
        values = np.zeros(w.shape, np.float64)
        codes = gptq_group_codes(
            w,
            factors[key],
            scales,
            zeros,
            fmt.group_size,
            fmt.code_range,
            kept=kept,
            kept_values=values,
        )
        out = dequantize(codes, scales, zeros, fmt)
        out[:, kept] = _int8_rows(values[:, kept])
        # 4-bit codes stay stored for kept columns in a blocked layout; the 8-bit copy and
        # its per-row scale come on top
        extra = (8 * kept.sum() * w.shape[0] + 32 * w.shape[0]) / w.size
        return out, float(bits + extra)

    return quantize


def hessian_clip_quantizer(settings: WeightOnlySettings, bits: int = 4) -> Quantizer:
    """GPTQ on a grid whose per-group shrink minimises sum_j H_jj (w_j - q_j)^2."""
    from dyadiq.passes.weight_only.groupwise import CLIP_SHRINKS, _grid, _grouped_extremes
    from dyadiq.passes.weight_only.groupwise import quantize as rtn

    fmt = settings.format(bits)
    quantizer = LayerQuantizer(settings, {})

    def quantize(
        layer: WeightLayer, w: np.ndarray, h: np.ndarray | None
    ) -> tuple[np.ndarray, float]:
        if h is None:
            raise ValueError(f"{layer.id} has no Hessian")
        rows = w.shape[0]
        g = fmt.group_size
        weight = np.diag(h).astype(np.float32)[None, :]
        lo, hi = _grouped_extremes(w, g)
        best_s, best_z = _grid(lo, hi, fmt)
        best_e = np.full(lo.shape, np.inf, np.float32)
        for shrink in CLIP_SHRINKS:
            s, z = _grid(lo * np.float32(shrink), hi * np.float32(shrink), fmt)
            err = ((dequantize(rtn(w, s, z, fmt), s, z, fmt) - w) ** 2) * weight
            e = err.reshape(rows, -1, g).sum(axis=2)
            better = e < best_e
            best_e = np.where(better, e, best_e)
            best_s = np.where(better, s, best_s)
            best_z = np.where(better, z, best_z)
        quantizer.hessians = {a: h for a in layer.activations}
        factor = quantizer.factor(layer)
        codes = gptq_group_codes(
            w, factor, best_s.astype(np.float32), best_z.astype(np.int16), g, fmt.code_range
        )
        return dequantize(codes, best_s.astype(np.float32), best_z.astype(np.int16), fmt), bits

    return quantize


def settings_quantizer(settings: WeightOnlySettings, bits: int = 4) -> Quantizer:
    cache: dict[tuple[str, ...], LayerQuantizer] = {}

    def quantize(
        layer: WeightLayer, w: np.ndarray, h: np.ndarray | None
    ) -> tuple[np.ndarray, float]:
        q = LayerQuantizer(settings, {a: h for a in layer.activations} if h is not None else {})
        key = layer.activations
        if key in cache:  # reuse the factor of an input seen before
            q._factors = cache[key]._factors
        cache[key] = q
        return q(layer, w, bits).dequantize(), float(bits)

    return quantize


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, required=True, help="llm_gptq_ilp's work folder")
    p.add_argument("--variants", default="baseline")
    p.add_argument("--eval-windows", type=int, default=32)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--export", action="store_true", help="seq variants: also write and score")
    p.add_argument(
        "--verify",
        type=int,
        default=0,
        help="wo-salient variants: windows scored both as exported (float compute) and fed",
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    command = "python -m benchmarks.llm_gptq_variants " + shlex.join(
        argv if argv is not None else sys.argv[1:]
    )
    started = time.perf_counter()
    source = ModelFile.load(zoo.get("gemma3_270m").model_path)
    layers = find_weights(source.header).layers
    found64 = hessians(args.work, source, layers, 64)
    base = WeightOnlySettings(method=Method.GPTQ, tied_damp=0.01)  # the defaults until now
    scorer = FedScorer(source, layers, args.eval_windows)
    out_json = (args.out or args.work) / "llm_gptq_variants.json"
    rows: dict[str, Any] = json.loads(out_json.read_text())["rows"] if out_json.exists() else {}
    params = sum(x.params for x in layers)
    for variant in args.variants.split(","):
        t0 = time.perf_counter()
        if variant.startswith(("exported=", "exported-float=")):  # a written model, scored
            path = Path(variant.partition("=")[2])
            model = ModelFile.load(path / MODEL_FILE if path.is_dir() else path)
            session = (
                _float_compute_session(model)
                if variant.startswith("exported-float=")
                else model.session(model.header)
            )
            rows[variant] = scorer.perplexity({}, session)
            rows[variant]["command"] = command
            log.info("%s: %s", variant, rows[variant]["perplexity"])
            _save(out_json, command, args.eval_windows, started, rows)
            continue
        spec, _, calibration = variant.partition("@")
        body_name, _, table_name = spec.partition("+table=")
        found = found64
        if body_name.startswith("calib"):
            found = hessians(args.work, source, layers, int(body_name[5:]))
        if calibration:  # @plays256, @britannica-tail64: Hessians from that text
            found = hessians(args.work, source, layers, *reversed(_calibration_text(calibration)))
        weights: dict[str, np.ndarray] = {}
        code_bits = 0.0
        if body_name.startswith("wo-salient"):
            rows[variant] = _pipeline_salient(
                variant, float(body_name[10:]) / 100, found, source, scorer, args
            )
            rows[variant]["command"] = command
            log.info("%s: %s", variant, rows[variant]["perplexity"])
            _save(out_json, command, args.eval_windows, started, rows)
            continue
        if body_name.startswith("seq"):  # seq<stage size>: sequential GPTQ, today's defaults
            text, windows = _calibration_text(calibration or "plays64")
            settings = WeightOnlySettings(method=Method.GPTQ)
            quantizer = LayerQuantizer(settings, found)
            # the tied table comes first on its float H with dampening 0.3: exactly
            # llm_gptq_ilp's cached gptq-d0.3 codes when calibrated on the plays
            table_cache = _damped_table(args.work, source, 0.3) if not calibration else None

            def quantize(
                layer: WeightLayer,
                w: np.ndarray,
                bits: int,
                h: np.ndarray | None,
                table_cache: CachedGptq | None = table_cache,
                quantizer: LayerQuantizer = quantizer,
            ) -> GroupwiseWeight:
                if layer.tied and table_cache is not None:
                    return table_cache.get(layer, bits)
                return quantizer.on_hessian(layer, w, bits, h)

            done = sequential_quantize(
                source,
                layers,
                gemma3.calibration_batches(windows, text=text),
                {x.id: 4 for x in layers},
                quantize,
                found,
                stage_size=int(body_name[3:] or 4),
            )
            for layer in layers:
                deq = done[layer.id].dequantize()
                weights[layer.initializer] = np.ascontiguousarray(layer.stored(deq))
                code_bits += 4 * layer.params
            if args.export:  # the same codes written as blocked DequantizeLinear, scored too
                inventory = find_weights(source.header)
                prepared = Prepared(source, inventory, LayerQuantizer(settings, found), 0.0)
                prepared.memo = True
                prepared._done.update({(x.id, 4): (done[x.id], 0.0) for x in layers})
                folder = args.work / re.sub(r"[^A-Za-z0-9_.-]", "_", variant)
                float_path = zoo.get("gemma3_270m").model_path
                report = run(
                    float_path,
                    folder,
                    prepared,
                    {x.id: 4 for x in layers},
                    WeightOnlyForm.DEQUANTIZE_LINEAR,
                )
                model = ModelFile.load(folder / MODEL_FILE)
                rows[f"{variant} exported"] = {
                    **scorer.perplexity({}, model.session(model.header)),
                    "model": str(folder),
                    "stored_weight_bytes": report["stored_weight_bytes"],
                    "command": command,
                }
                log.info("%s exported: %s", variant, rows[f"{variant} exported"]["perplexity"])
                _save(out_json, command, args.eval_windows, started, rows)
        body = _body_quantizer(body_name, base, args.work, source) if not weights else None
        table = _table_quantizer(table_name, base, args.work, source) if table_name else body
        for layer in layers if body is not None and table is not None else []:
            w = np.asarray(layer.matrix(source.array(layer.initializer)), np.float32)
            h = layer_hessian(layer, found)
            deq, b = (table if layer.tied else body)(layer, w, h)
            weights[layer.initializer] = np.ascontiguousarray(layer.stored(deq))
            code_bits += b * layer.params
        quantize_s = time.perf_counter() - t0
        result = scorer.perplexity(weights)
        rows[variant] = {
            **result,
            "average_bits": code_bits / params,
            "quantize_seconds": round(quantize_s, 1),
            "seconds": round(time.perf_counter() - t0, 1),
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "load_average": os.getloadavg(),
            "command": command,
        }
        log.info("%s: %s", variant, rows[variant])
        _save(out_json, command, args.eval_windows, started, rows)
        del weights
    return 0


def _pipeline_salient(
    variant: str,
    fraction: float,
    found: Mapping[str, np.ndarray],
    source: ModelFile,
    scorer: FedScorer,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """GPTQ int4 g128 with ``fraction`` salient channels through the weight-only pipeline
    (``run``: the model file a user gets), scored from the written file."""
    t0 = time.perf_counter()
    settings = WeightOnlySettings(method=Method.GPTQ, salient_fraction=fraction)
    inventory = find_weights(source.header)
    prepared = Prepared(source, inventory, LayerQuantizer(settings, found), 0.0, memo=True)
    bits = {x.id: 4 for x in inventory.layers}
    folder = args.work / re.sub(r"[^A-Za-z0-9_.-]", "_", variant)
    report = run(
        zoo.get("gemma3_270m").model_path, folder, prepared, bits, WeightOnlyForm.DEQUANTIZE_LINEAR
    )
    quantize_s = time.perf_counter() - t0
    model = ModelFile.load(folder / MODEL_FILE)
    row: dict[str, Any] = {
        **scorer.perplexity({}, model.session(model.header)),
        "model": str(folder),
        "salient_fraction": fraction,
        "quantized_params": report["quantized_params"],
        "stored_weight_bytes": report["stored_weight_bytes"],
        "bits_per_weight": 8 * report["stored_weight_bytes"] / report["quantized_params"],
        "file_bytes": sum(report["files"].values()),
        "salient_columns": report["export"]["salient_columns"],
        "quantize_seconds": round(quantize_s, 1),
    }
    if args.verify:  # the written file with float compute against the fed dequantised weights
        windows = scorer.windows
        scorer.windows = windows[: args.verify]
        exact = scorer.perplexity({}, _float_compute_session(model))
        fed = scorer.perplexity(
            {
                x.initializer: np.ascontiguousarray(x.stored(prepared.quantize(x, 4).dequantize()))
                for x in inventory.layers
            }
        )
        scorer.windows = windows
        row["verify"] = {
            "windows": args.verify,
            "exported_float_compute": exact["perplexity"],
            "fed": fed["perplexity"],
            "relative_difference": exact["perplexity"] / fed["perplexity"] - 1,
        }
    row.update(
        seconds=round(time.perf_counter() - t0, 1),
        date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        load_average=os.getloadavg(),
    )
    return row


def _float_compute_session(model: ModelFile) -> Any:
    """A session of ``model`` with onnxruntime's optimizations, but the MatMulNBits it fuses
    from DequantizeLinear -> MatMul computed in float (its default, accuracy level 4,
    quantizes the activations to int8)."""
    import onnxruntime as ort

    options = session_options(Kernels.RUNTIME)
    options.add_session_config_entry(EXTERNAL_FOLDER_KEY, str(model.base_dir))
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    return ort.InferenceSession(
        model.header.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


def _calibration_text(spec: str) -> tuple[str, int]:
    """``plays64`` -> ("plays", 64)."""
    text = spec.rstrip("0123456789")
    return text, int(spec[len(text) :])


def _save(
    path: Path, command: str, eval_windows: int, started: float, rows: Mapping[str, Any]
) -> None:
    commit = subprocess.run(
        ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {
        "command": command,
        "commit": commit,
        "eval_windows": eval_windows,
        "seconds": round(time.perf_counter() - started, 1),
        "rows": rows,
    }
    path.write_text(json.dumps(data, indent=1))


def _cached_gptq(work: Path, source: ModelFile, bits: int) -> Quantizer:
    """The default GPTQ's codes, from llm_gptq_ilp's cache (computed there if missing)."""
    base = WeightOnlySettings(method=Method.GPTQ, tied_damp=0.01)
    found = hessians(work, source, find_weights(source.header).layers, 64)
    prepared = Prepared(source, find_weights(source.header), LayerQuantizer(base, found), 0.0)
    return _cached(CachedGptq(work / "gptq", prepared), bits)


def _body_quantizer(
    name: str, base: WeightOnlySettings, work: Path, source: ModelFile
) -> Quantizer:
    if name == "baseline":
        return _cached_gptq(work, source, 4)
    if name == "default":  # today's defaults (the tied table dampened 0.3), computed here
        return settings_quantizer(WeightOnlySettings(method=Method.GPTQ))
    if name == "rtn":  # dyadiq RTN int4 g128 of llm.md (range shrink on, no Hessian)
        return settings_quantizer(WeightOnlySettings(method=Method.RTN))
    if name == "minmax":
        return settings_quantizer(WeightOnlySettings(method=Method.GPTQ, clip_search=False))
    if name.startswith("damp"):
        damp = float(name[4:])
        return settings_quantizer(WeightOnlySettings(method=Method.GPTQ, damp=damp, tied_damp=damp))
    if name == "hclip":
        return hessian_clip_quantizer(base)
    if name.startswith("salient"):
        return salient_quantizer(base, float(name[7:]) / 100)
    if name.startswith("calib"):
        return settings_quantizer(base)
    raise SystemExit(f"unknown variant {name}")


def _table_quantizer(
    name: str, base: WeightOnlySettings, work: Path, source: ModelFile
) -> Quantizer:
    """The tied embedding / LM head's options: ``rtn`` / ``rtnclip`` (no GPTQ: its
    compensation serves the LM head's inputs only, and moves the embedding rows), ``b<bits>``
    (the default GPTQ at that width), or any body quantizer's name."""
    if name in ("rtn", "rtnclip"):
        fmt = base.format(4)

        def rtn(
            layer: WeightLayer, w: np.ndarray, h: np.ndarray | None
        ) -> tuple[np.ndarray, float]:
            q = quantize_weight(w, fmt, method=Method.RTN, clip_search=name == "rtnclip")
            return q.dequantize(), 4.0

        return rtn
    if name.startswith("b"):
        return _cached_gptq(work, source, int(name[1:]))
    if name.startswith("gptq-d"):  # llm_gptq_ilp's cached table at that dampening, 4 bits
        return _cached(_damped_table(work, source, float(name[6:])), 4)
    return _body_quantizer(name, base, work, source)


def _damped_table(work: Path, source: ModelFile, damp: float) -> CachedGptq:
    """llm_gptq_ilp's cache of the tied table GPTQ-quantized at dampening ``damp`` (plays)."""
    damped = WeightOnlySettings(method=Method.GPTQ, damp=damp, tied_damp=damp)
    found = hessians(work, source, find_weights(source.header).layers, 64)
    inventory = find_weights(source.header)
    prepared = Prepared(source, inventory, LayerQuantizer(damped, found), 0.0)
    return CachedGptq(work / f"table_gptq-d{damp}", prepared)


def _cached(cached: CachedGptq, table_bits: int) -> Quantizer:
    def quantize(
        layer: WeightLayer, w: np.ndarray, h: np.ndarray | None
    ) -> tuple[np.ndarray, float]:
        q: GroupwiseWeight = cached.get(layer, table_bits)
        return q.dequantize(), float(table_bits)

    return quantize


if __name__ == "__main__":
    raise SystemExit(main())
