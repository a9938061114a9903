"""The process pool behind ``prepare --workers N``: each worker reads and writes one study at a
time and returns its index entry; the parent alone writes the index (docs/data.md).

Workers are started with ``forkserver`` (``spawn`` where that is missing), never plain ``fork``
of a parent that may hold threads. At most ``2 x workers`` studies are queued at a time, so a
50k-study manifest is not pickled into the pool at once; a worker holds one volume (and its
mask) at a time, so its memory is bounded by the largest volume it reads.
"""

from __future__ import annotations

import multiprocessing
import os
import resource
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any

from t3d_data.errors import PrepareWorkerError, T3DDataError

__all__ = ["Outcome", "run_tasks"]

_QUEUED_PER_WORKER = 2


@dataclass
class Outcome:
    """What one task gave.

    Attributes:
        position: the task's index in the task list.
        value: the function's return value (``None`` when ``error`` is set).
        error: the message of a bad-input error (:class:`T3DDataError` or ``OSError``), else
            ``None``; any other exception is raised in the parent instead.
        peak_rss: peak resident memory of the process that ran the task so far, in bytes.
        pid: that process.
        cpu_seconds: CPU time (user + system, all threads) of that process so far.
    """

    position: int
    value: Any
    error: str | None
    peak_rss: int
    pid: int = 0
    cpu_seconds: float = 0.0


def cpu_seconds() -> float:
    """CPU time (user + system, all threads) of this process so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def peak_rss() -> int:
    """Peak resident set size of this process in bytes (``ru_maxrss``)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # Linux reports KiB


def _call(position: int, fn: Callable[..., Any], args: tuple) -> Outcome:
    try:
        value, error = fn(*args), None
    except (T3DDataError, OSError) as err:  # bad input: quarantined by the caller
        value, error = None, str(err) or repr(err)
    return Outcome(position, value, error, peak_rss(), os.getpid(), cpu_seconds())


def _init_worker() -> None:
    # Ctrl-C reaches the whole process group; only the parent acts on it (it stops the pool)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _context() -> multiprocessing.context.BaseContext:
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    # workers fork from a server that has imported the study reader/writer (and zarr) once
    ctx.set_forkserver_preload(["t3d_data.store", "zarr", "zarr.codecs"])
    return ctx


def _sigterm_to_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _stop(pool: ProcessPoolExecutor) -> None:
    """Cancels queued tasks and terminates the workers (their half-written temporary study
    folders are removed by the next run)."""
    pool.shutdown(wait=False, cancel_futures=True)
    procs = list((getattr(pool, "_processes", None) or {}).values())
    for proc in procs:
        if proc.is_alive():
            proc.terminate()
    for proc in procs:
        proc.join(timeout=10)


def run_tasks(fn: Callable[..., Any], tasks: Sequence[tuple], workers: int = 1,
              labels: Sequence[str] | None = None) -> Iterator[Outcome]:
    """Runs ``fn(*task)`` for every task, in ``workers`` processes, yielding outcomes as they
    finish (in task order when ``workers == 1``, which runs in this process).

    Ctrl-C (or SIGTERM, while the pool runs in the main thread) stops the pool: queued tasks
    are cancelled, running workers terminated, and ``KeyboardInterrupt`` is raised here, after
    the outcomes already yielded. Closing the iterator early does the same.

    Args:
        fn: a module-level function (it is pickled by reference).
        tasks: argument tuples (picklable).
        workers: processes; 1 runs in this process.
        labels: a name per task for error messages (e.g. the study ids).

    Raises:
        PrepareWorkerError: a worker process died (e.g. killed for memory); names the tasks
            that were running.
        ValueError: ``workers < 1``.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if workers == 1:
        for position, args in enumerate(tasks):
            yield _call(position, fn, args)
        return
    main = threading.current_thread() is threading.main_thread()
    old_term = signal.signal(signal.SIGTERM, _sigterm_to_interrupt) if main else None
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=_context(),
                               initializer=_init_worker)
    finished = False
    try:
        pending: dict[Future, int] = {}
        queue = iter(enumerate(tasks))

        def fill() -> None:
            while len(pending) < _QUEUED_PER_WORKER * workers:
                item = next(queue, None)
                if item is None:
                    return
                pending[pool.submit(_call, item[0], fn, item[1])] = item[0]

        fill()
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in sorted(done, key=pending.__getitem__):
                position = pending.pop(fut)
                try:
                    outcome = fut.result()
                except BrokenProcessPool as err:
                    inflight = sorted([position, *pending.values()])
                    names = [labels[p] if labels is not None else f"#{p}" for p in inflight]
                    raise PrepareWorkerError(names, workers) from err
                yield outcome
            fill()
        finished = True
    finally:
        if finished:
            pool.shutdown(wait=True)
        else:
            _stop(pool)
        if main and old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
