"""Progress bars of the long-running commands (`ps-sim run`, `ps-worker join`,
`ps-server start`): rich, on stderr, only when asked (by default: on a terminal).

While a bar runs, this process's log lines are printed above it, not through it.
"""

from __future__ import annotations

import collections
import logging
import sys
import time


class Bar:
    """A bar of `label`, `total` (None: open-ended) and a text line of named fields,
    e.g. Bar("training", 1200, "{rate} steps/s  loss {loss}", enabled=True)."""

    def __init__(self, label: str, total: int | None, text: str, enabled: bool | None = None):
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.bar, self.running = None, False
        self.recent: collections.deque = collections.deque()  # (time, count) of the last few seconds
        self.fields = _field_names(label + " " + text)
        if self.enabled:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
            )

            self.bar = Progress(TextColumn(_columns(label)), BarColumn(), MofNCompleteColumn(),
                                TextColumn(_columns(text)), TimeElapsedColumn(),
                                console=Console(stderr=True), refresh_per_second=4)
            self.task = self.bar.add_task(label, total=total or None, **dict.fromkeys(self.fields, "-"))

    def __enter__(self) -> Bar:
        return self.start()

    def start(self) -> Bar:
        if self.bar is not None and not self.running:
            self.bar.start()  # sys.stderr is now rich's proxy, which prints above the bar
            _log_to_stderr()
            self.running = True
        return self

    def update(self, completed: int, **fields) -> None:
        """Set the count and any fields; `rate` (per second since the start) is filled in."""
        if self.bar is None:
            return
        if "rate" in self.fields:
            fields["rate"] = self._rate(completed)
        self.bar.update(self.task, completed=completed, **{k: v for k, v in fields.items() if k in self.fields})

    def _rate(self, completed: int) -> str:
        """Per second over the last few seconds."""
        now = time.monotonic()
        self.recent.append((now, completed))
        while len(self.recent) > 2 and now - self.recent[0][0] > 3.0:
            self.recent.popleft()
        (t0, c0) = self.recent[0]
        return f"{(completed - c0) / (now - t0):.0f}" if now > t0 else "-"

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        if self.running:
            self.bar.stop()
            _log_to_stderr()
            self.running = False


def _field_names(text: str) -> list[str]:
    import string

    return [name for _, name, _, _ in string.Formatter().parse(text) if name]


def _columns(text: str) -> str:
    """Our "{name}" fields as rich's "{task.fields[name]}"."""
    for name in _field_names(text):
        text = text.replace("{" + name + "}", "{task.fields[" + name + "]}")
    return text


def _log_to_stderr() -> None:
    """Point the root logger's stream handlers at the sys.stderr of the moment: a handler
    keeps the stream it was made with, which would write through the bar."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.setStream(sys.stderr)
