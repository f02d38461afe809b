"""Structured events as JSON lines (`--event-log FILE`): join, leave, drop, rejoin,
checkpoint, resume, restart, rejection, finish.

One object per line: `t` (Unix time), `role` (coordinator, shard-N, worker),
`pid`, `event`, then the event's own fields. Every process of a server appends
to the same file: each line goes out in one write to a file opened with
O_APPEND, so lines from different processes do not interleave. Rejections are
thinned out (the first 100, then every 1000th, each with its running count):
a flood of bad messages must not fill the disk.
"""

from __future__ import annotations

import json
import logging
import os
import time

log = logging.getLogger(__name__)

REJECTIONS_IN_FULL = 100


class EventLog:
    """Appends events to `path`; with no path, does nothing."""

    def __init__(self, path: str = "", role: str = ""):
        self.path, self.role = path, role
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644) if path else None
        self.rejections = 0

    def __repr__(self) -> str:
        return f"<EventLog {self.role} {self.path or 'off'}>"

    def emit(self, event: str, **fields) -> None:
        if self._fd is None:
            return
        line = json.dumps({"t": round(time.time(), 6), "role": self.role, "pid": os.getpid(), "event": event, **fields},
                          default=str)
        try:
            os.write(self._fd, (line + "\n").encode())
        except OSError as e:  # a full disk must not stop training
            log.warning("event log %s: %s", self.path, e)

    def rejected(self, code: str, message: str, **fields) -> None:
        self.rejections += 1
        n = self.rejections
        if n <= REJECTIONS_IN_FULL or n % 1000 == 0:
            self.emit("rejection", code=code, message=message[:200], count=n, **fields)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
