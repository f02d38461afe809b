"""4. Stragglers: benchmark 3's digits run with 4 workers, one of them slowed to a
quarter of the others' speed by the same injected delay (seconds slept per step)
for DDP and for us; time to 0.95 test accuracy.

The delay is 3x the step time of one of our asp workers, measured in benchmark 3
of this invocation (so, in our system, the straggler runs at 1/4 speed); without
it (`--only stragglers`), a short asp run here measures it. A run ends when the
target is reached (or after its steps), since only the time to it is asked.
"""

from __future__ import annotations

import logging

import torch

from .common import row, shared, summary
from .engine import Runner, with_steps
from .training import DIGITS, run_system

log = logging.getLogger(__name__)
WORKERS = 4
MODES = ["bsp", "asp", "ssp:2"]


def step_time(runner: Runner, context: dict | None) -> tuple[float, str]:
    """Seconds per step of one of our asp workers in the 4-worker digits run."""
    training = (context or {}).get("training") or {}
    for n in (WORKERS, 2):  # --quick trains 2 workers only
        runs = training.get("raw", {}).get("digits-mlp", {}).get(f"asp x{n}", [])
        rates = [r["samples_per_s"] for r in runs if r and "error" not in r and r.get("samples_per_s")]
        if rates:
            return n * DIGITS.batch_size / summary(rates)["median"], f"benchmark 3 ({n} workers), this invocation"
    got = runner.ours(with_steps(DIGITS, 200), WORKERS, "asp")
    return WORKERS * DIGITS.batch_size / got["samples_per_s"], "a calibration run here"


def run(quick: bool = False, context: dict | None = None) -> dict:
    torch.set_num_threads(1)
    reps = 1 if quick else 3
    systems = ["ddp", "asp"] if quick else ["ddp", *MODES]
    w = with_steps(DIGITS, 300 if quick else 600)
    runner, own = shared(context, "runner", Runner)
    runs: dict[str, list] = {s: [] for s in systems}
    try:
        step, source = step_time(runner, context)
        delay = 3 * step
        delays = [0.0] * (WORKERS - 1) + [delay]  # the straggler is the last; worker 0 evaluates
        for r in range(reps):
            for system in systems[r % len(systems):] + systems[: r % len(systems)]:
                got = run_system(runner, w, system, WORKERS, delays=delays, early_stop=True)
                runs[system].append(got)
                log.warning("stragglers %s: %s", system, got.get("error") or round(got["time_to_target"] or -1, 2))
    finally:
        if own:
            runner.close()
    ddp = [g.get("time_to_target") if "error" not in g else None for g in runs["ddp"]]
    rows = []
    for system in systems[1:]:
        ours = [g.get("time_to_target") if "error" not in g else None for g in runs[system]]
        # asp and ssp:2 must get there in half DDP's time; bsp waits for the straggler like DDP does
        target = "" if system == "bsp" else "<= 0.5x DDP"
        r = row(f"{system}, 4 workers, 1 at 1/4 speed", "s to 0.95 accuracy", ours, ddp, "DDP, same delay",
                better="lower", target=target)
        if target:
            ratio = r["ratio"]["median"]
            r["met"] = ratio is not None and ratio <= 0.5
        rows.append(r)
    return {
        "name": "stragglers", "title": "4. Stragglers",
        "what": f"digits-mlp, 4 workers, worker 3 sleeps {delay * 1e3:.1f} ms per step (3x our asp step time of "
                f"{step * 1e3:.1f} ms, from {source}); the same delay on DDP rank 3. Time to 0.95 test accuracy from "
                f"the moment all workers are connected; at most {w.steps} steps per worker.",
        "rows": rows, "raw": runs, "delay_s": delay, "step_s": step,
        "detail": {"columns": ["system", "s to 0.95", "runs that reached it"],
                   "rows": [[s, summary([g.get("time_to_target") for g in runs[s] if "error" not in g]),
                             f"{sum(1 for g in runs[s] if g.get('time_to_target') is not None)}/{len(runs[s])}"]
                            for s in systems]},
    }


def plot(result: dict, path: str) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    names = list(result["raw"])
    for i, name in enumerate(names):
        ts = [g.get("time_to_target") for g in result["raw"][name] if "error" not in g]
        ts = [t for t in ts if t is not None]
        ax.scatter([i] * len(ts), ts, color="C0")
        if ts:
            ax.plot([i - 0.2, i + 0.2], [summary(ts)["median"]] * 2, color="C1")
    ax.set_xticks(range(len(names)), ["DDP" if n == "ddp" else n for n in names])
    ax.set(ylabel="s to 0.95 accuracy", title="4 workers, one at 1/4 speed")
    ax.set_ylim(bottom=0)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
