"""Gemma 3 270M: the ILP on GPTQ weights (issue 17), made cheap enough to run on a small machine.

The expensive parts of ``benchmarks.llm --stages dyadiq`` are done once and kept on disk, so
that every step can be resumed and every later experiment reuses them:

1. ``hessians``: H = E[x x^T] of every distinct MatMul input over the calibration windows
   (one pass of the float model per window) -> ``WORK/hessians.npz``;
2. ``gptq``: every weight GPTQ-quantized at each width, one file per layer and width
   (``WORK/gptq/b<bits>/<layer>.npz``: codes, scales, zero points), skipped when present;
3. ``damage``: per layer and width, the next-token KL to the float model with that layer
   alone at that width (GPTQ weights from step 2), on the first ``--sens-windows`` of the
   calibration windows (as ``benchmarks.llm`` picks them), written after every layer
   (``WORK/damage_*.json``, with the seconds each measurement took beside it);
4. ``ilp``: the existing allocation ILP at each ``--budgets`` value; each plan is written as
   blocked DequantizeLinear from the cached codes and scored on the evaluation windows.

``--out`` gets ``llm_gptq_ilp.json`` in the layout of ``benchmarks.llm``'s results, so that
``python -m benchmarks.llm --merge`` puts its rows into a main table.

Widths: ``--widths`` for every weight; ``--table-widths`` for the tied embedding / LM head
(62% of the weights: at 5 bits or more it alone exceeds a 3.5-bit budget, so measuring it
there would be wasted forward passes).

    .venv/bin/python -m benchmarks.llm_gptq_ilp --work /tmp/wo6 --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.llm import file_bytes, run_header, score
from dyadiq import zoo
from dyadiq.backends.onnx.weight_only import WeightOnlyForm
from dyadiq.cli.weight_only_settings import add_settings_arguments, settings_from_args
from dyadiq.passes.weight_only.allocation import allocate_widths
from dyadiq.passes.weight_only.groupwise import ClipObjective, GroupwiseWeight
from dyadiq.passes.weight_only.layers import WeightLayer, find_weights
from dyadiq.passes.weight_only.model_file import ModelFile
from dyadiq.passes.weight_only.pipeline import Prepared, run
from dyadiq.passes.weight_only.quantize import LayerQuantizer, Method, WeightOnlySettings
from dyadiq.passes.weight_only.sensitivity import WeightFedModel, kl_damage
from dyadiq.passes.weight_only.statistics import activation_hessians
from dyadiq.passes.weight_only.width_plans import uniform_widths
from dyadiq.zoo import gemma3

log = logging.getLogger("benchmarks.llm_gptq_ilp")
RESULTS = Path(__file__).resolve().parent / "results"
# the settings flags this benchmark offers (dyadiq.cli.weight_only_settings declares them):
# its cached GPTQ codes are made from these alone, the rest at the settings' defaults
SETTINGS_FLAGS = ("group_size", "damp", "tied_damp", "clip_search", "clip_objective")


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def hessians(
    work: Path,
    source: ModelFile,
    layers: Sequence[WeightLayer],
    windows: int,
    text: str = gemma3.PLAYS_TEXT,
) -> dict:
    """Every MatMul input's H over ``windows`` calibration windows of ``text`` (the plays,
    or the Britannica tail: :data:`dyadiq.zoo.gemma3.CALIBRATION_TEXTS`), cached in ``work``."""
    prefix = "" if text == gemma3.PLAYS_TEXT else f"{text}_"
    path = work / f"hessians_{prefix}{windows}.npz"
    if path.exists():
        with np.load(path) as data:
            names = json.loads(str(data["__names__"]))
            return {name: data[f"h{k}"] for k, name in enumerate(names)}
    t0 = time.perf_counter()
    found = activation_hessians(source, layers, gemma3.calibration_batches(windows, text=text))
    names = sorted(found)
    arrays = {f"h{k}": found[name] for k, name in enumerate(names)}
    np.savez(path, __names__=json.dumps(names), **arrays)
    log.info(
        "Hessians of %d inputs from %d windows of %s: %.0f s",
        len(names),
        windows,
        text,
        time.perf_counter() - t0,
    )
    return found


class CachedGptq:
    """GPTQ results per (layer, width) on disk; computed on first use."""

    def __init__(self, folder: Path, prepared: Prepared) -> None:
        self.folder = folder
        self.prepared = prepared
        self.seconds: dict[str, float] = {}
        # codes made with other settings must not be mixed in: the folder records its own
        settings = json.dumps(repr(prepared.quantizer.settings))
        stamp = folder / "settings.json"
        same = _stamps(prepared.quantizer.settings)
        if stamp.exists() and stamp.read_text() not in same:
            raise SystemExit(f"{folder} holds codes of other settings: {stamp.read_text()}")
        folder.mkdir(parents=True, exist_ok=True)
        if not stamp.exists():
            stamp.write_text(settings)

    def path(self, layer: WeightLayer, bits: int) -> Path:
        return self.folder / f"b{bits}" / f"{_safe(layer.id)}.npz"

    def get(self, layer: WeightLayer, bits: int) -> GroupwiseWeight:
        path = self.path(layer, bits)
        fmt = self.prepared.quantizer.settings.format(bits)
        if path.exists():
            with np.load(path) as data:
                return GroupwiseWeight(
                    data["codes"].astype(np.int16), data["scales"], data["zeros"], fmt
                )
        t0 = time.perf_counter()
        q = self.prepared.quantizer(layer, self.prepared.weight(layer), bits)
        self.seconds[f"{layer.id}@{bits}"] = time.perf_counter() - t0
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        codes = q.codes.astype(np.int8 if q.format.symmetric else np.uint8)
        np.savez(tmp, codes=codes, scales=q.scales, zeros=q.zero_points)
        os.replace(tmp, path)
        return q


# settings fields added after the first caches were written, with the value every code
# had before the field existed (not today's default: the clip objective's changed since)
_LATER_FIELDS: dict[str, object] = {
    "sequential": False,
    "stage_size": 4,
    "clip_objective": ClipObjective.WEIGHT,
    "salient_fraction": 0.0,
    "awq": False,
    "awq_bits": 4,
}


def _stamps(settings: WeightOnlySettings) -> set[str]:
    """The stamps of caches with these settings: today's repr, and the reprs of earlier
    versions of the settings, which lacked some of the later fields (they match where the
    field holds the value codes had before it existed: the codes are the same)."""
    full = repr(settings)
    at_default = [
        f", {name}={getattr(settings, name)!r}"
        for name, before in _LATER_FIELDS.items()
        if hasattr(settings, name) and getattr(settings, name) == before
    ]
    out = set()
    for mask in range(2 ** len(at_default)):
        text = full
        for k, segment in enumerate(at_default):
            if mask >> k & 1:
                text = text.replace(segment, "")
        out.add(json.dumps(text))
    return out


def sensitivity_batches(text: str, calib_windows: int, sens_windows: int) -> list[dict]:
    """The first ``sens_windows`` of the ``calib_windows`` calibration windows, as
    ``benchmarks.llm`` measures its damages (the spread Britannica windows of a smaller count
    are other windows: ``calibration_batches(2)`` spans the whole article)."""
    return list(gemma3.calibration_batches(calib_windows, text=text))[:sens_windows]


def damage_path(work: Path, text: str, calib_windows: int, sens_windows: int, suffix: str) -> Path:
    """The damage cache: the plays' keeps the name of the earlier runs (the plays' first
    windows do not depend on the count asked for); other texts' name their calibration count."""
    if text == gemma3.PLAYS_TEXT:
        return work / f"damage_{sens_windows}{suffix}.json"
    return work / f"damage_{sens_windows}of{calib_windows}{suffix}.json"


def _gptq_order(widths: Sequence[int]) -> list[int]:
    """4 first (the uniform row), then down, then up: the cheap rows come early."""
    unique = sorted(set(widths))
    return sorted(unique, key=lambda b: (b > 4, abs(b - 4)))


def widths_of(layer: WeightLayer, widths: Sequence[int], table: Sequence[int]) -> list[int]:
    return list(table) if layer.tied else list(widths)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--out", type=Path, default=None, help="write llm_gptq_ilp.{md,json} here")
    p.add_argument("--stages", default="hessians,gptq,damage,ilp")
    p.add_argument("--calib-windows", type=int, default=64)
    p.add_argument("--sens-windows", type=int, default=1)
    p.add_argument("--eval-windows", type=int, default=32)
    p.add_argument("--widths", default="2,3,4,5,6,8")
    p.add_argument("--table-widths", default="2,3,4")
    p.add_argument("--budgets", default="3.5,3.0")
    p.add_argument("--uniform", default="", help="uniform widths also scored, e.g. 4")
    # GPTQ codes of another clip objective or text are cached in their own folder
    add_settings_arguments(p, SETTINGS_FLAGS)
    p.add_argument(
        "--calib-text",
        default=gemma3.PLAYS_TEXT,
        choices=gemma3.CALIBRATION_TEXTS,
        help="the Hessians' and sensitivity windows' text (codes and damages of a text other "
        "than the plays are cached under their own names)",
    )
    p.add_argument("--tag", default="", help="appended to the ILP rows' names")
    p.add_argument(
        "--table-methods",
        default="gptq",
        help="methods measured for the tied embedding / LM head (gptq, gptq-d<damp>, rtn: "
        "min-max, rtnclip: the range shrink); per width the ILP gets the one of least damage",
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    command = "python -m benchmarks.llm_gptq_ilp " + shlex.join(
        argv if argv is not None else sys.argv[1:]
    )
    stages = set(args.stages.split(","))
    widths = [int(b) for b in args.widths.split(",")]
    table = [int(b) for b in args.table_widths.split(",")]
    work: Path = args.work
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    float_path = zoo.get("gemma3_270m").model_path
    source = ModelFile.load(float_path)
    inventory = find_weights(source.header)
    layers = inventory.layers
    settings = settings_from_args(args, SETTINGS_FLAGS, method=Method.GPTQ)
    found = hessians(work, source, layers, args.calib_windows, args.calib_text)
    prepared = Prepared(source, inventory, LayerQuantizer(settings, found), 0.0, memo=True)
    # the plays' weight-objective folders keep the names the earlier runs wrote
    suffix = "" if args.calib_text == gemma3.PLAYS_TEXT else f"_{args.calib_text}"
    if settings.clip_objective is not ClipObjective.WEIGHT:
        suffix += f"_clip-{settings.clip_objective}"
    cache = CachedGptq(work / f"gptq{suffix}", prepared)
    # the tied table by other methods: GPTQ's compensation serves the LM head's inputs only,
    # and moves the embedding rows that the same tensor also is
    table_caches = {"gptq": cache}
    for method in args.table_methods.split(","):
        if method in ("rtn", "rtnclip"):
            rtn = WeightOnlySettings(
                method=Method.RTN, group_size=args.group_size, clip_search=method == "rtnclip"
            )
            rtn_prepared = Prepared(source, inventory, LayerQuantizer(rtn, {}), 0.0)
            table_caches[method] = CachedGptq(work / f"table_{method}", rtn_prepared)  # no H
        elif method.startswith("gptq-d"):  # more dampening: H + a I also weighs the rows' own
            # error, which is what the embedding lookup sees
            damp = float(method[6:])
            damped = WeightOnlySettings(
                method=Method.GPTQ,
                group_size=args.group_size,
                damp=damp,
                tied_damp=damp,
                clip_objective=settings.clip_objective,
            )
            damped_prepared = Prepared(source, inventory, LayerQuantizer(damped, found), 0.0)
            table_caches[method] = CachedGptq(work / f"table_{method}{suffix}", damped_prepared)
        elif method != "gptq":
            raise SystemExit(f"unknown table method {method}")

    if "gptq" in stages:
        for bits in _gptq_order([*widths, *table]):
            t0 = time.perf_counter()
            for layer in layers:
                if bits in widths_of(layer, widths, table):
                    cache.get(layer, bits)
            log.info("GPTQ at %d bits: %.0f s", bits, time.perf_counter() - t0)

    damage_file = damage_path(work, args.calib_text, args.calib_windows, args.sens_windows, suffix)
    # seconds per measurement, beside the damages (which older readers parse as widths)
    seconds_file = damage_file.with_suffix(".seconds.json")
    damage: dict[str, dict[int, float]] = {}
    if damage_file.exists():
        damage = {
            k: {int(b): float(v) for b, v in d.items()}
            for k, d in json.loads(damage_file.read_text()).items()
        }
    damage_seconds: dict[str, float] = (
        json.loads(seconds_file.read_text()) if seconds_file.exists() else {}
    )
    if "damage" in stages:
        t0 = time.perf_counter()
        batches = sensitivity_batches(args.calib_text, args.calib_windows, args.sens_windows)
        fed = WeightFedModel(source, layers, batches)

        def measure(
            layer: WeightLayer, key: str, source_cache: CachedGptq, wanted: list[int]
        ) -> None:
            t = time.perf_counter()
            part = kl_damage(
                _one(fed, layer), lambda x, b: source_cache.get(x, b).dequantize(), wanted
            )
            damage.setdefault(key, {}).update(part[layer.id])
            damage_seconds[f"{key}@{','.join(map(str, wanted))}"] = round(
                time.perf_counter() - t, 1
            )
            damage_file.write_text(json.dumps(damage, indent=1))
            seconds_file.write_text(json.dumps(damage_seconds, indent=1))

        for layer in layers:
            wanted = [
                b for b in widths_of(layer, widths, table) if b not in damage.get(layer.id, {})
            ]
            if wanted:
                measure(layer, layer.id, cache, wanted)
        for layer in (x for x in layers if x.tied):
            for method, other in table_caches.items():
                key = f"{layer.id}#{method}"
                wanted = [b for b in table if b not in damage.get(key, {})]
                if method != "gptq" and wanted:
                    measure(layer, key, other, wanted)
        del fed
        log.info("damage: %.0f s", time.perf_counter() - t0)

    rows: dict[str, dict[str, Any]] = {}
    windows = gemma3.evaluation_windows(args.eval_windows)
    window_bytes = [gemma3.window_bytes(w) for w in windows]
    head = next((x.id for x in layers if x.tied), None)

    # per width, the table's method of least measured damage
    table_method: dict[int, str] = {}
    ilp_damage = dict(damage)
    for layer in (x for x in layers if x.tied and x.id in damage):
        ilp_damage[layer.id] = dict(damage[layer.id])
        for b in table:
            options = {
                m: damage.get(layer.id if m == "gptq" else f"{layer.id}#{m}", {}).get(b)
                for m in table_caches
            }
            measured = {m: v for m, v in options.items() if v is not None}
            if measured:
                table_method[b] = min(measured, key=lambda m: measured[m])
                ilp_damage[layer.id][b] = measured[table_method[b]]
    log.info("tied table method per width: %s", table_method)

    def write_and_score(
        name: str, bits: Mapping[str, int], per_width: bool = True, **extra: Any
    ) -> None:
        for layer in layers:  # the cached codes, not a second GPTQ run
            b = bits[layer.id]
            source_cache = table_caches[table_method.get(b, "gptq")] if layer.tied else cache
            prepared._done[(layer.id, b)] = (source_cache.get(layer, b), 0.0)
        folder = work / _safe(name)
        report = run(float_path, folder, prepared, bits, WeightOnlyForm.DEQUANTIZE_LINEAR)
        rows[name] = {
            **score(folder, windows, window_bytes),
            "file_bytes": file_bytes(folder),
            "average_code_bits": report["average_code_bits"],
            "stored_weight_bytes": report["stored_weight_bytes"],
            "tied_embedding_bits": bits.get(head) if head else None,
            "tied_embedding_method": table_method.get(bits[head], "gptq") if head else None,
            **extra,
        }
        if per_width:  # benchmarks.llm's table reads it with the ILP's fields below
            rows[name]["layers_per_width"] = {
                str(b): sum(v == b for v in bits.values()) for b in sorted(set(bits.values()))
            }
        log.info("%s: %s", name, {k: v for k, v in rows[name].items() if k != "plan"})
        _write(args.out, command, args, rows, started, partial=True)

    for u in [int(b) for b in args.uniform.split(",") if b]:
        write_and_score(
            f"dyadiq GPTQ int{u} g{args.group_size} (cached codes{args.tag})",
            uniform_widths(layers, u),
            per_width=False,
        )
    if "ilp" in stages:
        by_layer = {x.id: widths_of(x, widths, table) for x in layers}
        for budget in [float(b) for b in args.budgets.split(",") if b]:
            bits, allocation = allocate_widths(layers, ilp_damage, by_layer, f"avg-wbits={budget}")
            used = [f"{x.id}@{b}" for x in layers for b in by_layer[x.id]] + [
                f"{x.id}#{m}@{b}" for x in layers if x.tied for m in table_caches for b in table
            ]
            write_and_score(
                f"dyadiq ILP avg {budget} bits (GPTQ g{args.group_size}{args.tag})",
                bits,
                predicted_damage=allocation.predicted_damage,
                # the measurements of the damages this ILP read, whichever run made them
                sensitivity_seconds=round(
                    sum(s for k, s in damage_seconds.items() if _covers(k, used)), 1
                ),
                sensitivity_windows=args.sens_windows,
                plan=bits,
            )
    _write(args.out, command, args, rows, started, partial=False)
    return 0


def _covers(measurement: str, used: Sequence[str]) -> bool:
    """Whether a ``layer@w1,w2`` damage measurement holds one of ``used`` (``layer@w``)."""
    key, _, widths = measurement.rpartition("@")
    return any(f"{key}@{w}" in used for w in widths.split(","))


def _one(fed: WeightFedModel, layer: WeightLayer) -> WeightFedModel:
    """``fed`` restricted to one layer (kl_damage iterates ``fed.layers``)."""
    view = object.__new__(WeightFedModel)
    view.__dict__.update(fed.__dict__)
    view.layers = [layer]
    return view


def _write(
    out: Path | None,
    command: str,
    args: argparse.Namespace,
    rows: dict[str, dict[str, Any]],
    started: float,
    *,
    partial: bool,
) -> None:
    if out is None:
        return
    out.mkdir(parents=True, exist_ok=True)
    (out / "llm_gptq_ilp.json").write_text(
        json.dumps(results(command, args, rows, started, partial=partial), indent=1, default=str)
    )


def results(
    command: str,
    args: argparse.Namespace,
    rows: dict[str, dict[str, Any]],
    started: float,
    *,
    partial: bool,
) -> dict[str, Any]:
    """The results file: ``benchmarks.llm``'s layout (its ``--merge`` reads it), plus this
    script's arguments and commit."""
    commit = subprocess.run(
        ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    return {
        **run_header(command, partial=partial),
        "commit": commit,  # empty when run from an exported tree (no .git)
        "eval_windows": args.eval_windows,
        "calib_windows": args.calib_windows,
        "calib_text": args.calib_text,
        "clip_objective": args.clip_objective,
        "salient_fraction": 0.0,  # this script's quantizer never sets salient channels
        "sens_windows": args.sens_windows,
        "widths": args.widths,
        "table_widths": args.table_widths,
        "args": vars(args) | {"work": str(args.work), "out": str(args.out)},
        "seconds": round(time.perf_counter() - started, 1),
        "rows": rows,
    }


if __name__ == "__main__":
    raise SystemExit(main())
