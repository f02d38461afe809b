"""What every benchmark shares: repetitions and their summary, paired ratios, result
rows, JSON, the machine, and processes that are always ended by pid.

The machine is small and noisy, so no figure stands alone: each is the median
of several repetitions (with min and max) of a run that alternates with its
peer's in the same invocation, and the headline is the ratio of each pair.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import platform
import queue as queue_mod
import statistics
import time
from collections.abc import Callable

import psutil

log = logging.getLogger(__name__)
SPAWN = multiprocessing.get_context("spawn")
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
MB = 1_000_000  # sizes and rates are decimal: 1 MB = 1e6 bytes, 1 GB/s = 1e9 bytes/s


# -- numbers ------------------------------------------------------------------------


def summary(values) -> dict:
    """median, min and max of the repetitions (None entries are failed runs, skipped)."""
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals)}


def paired_ratios(ours, peer) -> list:
    """ours[i] / peer[i] for each repetition i run side by side."""
    return [a / b if a is not None and b else None for a, b in zip(ours, peer)]


def interleaved(runs: dict[str, Callable[[], float]], reps: int) -> dict[str, list[float]]:
    """Run each callable once per repetition, rotating the order so drift hits all alike."""
    names = list(runs)
    out: dict[str, list[float]] = {n: [] for n in names}
    for r in range(reps):
        for n in names[r % len(names):] + names[: r % len(names)]:
            out[n].append(runs[n]())
    return out


def timed(fn: Callable[[], object], iters: int) -> float:
    """Mean seconds per call over `iters` back-to-back calls."""
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t) / iters


def percentile(values, q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))]


def row(case: str, metric: str, ours: list, peer: list, peer_name: str, target: str = "",
        met: bool | None = None, better: str = "higher", **extra) -> dict:
    """One table line: ours and the peer summarised, and the paired ratio ours/peer."""
    return {"case": case, "metric": metric, "ours": summary(ours), "peer": summary(peer),
            "peer_name": peer_name, "ratio": summary(paired_ratios(ours, peer)),
            "target": target, "met": met, "better": better, **extra}


# -- files and machine ----------------------------------------------------------------


def write_json(name: str, data: dict) -> str:
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, f"{name}.json")
    with open(path, "w") as f:
        json.dump(data, f, indent=1, default=_jsonable)
    return path


def read_json(name: str) -> dict | None:
    try:
        with open(os.path.join(RESULTS, f"{name}.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _jsonable(x):
    if hasattr(x, "item"):
        return x.item()
    return str(x)


def machine() -> dict:
    import numpy
    import torch
    import zmq

    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "os": f"{platform.system()} {platform.release()}", "python": platform.python_version(),
        "torch": torch.__version__, "pyzmq": zmq.__version__, "libzmq": zmq.zmq_version(),
        "numpy": numpy.__version__,
    }


# -- processes ------------------------------------------------------------------------


class Procs:
    """Processes a benchmark starts; `close` ends each by pid, and any child it left.

    Use as a context manager so that a failure or Ctrl-C still ends them all.
    """

    def __init__(self):
        self.procs: list = []

    def __enter__(self) -> Procs:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def spawn(self, target, *args, name: str = ""):
        p = SPAWN.Process(target=target, args=args, name=name or target.__name__, daemon=True)
        p.start()
        self.procs.append(p)
        return p

    def close(self, grace: float = 3.0) -> None:
        offspring = [c for p in self.procs for c in _descendants(p.pid)]
        deadline = time.monotonic() + grace
        for p in self.procs:
            p.join(max(0.0, deadline - time.monotonic()))
        for p in self.procs:
            if p.is_alive():
                p.terminate()
                p.join(2.0)
            if p.is_alive():
                p.kill()
                p.join(2.0)
        self.procs.clear()
        kill_all(offspring)


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def kill_all(procs: list[psutil.Process]) -> None:
    for p in procs:
        if _alive(p) and "resource_tracker" not in _cmdline(p):
            log.warning("killing leftover process %d (%s)", p.pid, _cmdline(p)[:80])
            try:
                p.kill()
            except psutil.Error:
                pass


def children() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


def reap_children(before: set[int], timeout: float = 5.0) -> list[int]:
    """Wait for, then kill by pid, every descendant of this process not in `before`."""
    deadline = time.monotonic() + timeout
    left: list = []
    while time.monotonic() < deadline:
        left = [p for p in psutil.Process().children(recursive=True)
                if p.pid not in before and _alive(p) and "resource_tracker" not in _cmdline(p)]
        if not left:
            return []
        time.sleep(0.1)
    kill_all(left)
    return [p.pid for p in left]


def _alive(p: psutil.Process) -> bool:
    try:
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _cmdline(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline())
    except psutil.Error:
        return ""


def get(q, timeout: float, what: str, procs=()):
    """One item from a multiprocessing queue, or a clear error once `timeout` has passed."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return q.get(timeout=min(0.5, max(0.01, deadline - time.monotonic())))
        except queue_mod.Empty:
            dead = [p.name for p in procs if p.exitcode not in (None, 0)]
            if dead:
                raise RuntimeError(f"{what}: {', '.join(dead)} exited") from None
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what}: nothing within {timeout:.0f}s") from None


def parent_gone(parent_pid: int) -> bool:
    return os.getppid() != parent_pid


def shared(context: dict | None, key: str, factory: Callable[[], object]) -> tuple[object, bool]:
    """(object, owned): one object shared by the benchmarks of an invocation, closed by
    bench.run at the end; without a context a fresh one the caller must close."""
    if context is None:
        return factory(), True
    pool = context.setdefault("_shared", {})
    if key not in pool:
        pool[key] = factory()
    return pool[key], False


def close_shared(context: dict) -> None:
    for obj in context.pop("_shared", {}).values():
        try:
            obj.close()
        except Exception as e:  # noqa: BLE001 (processes are reaped by pid afterwards)
            log.warning("closing %r failed: %s", obj, e)
