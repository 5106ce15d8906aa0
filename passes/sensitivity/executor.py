"""Where an analysis's independent evaluations run: in this process, or as Ray tasks.

An analysis (or a frontier, or a bisection round) is a list of independent tasks - a layer at a
width, a pair of layers, one Hutchinson probe vector, one plan to score - that all read the same
large, read-only state (an onnxruntime session over the float model, the calibration batches).
So the work is described in two parts:

- a *worker spec* (:class:`WorkerSpec`): plain, picklable data; ``open(threads)`` builds the
  worker-local state from it (one onnxruntime session per worker, built once per spec);
- *tasks* (:class:`Task`): small picklable objects with a stable ``key`` and
  ``run(state) -> result``, the result JSON-serializable (the journal stores it).

A task's result depends only on the spec and the task (seeds travel in the task), never on
which worker ran it or in what order, so a Ray run gives exactly the serial run's numbers.

:func:`run_tasks` is the one driver: it skips tasks the journal (partial results of an
interrupted run) already holds, runs the rest on the executor, records each result as it
arrives, and shows progress through ``dyadiq.progress.track`` (a bar with the count and ETA on
a terminal, one line per stage when piped).
"""

from __future__ import annotations

import abc
import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Protocol

from dyadiq.errors import ConfigError
from dyadiq.progress import track

log = logging.getLogger(__name__)


class WorkerSpec(Protocol):
    """Picklable data from which a worker builds its state once."""

    def open(self, threads: int) -> Any: ...


class Task(Protocol):
    """One independent evaluation: ``run`` must be a pure function of the state and itself."""

    @property
    def key(self) -> str: ...

    def run(self, state: Any) -> Any: ...


class Journal(Protocol):
    """Where finished tasks' results are kept (:class:`~.cache.PartialResults` on disk)."""

    def get(self, key: str) -> Any: ...

    def __contains__(self, key: object) -> bool: ...

    def record(self, key: str, value: Any) -> None: ...


class MemoryJournal(dict[str, Any]):
    """A journal that forgets on exit: analyses run without the on-disk cache."""

    def record(self, key: str, value: Any) -> None:
        self[key] = value


class Executor(abc.ABC):
    """Runs tasks against a worker spec; yields (task index, result) in completion order."""

    workers: int = 1

    @abc.abstractmethod
    def imap(self, spec: WorkerSpec, tasks: Sequence[Task]) -> Iterator[tuple[int, Any]]: ...

    @abc.abstractmethod
    def close(self) -> None:
        """Release workers (Ray actors); the serial executor drops its cached states."""

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SerialExecutor(Executor):
    """This process, in task order: the default, and the reference the Ray run must equal."""

    def __init__(self, threads: int = 2) -> None:
        self.threads = threads
        # keyed by id: the spec is kept alongside so the id cannot be reused while cached
        self._states: dict[int, tuple[WorkerSpec, Any]] = {}

    def imap(self, spec: WorkerSpec, tasks: Sequence[Task]) -> Iterator[tuple[int, Any]]:
        if id(spec) not in self._states:
            self._states[id(spec)] = (spec, spec.open(self.threads))
        state = self._states[id(spec)][1]
        for index, task in enumerate(tasks):
            yield index, task.run(state)

    def close(self) -> None:
        self._states.clear()


class _Worker:
    """A Ray actor's body: the state of one spec, opened once, then tasks."""

    def __init__(self, spec: WorkerSpec, threads: int) -> None:
        self.state = spec.open(threads)

    def run(self, task: Task) -> Any:
        return task.run(self.state)


class RayExecutor(Executor):
    """Ray actors, one per worker, each with its own state (its own onnxruntime session).

    ``address``: an existing cluster (``ray start --head`` printed it); None starts a local
    Ray with ``workers`` CPUs in this process (nothing to install but the ``scale`` extra, no
    server to start). Each worker's onnxruntime uses ``threads`` threads."""

    def __init__(
        self, *, address: str | None = None, workers: int | None = None, threads: int = 1
    ) -> None:
        try:
            import ray
        except ImportError as exc:
            raise ConfigError(
                "Ray is not installed: pip install 'dyadiq[scale]', or run without --workers / "
                "--ray-address"
            ) from exc
        self._ray = ray
        self._started = False
        if not ray.is_initialized():
            ray.init(
                address=address,
                num_cpus=workers if address is None else None,
                include_dashboard=False,
                logging_level=logging.WARNING,
                log_to_driver=False,
                configure_logging=False,
            )
            self._started = True
        cpus = int(ray.cluster_resources().get("CPU", 1))
        self.workers = max(1, min(workers, cpus) if workers else cpus)
        self.threads = threads
        self._actor_class = ray.remote(num_cpus=1)(_Worker)
        self._actors: dict[int, tuple[WorkerSpec, list[Any]]] = {}

    def _actors_for(self, spec: WorkerSpec) -> list[Any]:
        if id(spec) not in self._actors:
            # one spec's actors at a time: each holds a CPU, and a new spec's actors would
            # wait forever for the CPUs the previous spec's idle actors hold
            self._kill_actors()
            ref = self._ray.put(spec)  # shipped once to the object store, not per actor
            actors = [self._actor_class.remote(ref, self.threads) for _ in range(self.workers)]
            self._actors[id(spec)] = (spec, actors)
        return self._actors[id(spec)][1]

    def _kill_actors(self) -> None:
        for _, actors in self._actors.values():
            for actor in actors:
                self._ray.kill(actor)
        self._actors.clear()

    def imap(self, spec: WorkerSpec, tasks: Sequence[Task]) -> Iterator[tuple[int, Any]]:
        ray = self._ray
        actors = self._actors_for(spec)
        queue = list(enumerate(tasks))
        queue.reverse()  # pop() from the end takes tasks in order
        running: dict[Any, tuple[int, Any]] = {}

        def submit(actor: Any) -> None:
            if queue:
                index, task = queue.pop()
                running[actor.run.remote(task)] = (index, actor)

        for actor in actors:
            for _ in range(2):  # two in flight per worker: the next task waits at the worker
                submit(actor)
        while running:
            ready, _ = ray.wait(list(running), num_returns=1)
            index, actor = running.pop(ready[0])
            submit(actor)
            yield index, ray.get(ready[0])

    def close(self) -> None:
        self._kill_actors()
        if self._started:
            self._ray.shutdown()
            self._started = False


def make_executor(*, workers: int | None = None, ray_address: str | None = None) -> Executor:
    """Serial unless asked for Ray: ``workers`` > 1 starts a local Ray with that many CPUs,
    ``ray_address`` joins a cluster (every CPU of it unless ``workers`` caps it)."""
    if workers is not None and workers < 1:
        raise ConfigError(f"--workers wants a positive count, got {workers}")
    if ray_address is None and (workers is None or workers == 1):
        return SerialExecutor()
    return RayExecutor(address=ray_address, workers=workers)


def run_tasks(
    executor: Executor,
    spec: WorkerSpec,
    tasks: Sequence[Task],
    description: str,
    journal: Journal | None = None,
) -> dict[str, Any]:
    """Every task's result by key: the journal's where it has one, the executor's otherwise
    (each recorded in the journal as it arrives, so an interrupted run resumes here)."""
    journal = journal if journal is not None else MemoryJournal()
    keys = [t.key for t in tasks]
    if len(set(keys)) != len(keys):
        raise ValueError(f"{description}: task keys are not unique")
    results: dict[str, Any] = {t.key: journal.get(t.key) for t in tasks if t.key in journal}
    todo = [t for t in tasks if t.key not in results]
    if not todo:
        if tasks:
            log.info("%s: %d tasks, all from partial results", description, len(tasks))
        return results
    resumed = f" ({len(results)} from partial results)" if results else ""
    log.info("%s: %d tasks%s on %d worker(s)", description, len(todo), resumed, executor.workers)
    start = time.perf_counter()
    for index, value in track(executor.imap(spec, todo), description, total=len(todo)):
        journal.record(todo[index].key, value)
        results[todo[index].key] = value
    log.info("%s: done in %.1f s", description, time.perf_counter() - start)
    return results


def results_in_order(results: Mapping[str, Any], tasks: Sequence[Task]) -> list[Any]:
    return [results[t.key] for t in tasks]
