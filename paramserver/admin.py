"""What tools and operators ask a running server: its status, and to stop."""

from __future__ import annotations

import zmq

from . import protocol
from .errors import DeadlineExceeded
from .protocol import VERSION
from .transport import Channel


def _ask(server: str, header_type, timeout: float, ctx: zmq.Context | None, keys=None):
    own = ctx is None
    ctx = ctx or zmq.Context()
    try:
        channel = Channel(ctx, server, "coordinator", keys)
        try:
            return channel.request(header_type(v=VERSION, seq=channel.next_seq()), timeout=timeout).header
        except DeadlineExceeded:
            if channel.handshake_refused():
                raise DeadlineExceeded(f"the server at {server} refused our CURVE key") from None
            raise DeadlineExceeded(f"no reply from a coordinator at {server} within {timeout}s; "
                                   "is `ps-server start` running there?") from None
        finally:
            channel.close()
    finally:
        if own:
            ctx.term()


def status(server: str, timeout: float = 5.0, ctx: zmq.Context | None = None, keys=None) -> dict:
    """The coordinator's view: state, workers, shards, what a round waits for."""
    return _ask(server, protocol.Status, timeout, ctx, keys).info


def stop(server: str, timeout: float = 5.0, ctx: zmq.Context | None = None, keys=None) -> None:
    """Ask the server to end the run: workers are told to finish, then every process exits."""
    _ask(server, protocol.Stop, timeout, ctx, keys)


def straggler(workers: list[dict]) -> int | None:
    """The slowest live worker (fewest steps/s, then lowest clock); None with fewer than
    two, or while none is slower than another."""
    if len(workers) < 2:
        return None
    slow = min(workers, key=lambda w: (w["steps_per_s"], w["clock"]))
    fast = max(workers, key=lambda w: (w["steps_per_s"], w["clock"]))
    return None if (slow["steps_per_s"], slow["clock"]) == (fast["steps_per_s"], fast["clock"]) else slow["id"]


def status_view(info: dict):
    """The status as rich renderables: a summary line and the workers' table, the straggler in red."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    workers = sorted(info["workers"], key=lambda w: w["id"])
    ahead = max((w["clock"] for w in workers), default=0)
    slow = straggler(workers)
    head = Text(f"{info['state']}  updates {info['updates']}  {info['config']['consistency']}  "
                f"{len(workers)} live workers  {len(info['shards'])} shards  epoch {info['epoch']}")
    if info["waiting_for"]:
        head.append(f"  round waits for {info['waiting_for']}", style="yellow")
    if info.get("restarting"):
        head.append(f"  shards restarting from {info['restarting']}", style="yellow")
    table = Table(box=None, header_style="bold")
    for name in ("id", "host", "clock", "behind", "steps/s", "loss", "CPU %", "memory", "pushed", "pulled", "last seen"):
        table.add_column(name, justify="left" if name == "host" else "right")
    for w in workers:
        r, t = w.get("resources") or {}, w.get("traffic") or {}
        table.add_row(
            str(w["id"]), w["host"][:24], str(w["clock"]), str(ahead - w["clock"]), f"{w['steps_per_s']:.1f}",
            f"{w['loss']:.4f}", _num(r.get("cpu_percent"), "{:.0f}"), _size(r.get("rss_bytes")),
            _size(t.get("pushed_wire")), _size(t.get("pulled_wire")), f"{w['last_seen']:.1f}s",
            style="bold red" if w["id"] == slow else None,
        )
    parts = [head, table]
    if slow is not None:
        parts.append(Text(f"straggler: worker {slow}", style="red"))
    return Group(*parts)


def _num(value, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def _size(n) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)
