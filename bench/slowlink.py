"""7. Slow links: every worker behind its own 10 Mbit/s link with 20 ms delay each
way (`ps-sim run --link delay=20ms,rate=10mbit`, the user-space link emulator),
digits-mlp, 4 workers, bsp: seconds from the moment every worker is connected
to 0.95 test accuracy, with each push codec, against `none` run in the same
invocation.

Each codec runs with the optimizer its convergence test uses (Adagrad suits
sparse `topk` and +-scale `sign` gradients; docs/benchmarks.md and
tests/test_codecs.py record why), and with the pull codec that suits it: the
weights come back as float32 (`none`), float16 (`fp16`, `sign`) or as deltas
(`topk`: plain Adagrad changes only the weights a gradient touched). The
server's weights are evaluated every 0.25 s from the simulation's driver.
"""

from __future__ import annotations

import logging
import tempfile

from paramserver.config import Consistency, OptimizerConfig, RunConfig, Timeouts
from paramserver.linkemu import per_worker
from paramserver.sim import SimConfig, simulate

from .common import row

log = logging.getLogger("bench")

LINK = "delay=20ms,rate=10mbit"
WORKERS, STEPS = 4, 400
CASES = [  # (push codec, pull codec, optimizer, lr)
    ("none", "none", "adam", 3e-3),
    ("fp16", "fp16", "adam", 3e-3),
    ("topk:0.01", "delta", "adagrad", 0.1),
    ("sign", "fp16", "adagrad", 0.05),
]
QUICK_CASES = CASES[:1] + CASES[2:3]


def one(codec: str, pull_codec: str, optimizer: str, lr: float, steps: int, target: float) -> dict:
    run = RunConfig(consistency=Consistency("bsp"), codec=codec, pull_codec=pull_codec, seed=1,
                    optimizer=OptimizerConfig(optimizer, lr=lr))
    links = tuple(per_worker([LINK], WORKERS))
    with tempfile.TemporaryDirectory(prefix="bench-slowlink-") as folder:
        sim = SimConfig(workers=WORKERS, shards=1, steps=steps, report=folder, progress=False, links=links,
                        eval_every=0.25, target=target, timeout=600.0, timeouts=Timeouts())
        report = simulate(run, sim)
    traffic = report["traffic_by_worker"].values()
    steps_done = sum(r["steps"] for r in report["worker_results"])
    return {
        "time_to_target": report["time_to_target"], "final_accuracy": report["final_accuracy"],
        "train_seconds": report["train_seconds"],
        "pushed_wire_per_step": sum(t["pushed_wire"] for t in traffic) / steps_done,
        "pulled_wire_per_step": sum(t["pulled_wire"] for t in traffic) / steps_done,
        "curve": report["curve"],
    }


def run(quick: bool = False, context: dict | None = None) -> dict:
    cases = QUICK_CASES if quick else CASES
    # quick: a smoke run, too short for 0.95
    steps, target = (150, 0.9) if quick else (STEPS, 0.95)
    raw = {}
    for codec, pull_codec, optimizer, lr in cases:
        name = f"{codec} / {pull_codec}"
        raw[name] = one(codec, pull_codec, optimizer, lr, steps, target)
        raw[name].update(optimizer=optimizer, lr=lr)
        log.warning("slowlink %s: %s s to %s, final %.3f", name, raw[name]["time_to_target"], target,
                    raw[name]["final_accuracy"])
    base = raw["none / none"]
    rows = []
    for name, got in raw.items():
        if name == "none / none":
            continue
        rows.append(row(f"push {name.replace(' / ', ', pull ')}", f"s to {target} accuracy", [got["time_to_target"]],
                        [base["time_to_target"]], "push none, pull none, same link", better="lower"))
    detail = [[name, g["optimizer"], g["lr"], g["time_to_target"], round(g["final_accuracy"], 4),
               round(g["pushed_wire_per_step"]), round(g["pulled_wire_per_step"]),
               None if not g["time_to_target"] or not base["time_to_target"]
               else round(base["time_to_target"] / g["time_to_target"], 2)]
              for name, g in raw.items()]
    return {
        "name": "slowlink", "title": "7. Slow links",
        "what": f"digits-mlp, {WORKERS} workers, 1 shard, bsp, each worker behind `--link {LINK}`; seconds from all "
                f"workers connected to {target} test accuracy (evaluated every 0.25 s), at most {steps} steps per worker; "
                "one run per codec, `none` in the same invocation.",
        "rows": rows, "raw": raw, "target": target,
        "detail": {"columns": ["push / pull codec", "optimizer", "lr", f"s to {target}", "final accuracy",
                               "bytes pushed per step", "bytes pulled per step", "speed-up vs none"],
                   "rows": detail},
    }


def plot(result: dict, path: str) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for name, got in result["raw"].items():
        ax[0].plot([p["t"] for p in got["curve"]], [p["accuracy"] for p in got["curve"]], label=name)
    ax[0].axhline(result["target"], ls="--", color="grey")
    ax[0].set(xlabel="seconds since all workers connected", ylabel="test accuracy", ylim=(0.5, 1.0),
              title=f"accuracy over a {LINK} link")
    ax[0].legend(title="push / pull codec")
    names = list(result["raw"])
    times = [result["raw"][n]["time_to_target"] or 0 for n in names]
    ax[1].bar(range(len(names)), times)
    ax[1].set_xticks(range(len(names)), names, rotation=15)
    ax[1].set(ylabel=f"seconds to {result['target']}", title=f"time to {result['target']} (lower is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
