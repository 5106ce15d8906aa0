"""Mixed-precision allocation: per-layer formats under resource budgets (HAWQ-V3's ILP), or
searched over the size budget to an accuracy tolerance.

Modules, in the order the data flows:

- :mod:`.ties`: layers whose formats are one variable (shared weights, shared activations);
- :mod:`.costs`: per-layer costs derived from the graph (latency model, flash estimate, RAM);
- :mod:`.tables`: readers of the cost files backends write (latency table, memory plan);
- :mod:`.problem`: the problem, budget and allocation as data; resources; totals;
- :mod:`.overrides`: ``--pin`` / ``--exclude`` as per-layer candidate restrictions;
- :mod:`.from_report`: a model's problem from its sensitivity report and
  :class:`AllocationOptions`;
- :mod:`.budget`: budget text (``size=2MB,latency=0.7x``) -> :class:`Budget`;
- :mod:`.ilp`: the MILP (scipy HiGHS), infeasibility diagnosis, brute force for tests;
- :mod:`.search`: bisection to an accuracy tolerance and the frontier sweep;
- :mod:`.refine`: measured local moves around the ILP's plan (``--refine-plan``).

The names below are the package's public API.
"""

from dyadiq.passes.allocation.budget import BudgetError, parse_budget
from dyadiq.passes.allocation.costs import (
    FLASH_ESTIMATE,
    INT8_CONTAINER_RAM,
    LATENCY_COST_MODEL,
    CostTable,
    RamModel,
    flash_estimate,
    latency_cost_model,
    layer_macs,
    ram_model,
    tensor_sizes,
)
from dyadiq.passes.allocation.from_report import (
    AllocationOptions,
    FormatFilter,
    ModelProblem,
    model_problem,
    problem_from_report,
    report_activation_damage,
)
from dyadiq.passes.allocation.ilp import (
    brute_force,
    infeasibility_message,
    resource_expressions,
    smallest_feasible,
    solve,
)
from dyadiq.passes.allocation.overrides import Overrides, apply_overrides, overrides_from_pins
from dyadiq.passes.allocation.problem import (
    RESOURCES,
    W8A8,
    Allocation,
    AllocationProblem,
    Budget,
    PairCost,
    Resource,
    layer_table,
    size_range,
    smallest_total,
    totals,
    uniform_w8a8,
)
from dyadiq.passes.allocation.refine import RefinementResult, neighbour_moves, refine_plan
from dyadiq.passes.allocation.search import (
    BisectionResult,
    FrontierPoint,
    bisect_budget,
    sweep,
)
from dyadiq.passes.allocation.tables import (
    LatencyTable,
    MemoryPlanFile,
    load_latency_table,
    load_memory_plan,
)
from dyadiq.passes.allocation.ties import ActivationTies, activation_ties, shared_weight_ties

__all__ = [
    "FLASH_ESTIMATE",
    "INT8_CONTAINER_RAM",
    "LATENCY_COST_MODEL",
    "RESOURCES",
    "W8A8",
    "ActivationTies",
    "Allocation",
    "AllocationOptions",
    "AllocationProblem",
    "BisectionResult",
    "Budget",
    "BudgetError",
    "CostTable",
    "FormatFilter",
    "FrontierPoint",
    "LatencyTable",
    "MemoryPlanFile",
    "ModelProblem",
    "Overrides",
    "PairCost",
    "RamModel",
    "RefinementResult",
    "Resource",
    "activation_ties",
    "apply_overrides",
    "bisect_budget",
    "brute_force",
    "flash_estimate",
    "infeasibility_message",
    "latency_cost_model",
    "layer_macs",
    "layer_table",
    "load_latency_table",
    "load_memory_plan",
    "model_problem",
    "neighbour_moves",
    "overrides_from_pins",
    "parse_budget",
    "problem_from_report",
    "ram_model",
    "refine_plan",
    "report_activation_damage",
    "resource_expressions",
    "shared_weight_ties",
    "size_range",
    "smallest_feasible",
    "smallest_total",
    "solve",
    "sweep",
    "tensor_sizes",
    "totals",
    "uniform_w8a8",
]
