"""Ctrl-C and SIGTERM while a server or worker runs: the first ends the run cleanly,
a second stops at once. Used by `cluster.serve` and `workers.run_worker`."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def handled(handler: Callable[[str], None], signals=STOP_SIGNALS):
    """While inside, each of `signals` calls handler(signal name) on the main thread; the
    handlers found are put back on the way out. Only the main thread can take signals
    (the benchmarks and tests serve and train from threads): elsewhere this does nothing.
    A signal found ignored stays ignored, as a script's background job (SIGINT) or
    nohup expect."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}
    try:
        for sig in signals:
            if signal.getsignal(sig) is not signal.SIG_IGN:
                previous[sig] = signal.signal(sig, lambda signum, frame: handler(signal.Signals(signum).name))
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def interrupt(name: str) -> None:
    """As Ctrl-C does: KeyboardInterrupt where the main thread is."""
    raise KeyboardInterrupt(name)
