"""Run independent tasks serially or on Dask: a local cluster of single-threaded worker
processes by default, a scheduler address, or an existing ``distributed.Client``. Used by the
dose comparison (blocks of parameter draws × regimens) and the operating characteristics
(replicate fits); results do not depend on where the tasks ran."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["progress_bar", "run_tasks"]


def run_tasks(fn: Callable[[Any], Any], tasks: Sequence[Any], scheduler: Any = "local", *,
              workers: int = 2, progress: Callable[[int, int], None] | None = None,
              error: type[Exception] = RuntimeError) -> list[Any]:
    """``[fn(t) for t in tasks]``, serially (``scheduler`` None or "serial") or on Dask:
    "local" (a local cluster of ``workers`` single-threaded worker processes, closed
    afterwards), a scheduler address, or a ``distributed.Client``. Results in task order;
    ``progress(done, total)`` after each task. A cluster that cannot be started or reached
    raises ``error`` with a one-line message."""
    total = len(tasks)
    if scheduler is None or scheduler == "serial":
        out = []
        for i, t in enumerate(tasks):
            out.append(fn(t))
            if progress:
                progress(i + 1, total)
        return out
    from distributed import Client, LocalCluster, as_completed

    own_cluster = own_client = None
    if isinstance(scheduler, Client):
        client = scheduler
    elif scheduler == "local":
        try:
            own_cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                       dashboard_address=":0")
        except Exception as exc:  # noqa: BLE001 - reported as one line
            raise error(f"cannot start a local Dask cluster ({exc}); use --scheduler "
                        "serial") from None
        client = own_client = Client(own_cluster)
    else:
        try:
            client = own_client = Client(scheduler, timeout="10s")
        except (OSError, TimeoutError, ValueError) as exc:
            raise error(f"--scheduler {scheduler}: cannot connect ({exc})") from None
    try:
        futures = client.map(fn, list(tasks), pure=False)
        for done, _ in enumerate(as_completed(futures), start=1):
            if progress:
                progress(done, total)
        return client.gather(futures)
    finally:
        if own_client is not None:
            own_client.close()
        if own_cluster is not None:
            own_cluster.close()


def progress_bar(label: str, unit: str = "replicates", stream: Any = None,
                 started: float | None = None) -> Callable[[int, int], None]:
    """A ``progress(done, total)`` callback drawing a one-line bar on ``stream`` (stderr;
    redrawn in place on a terminal), with the seconds since ``started`` (default: now)."""
    stream = stream or sys.stderr
    tty = getattr(stream, "isatty", lambda: False)()
    started = time.perf_counter() if started is None else started

    def progress(done: int, total: int) -> None:
        bar = "#" * round(30 * done / total)
        end = "\n" if done == total or not tty else ""
        print(f"{chr(13) if tty else ''}{label} [{bar:<30}] {done}/{total} {unit} "
              f"({time.perf_counter() - started:.0f} s)", end=end, file=stream, flush=True)

    return progress
