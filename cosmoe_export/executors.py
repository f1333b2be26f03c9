"""Executors: where the per-expert tasks of a stage run (docs/SCALE.md).

A stage (quantize, lower) describes its per-expert work as tasks: a module-level function and
picklable arguments (a bundle path, a layer, an expert, the stage's options, and for GPTQ the
calibration tokens routed to that expert), returning bytes or a small result. The stage calls
``executor.map(fn, tasks)``, which yields the results *in task order*, and writes files and
manifest entries in that order: nothing written depends on which task finished first, so a build
is byte-identical for every executor and job count.

- ``local``: a process pool on this machine ("spawn" context: a forked child would inherit torch's
  thread pool and the parent's locks in whatever state they were). Every worker runs torch on one
  thread, as the stages do in-process: sums reduce in an order that depends on the thread count.
  One job runs the tasks in this process, with no pool: tests and small models stay fast.
- ``ray``: the same tasks as Ray tasks (one CPU each) on a Ray cluster (``--address``), or a local
  one started for the run. Results come back through Ray's object store; inputs are read from the
  bundle path, which every node must see at the same path (a shared file system).

Bounded memory: at most ``2 * jobs`` tasks are in flight, so a stage holds that many results.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import itertools
import logging
import multiprocessing
import os
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from cosmoe_export.errors import CosmoeError

# Without --jobs, small stages stay in this process: a worker costs seconds to start (importing
# torch, and for ExecuTorch lowering one template export per worker). Measured on 2 cores
# (docs/SCALE.md): the tiny preset (16 experts) and tiny-moe (32) were slower with 2 workers than
# in-process, so only a stage of 64 experts per worker or more gets one: wearable-moe (152) gets 2.
TASKS_PER_WORKER = 64


def local_cores() -> int:
    """The cores this process may run on (its CPU affinity, which a container or taskset narrows)."""
    return len(os.sched_getaffinity(0))


@dataclass(frozen=True)
class ExecutorConfig:
    name: str = "local"  # EXECUTORS key
    jobs: int | None = None  # tasks at once; None: every local core (local), the cluster's CPUs (ray)
    address: str | None = None  # ray only: the head's HOST:PORT; None: a Ray cluster started for the run

    def __post_init__(self) -> None:
        problems = []
        if self.name not in EXECUTORS:
            problems.append(f"executor {self.name!r} is not one of {list(EXECUTORS)}")
        if self.jobs is not None and (isinstance(self.jobs, bool) or not isinstance(self.jobs, int) or self.jobs < 1):
            problems.append(f"jobs must be a positive integer, got {self.jobs!r}")
        if self.address is not None and self.name != "ray":
            problems.append("an address only applies to the ray executor")
        if problems:
            raise CosmoeError("executor: " + "; ".join(problems))


class Executor:
    """Runs ``fn(*args)`` for each task; ``map`` yields the results in task order."""

    jobs: int
    shared_files: bool  # tasks may write into the parent's output directory (same machine)

    def map(self, fn: Callable[..., Any], tasks: Iterable[tuple]) -> Iterator[Any]:
        raise NotImplementedError

    def close(self) -> None:
        pass


class InProcess(Executor):
    """One job: each task runs here, when its result is asked for."""

    jobs, shared_files = 1, True

    def map(self, fn: Callable[..., Any], tasks: Iterable[tuple]) -> Iterator[Any]:
        for args in tasks:
            yield fn(*args)


def _ordered(submit: Callable[[tuple], Any], result: Callable[[Any], Any], cancel: Callable[[Any], None],
             tasks: Iterable[tuple], window: int) -> Iterator[Any]:
    """Submit tasks, at most ``window`` ahead of the one whose result is yielded next. The first
    window is submitted now, so the caller can do its own work while the workers start on it."""
    it = iter(tasks)
    pending: collections.deque = collections.deque(submit(args) for args in itertools.islice(it, window))
    return _drain(submit, result, cancel, it, pending)


def _drain(submit: Callable[[tuple], Any], result: Callable[[Any], Any], cancel: Callable[[Any], None],
           it: Iterator[tuple], pending: collections.deque) -> Iterator[Any]:
    try:
        for args in it:  # the window is full: one out, one in
            yield result(pending.popleft())
            pending.append(submit(args))
        while pending:
            yield result(pending.popleft())
    finally:  # an error (or a consumer that stopped early): no orphaned work
        for handle in pending:
            cancel(handle)


def _quiet_settings() -> tuple[list, dict[str, int]]:
    """This process's warning filters and logger levels (the CLI quiets library chatter), for workers."""
    levels = {name: lg.level for name, lg in logging.root.manager.loggerDict.items()
              if isinstance(lg, logging.Logger) and lg.level != logging.NOTSET}
    return list(warnings.filters), levels


def _init_worker(filters: list, levels: dict[str, int]) -> None:
    import torch
    torch.set_num_threads(1)
    warnings.filters[:] = filters
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


class LocalPool(Executor):
    shared_files = True

    def __init__(self, jobs: int) -> None:
        self.jobs = jobs
        self._pool = concurrent.futures.ProcessPoolExecutor(
            max_workers=jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker,
            initargs=_quiet_settings())

    def map(self, fn: Callable[..., Any], tasks: Iterable[tuple]) -> Iterator[Any]:
        return _ordered(lambda args: self._pool.submit(fn, *args), lambda f: f.result(), lambda f: f.cancel(),
                        tasks, 2 * self.jobs)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def _ray_call(fn: Callable[..., Any], args: tuple) -> Any:
    import torch
    torch.set_num_threads(1)  # Ray reuses workers: set it on every task
    return fn(*args)


class RayPool(Executor):
    shared_files = False  # a task may run on another node: its result comes back by the object store

    def __init__(self, jobs: int | None, address: str | None) -> None:
        try:
            import ray
        except ImportError:
            raise CosmoeError("--executor ray needs the ray package: pip install 'cosmoe-export[ray]'") from None
        self._ray = ray
        self._started = False
        if not ray.is_initialized():
            try:
                ray.init(address=address, include_dashboard=False, log_to_driver=False)
            except (ConnectionError, RuntimeError, ValueError) as e:
                where = f"at {address}" if address else "locally"
                raise CosmoeError(f"--executor ray: cannot start or reach a Ray cluster {where} "
                                  f"({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                                  "start one with `ray start --head`") from None
            self._started = True
        self.jobs = jobs or max(1, int(ray.cluster_resources().get("CPU", 1)))
        self._remote = ray.remote(num_cpus=1, max_retries=0)(_ray_call)

    def map(self, fn: Callable[..., Any], tasks: Iterable[tuple]) -> Iterator[Any]:
        ray = self._ray
        fn_ref = ray.put(fn)
        return _ordered(lambda args: self._remote.remote(fn_ref, args), ray.get,
                        lambda ref: ray.cancel(ref, force=True), tasks, 2 * self.jobs)

    def close(self) -> None:
        if self._started:  # a cluster this run started (or joined) is left as the run found it
            self._ray.shutdown()


EXECUTORS: dict[str, Callable[[ExecutorConfig, int], Executor]] = {
    "local": lambda c, tasks: _local(c.jobs, tasks),
    "ray": lambda c, tasks: RayPool(c.jobs, c.address),
}


def _local(jobs: int | None, tasks: int) -> Executor:
    if jobs is None:
        jobs = min(local_cores(), max(1, tasks // TASKS_PER_WORKER))
    jobs = min(jobs, max(1, tasks))
    return InProcess() if jobs == 1 else LocalPool(jobs)


@contextlib.contextmanager
def open_executor(config: ExecutorConfig | None, *, tasks: int) -> Iterator[Executor]:
    """The executor for a stage of ``tasks`` per-expert tasks; closed (workers stopped) on exit."""
    executor = EXECUTORS[(config or ExecutorConfig()).name](config or ExecutorConfig(), tasks)
    try:
        yield executor
    finally:
        executor.close()
