"""Run the benchmark suite: `make bench`, or `python -m bench.run [--quick] [--only NAME ...]`.

Each benchmark writes bench/results/NAME.json and NAME.png; a full run then
regenerates docs/benchmarks.md from every result file there. `--quick` is a
smoke version (minutes, not tens of minutes) whose results go to
bench/results/quick/ and never into the docs.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import time
import traceback

from paramserver import transport

from . import common, report

BENCHMARKS = ["transport", "scaling", "training", "stragglers", "apply", "many_workers", "slowlink"]
log = logging.getLogger("bench")


def parse(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a short smoke version; results to bench/results/quick/")
    p.add_argument("--only", action="append", choices=BENCHMARKS, metavar="NAME",
                   help=f"run only this benchmark (repeatable): {', '.join(BENCHMARKS)}")
    p.add_argument("--no-docs", action="store_true", help="do not regenerate docs/benchmarks.md")
    p.add_argument("--docs-only", action="store_true",
                   help="only regenerate docs/benchmarks.md from the result files already there")
    return p.parse_args(argv)


def run_one(name: str, quick: bool, context: dict, info: dict) -> dict:
    module = importlib.import_module(f"bench.{name}")
    started = time.monotonic()
    log.warning("== %s ...", name)
    try:
        result = module.run(quick=quick, context=context)
    except Exception as e:  # noqa: BLE001 (one broken benchmark must not lose the others' figures)
        log.error("%s failed: %s", name, e)
        result = {"name": name, "title": name, "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc(), "rows": []}
    result.update(seconds=round(time.monotonic() - started, 1), **info)
    if result.get("rows") and hasattr(module, "plot"):
        try:
            import matplotlib

            matplotlib.use("Agg")
            os.makedirs(common.RESULTS, exist_ok=True)
            png = os.path.join(common.RESULTS, f"{name}.png")
            module.plot(result, png)
            result["plot"] = f"{name}.png"
        except Exception as e:  # noqa: BLE001 (a plot is a bonus; the figures are in the JSON)
            log.error("plot of %s failed: %s", name, e)
    common.write_json(name, result)
    log.warning("== %s done in %.0fs", name, result["seconds"])
    return result


def main(argv=None) -> int:
    # this process is a client in benchmarks 1, 2 and 5 (ours and the bare echo's): it
    # allocates as our worker processes do
    transport.tune_allocator()
    args = parse(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.quick:
        common.RESULTS = os.path.join(common.RESULTS, "quick")
    names = args.only or BENCHMARKS
    if args.docs_only:
        report.write(report.DOC, common.RESULTS)
        return 0
    command = "python -m bench.run " + " ".join(sys.argv[1:] if argv is None else argv)
    info = {"quick": args.quick, "command": command.strip(), "machine": common.machine(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "load_before": os.getloadavg()}
    before = common.children()
    context: dict = {}
    started = time.monotonic()
    try:
        for name in names:
            context[name] = run_one(name, args.quick, context, info)
    finally:
        common.close_shared(context)
        leaked = common.reap_children(before)
        if leaked:
            log.error("killed %d leftover processes: %s", len(leaked), leaked)
    total = time.monotonic() - started
    log.warning("all done in %.0fs", total)
    if names == BENCHMARKS:
        common.write_json("suite", {"seconds": round(total), "command": info["command"], "date": info["date"]})
    path = os.path.join(common.RESULTS, "benchmarks.md") if args.quick else report.DOC
    if not args.no_docs:
        report.write(path, common.RESULTS)
        log.warning("wrote %s", path)
    failed = [n for n in names if "error" in context.get(n, {})]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
