"""A simulation's report folder: report.json, metrics.csv and PNG plots.

metrics.csv has one row per worker step, merged from the workers' own step logs
(workers.steps.StepLog), with `t` in seconds since training began:

    t, worker, process, incarnation, step, clock, loss, staleness, step_seconds,
    compute_seconds, bytes_sent, bytes_received

(process: 0 for the worker's first process, 1 for the one started after its
first kill, ...; incarnation: the coordinator's count of the worker's joins,
which a rejoin after a drop also bumps.)

(compute_seconds: the worker's own work in the step, local batches and any
injected delay: what a slow device is slow at; step_seconds: the whole step,
waiting for the server included.)

The plots: accuracy.png (test accuracy and loss against wall time and against
the server's updates), progress.png (each worker's clock against time: a
straggler's line lies below, a killed worker's stops), staleness.png (applied
gradients by staleness) and bytes.png (bytes per step on the wire, per worker).
"""

from __future__ import annotations

import csv
import glob
import json
import logging
import os

log = logging.getLogger(__name__)

COLUMNS = ("t", "worker", "process", "incarnation", "step", "clock", "loss", "staleness", "step_seconds",
           "compute_seconds", "bytes_sent", "bytes_received")
_INTS = {"worker", "process", "incarnation", "step", "clock", "staleness", "bytes_sent", "bytes_received"}
_FROM_LOG = [c for c in COLUMNS if c not in ("t", "process")]


def step_log_dir(folder: str) -> str:
    """Where the workers of a simulation reporting to `folder` log their steps."""
    return os.path.join(folder, "steps")


def step_log_path(folder: str, worker: int, run: int) -> str:
    """Where simulated worker `worker`'s `run`-th process logs its steps."""
    return os.path.join(step_log_dir(folder), f"worker-{worker}-{run}.csv")


def merge_step_logs(folder: str, began_wall: float) -> list[dict]:
    """Every worker's step rows, oldest first, with t relative to `began_wall` (Unix time).

    A row cut short by a killed process is left out."""
    rows = []
    for path in sorted(glob.glob(os.path.join(step_log_dir(folder), "worker-*.csv"))):
        process = int(os.path.basename(path)[:-4].rsplit("-", 1)[1])
        with open(path, newline="") as f:
            for raw in csv.DictReader(f):
                try:
                    row = _typed(raw, _FROM_LOG)
                    row["t"] = round(float(raw["time"]) - began_wall, 6)
                except (KeyError, TypeError, ValueError):
                    continue
                rows.append({**row, "process": process})
    rows.sort(key=lambda r: r["t"])
    return rows


def _typed(raw: dict, keys) -> dict:
    return {k: (int(raw[k]) if k in _INTS else float(raw[k])) for k in keys}


def read_metrics(folder: str) -> list[dict]:
    """The rows of the metrics.csv that `write` left in `folder`, typed as they were."""
    with open(os.path.join(folder, "metrics.csv"), newline="") as f:
        return [_typed(raw, COLUMNS) for raw in csv.DictReader(f)]


def worker_summary(rows: list[dict], every: float = 0.05) -> dict[str, dict]:
    """Per worker: steps, last clock, when it finished, its mean step and compute
    seconds, and `mean_lag`: how far its clock trailed the leading worker's, averaged
    every `every` seconds over its own time in the run (from its first logged step
    to its last; the leader is taken among the workers in the run at that moment).
    A straggler in ssp trails most."""
    out: dict[int, dict] = {}
    for r in rows:
        s = out.setdefault(r["worker"], {"steps": 0, "clock": 0, "started_at": r["t"], "finished_at": 0.0,
                                         "step_seconds": 0.0, "compute_seconds": 0.0})
        s["steps"] += 1
        s["clock"], s["finished_at"] = r["clock"], r["t"]
        s["step_seconds"] += r["step_seconds"]
        s["compute_seconds"] += r["compute_seconds"]
    lags = _lags(rows, out, every)
    for w, s in out.items():
        s["mean_step_seconds"] = round(s.pop("step_seconds") / s["steps"], 6)
        s["mean_compute_seconds"] = round(s.pop("compute_seconds") / s["steps"], 6)
        s["mean_lag"] = round(lags[w], 3)
        del s["started_at"]
    return {str(w): out[w] for w in sorted(out)}


def _lags(rows: list[dict], workers: dict[int, dict], every: float) -> dict[int, float]:
    """Mean (leader's clock - own clock) per worker over a time grid, each worker
    counted between its first and its last row, clocks as last logged."""
    sums, counts = dict.fromkeys(workers, 0.0), dict.fromkeys(workers, 0)
    if not rows:
        return sums
    latest: dict[int, int] = {}
    i, t, end = 0, rows[0]["t"], rows[-1]["t"]
    while t <= end:
        while i < len(rows) and rows[i]["t"] <= t:
            latest[rows[i]["worker"]] = rows[i]["clock"]
            i += 1
        active = [w for w in latest if workers[w]["started_at"] <= t <= workers[w]["finished_at"]]
        lead = max((latest[w] for w in active), default=0)
        for w in active:
            sums[w] += lead - latest[w]
            counts[w] += 1
        t += every
    return {w: sums[w] / counts[w] if counts[w] else 0.0 for w in workers}


def write(report: dict, rows: list[dict], folder: str) -> None:
    """report.json, metrics.csv and the plots into `folder`."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "metrics.csv"), "w", newline="") as f:
        out = csv.DictWriter(f, fieldnames=COLUMNS)
        out.writeheader()
        out.writerows(rows)
    report["plots"] = plot(report, rows, folder)
    with open(os.path.join(folder, "report.json"), "w") as f:
        json.dump(report, f, indent=2, default=float)


def plot(report: dict, rows: list[dict], folder: str) -> list[str]:
    """Write the PNG plots; their file names. A plot that fails is logged, not fatal:
    the figures themselves are in report.json and metrics.csv."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    for name, draw in (("accuracy", _accuracy), ("progress", _progress), ("staleness", _staleness),
                       ("bytes", _bytes)):
        fig = None
        try:
            fig = draw(plt, report, rows)
            if fig is not None:
                fig.tight_layout()
                fig.savefig(os.path.join(folder, f"{name}.png"), dpi=90)
                made.append(f"{name}.png")
        except Exception as e:  # noqa: BLE001
            log.warning("plot %s failed: %s", name, e)
        finally:
            if fig is not None:
                plt.close(fig)
    return made


def _title(report: dict) -> str:
    return (f"{report['task']}, {report['consistency']}, {report['workers']} workers, "
            f"{report['shards']} shards")


def _accuracy(plt, report: dict, rows: list[dict]):
    curve = report.get("curve") or [{"t": report["train_seconds"], "updates": report["updates"],
                                     "accuracy": report["final_accuracy"], "loss": report["final_loss"]}]
    fig, axes = plt.subplots(2, 2, figsize=(10, 6), sharex="col")
    for col, x in enumerate(("t", "updates")):
        xs = [p[x] for p in curve]
        axes[0][col].plot(xs, [p["accuracy"] for p in curve], marker=".")
        axes[1][col].plot(xs, [p["loss"] for p in curve], marker=".", color="tab:red")
        axes[1][col].set_xlabel("seconds of training" if x == "t" else "server updates (global step)")
    target = report.get("target")
    for ax in axes[0]:
        ax.set_ylabel("test accuracy")
        if target:
            ax.axhline(target, color="grey", linestyle=":", linewidth=1)
    for ax in axes[1]:
        ax.set_ylabel("test loss")
    fig.suptitle(_title(report))
    return fig


def _by_worker(rows: list[dict]) -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = {}
    for r in rows:
        out.setdefault(r["worker"], []).append(r)
    return dict(sorted(out.items()))


def _progress(plt, report: dict, rows: list[dict]):
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for w, rs in _by_worker(rows).items():
        ax.plot([r["t"] for r in rs], [r["clock"] for r in rs], ".", markersize=2, label=f"worker {w}")
    for e in report.get("worker_events", []):
        ax.axvline(e["t"], color={"killed": "red", "left": "orange"}.get(e["event"], "green"), linewidth=0.8, alpha=0.6)
    ax.set_xlabel("seconds of training")
    ax.set_ylabel("clock (pushes)")
    ax.set_title("worker progress" + (" (red: killed, orange: left, green: restarted)" if report.get("worker_events") else ""))
    ax.legend(markerscale=5, fontsize="small")
    return fig


def _staleness(plt, report: dict, rows: list[dict]):
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    values = [r["staleness"] for r in rows]
    top = max(values)
    ax.hist(values, bins=range(top + 2), align="left", rwidth=0.8)
    ax.set_xlabel("staleness of an applied push (weights versions)")
    ax.set_ylabel("pushes")
    ax.set_title(f"staleness ({report['consistency']})")
    return fig


def _bytes(plt, report: dict, rows: list[dict]):
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(8, 4))
    for w, rs in _by_worker(rows).items():
        ax.plot([r["clock"] for r in rs], [(r["bytes_sent"] + r["bytes_received"]) / 1e3 for r in rs],
                ".", markersize=2, label=f"worker {w}")
    ax.set_xlabel("clock (pushes)")
    ax.set_ylabel("KB on the wire per step (pushed + pulled)")
    ax.set_title(f"bytes per step (codec {report.get('codec', 'none')}, pulls {report.get('pull_codec', 'none')})")
    ax.legend(markerscale=5, fontsize="small")
    return fig
