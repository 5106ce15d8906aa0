"""Run a TVM Relax library on many inputs; executed by an aarch64 Python under qemu-user.

Not imported by dyadiq: ``backends/tvm/aarch64.py`` starts it as
``qemu-aarch64 -L SYSROOT SYSROOT/usr/bin/python3.11 aarch64_runner.py REQUEST.json``.
The aarch64 side has only the TVM runtime (``TVM_USE_RUNTIME_LIB=1``, so ``tvm.relax`` is not
importable) and numpy, hence this file imports nothing else and uses
``tvm.runtime.vm.VirtualMachine`` directly.

Protocol (all paths absolute, in one temporary folder):
  request.json  {"library": .so, "function": name, "inputs": .npz, "outputs": .npz, "count": n}
  inputs.npz    arrays "<call>/<parameter name>" for call 0..n-1 (split at the first "/", so
                names may contain "/" themselves)
  outputs.npz   arrays "<call>/<output index>", written by this script (tuples flattened in
                order); its absence after a zero exit status means the protocol broke.
Starting Python under emulation costs seconds, so one launch serves every call of a batch.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import numpy as np
import tvm
from tvm.runtime.vm import VirtualMachine


def parameter_names(vm: VirtualMachine, function: str) -> list[str]:
    arity = int(vm.module["get_function_arity"](function))
    return [str(vm.module["get_function_param_name"](function, i)) for i in range(arity)]


def flatten_outputs(value: Any) -> list[np.ndarray]:
    """A VM result is a tensor or a (nested) tuple of tensors: flatten depth-first."""
    if isinstance(value, tvm.runtime.Tensor):
        return [value.numpy()]
    return [array for item in value for array in flatten_outputs(item)]


def run_request(request: dict[str, Any]) -> None:
    vm = VirtualMachine(tvm.runtime.load_module(request["library"]), tvm.cpu())
    function = request["function"]
    names = parameter_names(vm, function)
    outputs: dict[str, Any] = {}  # Any: numpy's stubs reject **dict[str, ndarray] in savez
    with np.load(request["inputs"]) as inputs:
        for call in range(int(request["count"])):
            given = {key.split("/", 1)[1] for key in inputs.files if key.startswith(f"{call}/")}
            if given != set(names):
                raise SystemExit(
                    f"feed {call} names {sorted(given)} but {function} takes {names}: "
                    f"missing {sorted(set(names) - given)}, unknown {sorted(given - set(names))}"
                )
            args = [tvm.runtime.tensor(inputs[f"{call}/{name}"]) for name in names]
            for index, array in enumerate(flatten_outputs(vm[function](*args))):
                outputs[f"{call}/{index}"] = array
    partial = request["outputs"] + ".partial.npz"
    np.savez(partial, **outputs)
    os.replace(partial, request["outputs"])


def main() -> None:
    with open(sys.argv[1]) as handle:
        run_request(json.load(handle))


if __name__ == "__main__":
    main()
