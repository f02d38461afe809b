"""Real packet loss and partitions for simulated workers, with nftables on loopback.

Each worker gets its own loopback source address (`worker_address`), and one
nftables table per simulation (`inet paramserver_sim_<pidns>_<pid>`) drops its
packets: at random for `loss`, all of them while a `down` partition lasts
(the address is in the table's `down` set). Only the output hook is used: every
loopback packet passes it once, in either direction (saddr: worker to server,
daddr: server to worker).

The table (and any alias added to `lo`) is removed by `close()`, which runs in
the simulation's `finally`, on SIGTERM and SIGHUP (turned into SystemExit while
the faults are up), and at exit; a table left by a simulation that was killed
with SIGKILL is removed by the next one (its pid is gone). This needs root and
the `nft` tool; `check_available` refuses otherwise, saying why: there is no
user-space fallback that would only pretend to lose packets.

`ruleset` and `schedule` are pure; `NetFaults` is the shell that runs `nft`.
"""

from __future__ import annotations

import atexit
import errno
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import threading
import time

from .errors import ConfigError, PSError
from .linkemu import LinkSpec

log = logging.getLogger(__name__)

TABLE_PREFIX = "paramserver_sim_"
NFT_TIMEOUT = 10.0  # one nft or ip command
MAX_WORKERS = 240  # addresses .10 to .249 of the simulation's /24
CLEANUP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def worker_address(index: int, pid: int | None = None) -> str:
    """Worker `index`'s source address: 127.P.Q.(10+index), P.Q from the simulation's pid,
    so that two simulations on one machine never drop each other's packets."""
    if not 0 <= index < MAX_WORKERS:
        raise ConfigError(f"packet loss and partitions support at most {MAX_WORKERS} workers")
    pid = os.getpid() if pid is None else pid
    return f"127.{(pid >> 8) & 255}.{pid & 255}.{10 + index}"


def table_name(pid: int | None = None) -> str:
    return f"{TABLE_PREFIX}{_pid_namespace()}_{os.getpid() if pid is None else pid}"


def _pid_namespace() -> int:
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def ruleset(table: str, specs: dict[int, LinkSpec], addresses: dict[int, str]) -> str:
    """The nft script that creates the table: worker index -> spec (with loss or down) and address."""
    lines = [f"table inet {table} {{", "  set down { type ipv4_addr; }", "  counter partitioned { }"]
    for i, spec in specs.items():
        lines += [f"  counter w{i}_packets {{ }}"] + ([f"  counter w{i}_lost {{ }}"] if spec.loss else [])
    lines += ["  chain output {", "    type filter hook output priority 0; policy accept;",
              "    ip saddr @down counter name partitioned drop", "    ip daddr @down counter name partitioned drop"]
    for i, spec in specs.items():
        a = addresses[i]
        lines += [f"    ip saddr {a} counter name w{i}_packets", f"    ip daddr {a} counter name w{i}_packets"]
        if spec.loss:
            # numgen draws 0..9999 per packet: loss in hundredths of a percent
            n = round(spec.loss * 100)
            draw = f"numgen random mod 10000 < {n} " if n < 10000 else ""
            lines += [f"    ip {d} {a} {draw}counter name w{i}_lost drop" for d in ("saddr", "daddr")]
    lines += ["  }", "}"]
    return "\n".join(lines) + "\n"


def schedule(specs: dict[int, LinkSpec]) -> list[tuple[float, int, str]]:
    """Partition changes as (seconds after training began, worker index, "down" | "up"), in time order."""
    events = []
    for i, spec in specs.items():
        for start, duration in spec.downs:
            events += [(start, i, "down"), (start + duration, i, "up")]
    return sorted(events)


def check_available() -> None:
    """Raise ConfigError saying why real packet drops cannot be made here, if they cannot."""
    advice = "or drop loss= and down= from --link (delay, jitter and rate need neither)"
    if os.geteuid() != 0:
        raise ConfigError(f"--link loss= and down= drop real packets with nftables, which needs root "
                          f"(this is uid {os.geteuid()}): run ps-sim as root, {advice}")
    if shutil.which("nft") is None:
        raise ConfigError(f"--link loss= and down= need the nft tool (apt-get install nftables), {advice}")
    out = _run(["nft", "list", "tables"], check=False)
    if out.returncode != 0:
        raise ConfigError(f"nftables does not work here (`nft list tables`: {out.stderr.strip()}), {advice}")


class NetFaults:
    """One simulation's nftables table, loopback addresses and partition schedule."""

    def __init__(self, specs: dict[int, LinkSpec]):
        # specs: worker index -> its link, only workers whose link drops packets
        self.specs = specs
        self.table = table_name()
        self.addresses = {i: worker_address(i) for i in specs}
        self.aliases: list[str] = []  # addresses we added to lo (none where 127/8 is already local)
        self.events: list[dict] = []  # partitions as they happened, seconds after training began
        self.counters: dict[str, int] = {}
        self._opened = self._closed = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._signals: dict[int, object] = {}  # handlers found at open(), put back by close()

    def __repr__(self) -> str:
        return f"<NetFaults {self.table} workers={sorted(self.specs)}>"

    def open(self) -> None:
        """Create the table and addresses; from here on `close()` is guaranteed to run."""
        check_available()
        _sweep_stale_tables()
        self._opened = True
        atexit.register(self.close)
        self._set_signals(_exit_on_signal, (signal.SIGTERM, signal.SIGHUP))  # Ctrl-C keeps its own handler
        for address in self.addresses.values():
            self._ensure_local(address)
        _run(["nft", "-f", "-"], stdin=ruleset(self.table, self.specs, self.addresses))
        log.info("nftables table %s: %s", self.table, ", ".join(f"worker {i} {self.addresses[i]} {s}" for i, s in self.specs.items()))

    def begin(self) -> None:
        """Training began: start the partition clock."""
        if self._thread is None and schedule(self.specs):
            self._thread = threading.Thread(target=self._partitions, args=(time.monotonic(),), name="netfault", daemon=True)
            self._thread.start()

    def _partitions(self, t0: float) -> None:
        for at, i, what in schedule(self.specs):
            if self._stop.wait(max(0.0, t0 + at - time.monotonic())):
                return
            verb = "add" if what == "down" else "delete"
            try:
                _run(["nft", verb, "element", "inet", self.table, "down", f"{{ {self.addresses[i]} }}"])
            except PSError as e:
                if not self._stop.is_set():  # else the table is being removed under us
                    log.error("partition of worker %d could not be changed: %s", i, e)
                continue
            self.events.append({"t": round(time.monotonic() - t0, 3), "worker": i, "event": what})
            log.warning("worker %d network %s (%s)", i, what, self.addresses[i])

    def close(self) -> None:
        """Remove the table and any alias; idempotent. A signal that comes meanwhile waits until
        the rules are gone, then goes to the handler it would have found before open()."""
        if self._closed or not self._opened:
            return
        pending: list[int] = []
        self._set_signals(lambda signum, frame: pending.append(signum))
        try:
            self._stop.set()
            self.counters = self._read_counters()
            _run(["nft", "delete", "table", "inet", self.table], check=False)
            for address in self.aliases:
                _run(["ip", "addr", "del", f"{address}/32", "dev", "lo"], check=False)
            self._closed = True
        finally:
            self._set_signals(None)
        atexit.unregister(self.close)
        log.info("nftables table %s removed", self.table)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(NFT_TIMEOUT)
        for signum in pending:
            signal.raise_signal(signum)

    def summary(self) -> dict:
        return {"table": self.table, "addresses": {str(i): a for i, a in self.addresses.items()},
                "aliases_added": list(self.aliases), "partitions": list(self.events), "counters": dict(self.counters)}

    def _read_counters(self) -> dict[str, int]:
        out = _run(["nft", "-j", "list", "counters", "table", "inet", self.table], check=False)
        try:
            items = json.loads(out.stdout)["nftables"]
        except (ValueError, KeyError):
            return {}
        return {c["counter"]["name"]: c["counter"]["packets"] for c in items if "counter" in c}

    def _ensure_local(self, address: str) -> None:
        """Make `address` a local address (on Linux all of 127/8 usually is already)."""
        s = socket.socket()
        try:
            s.bind((address, 0))
            return
        except OSError as e:
            if e.errno != errno.EADDRNOTAVAIL:
                raise
        finally:
            s.close()
        self.aliases.append(address)  # before adding: an interrupted add is still removed
        _run(["ip", "addr", "add", f"{address}/32", "dev", "lo"])

    def _set_signals(self, handler, signals=CLEANUP_SIGNALS) -> None:
        """Install `handler` for `signals`; None: back to the handlers found before."""
        if threading.current_thread() is not threading.main_thread():
            return  # only the main thread may set handlers; it is also the one they run in
        for sig in signals:
            previous = signal.signal(sig, handler if handler is not None else self._signals.get(sig, signal.SIG_DFL))
            self._signals.setdefault(sig, signal.SIG_DFL if previous is None else previous)


def _exit_on_signal(signum, frame):
    # SIGTERM and SIGHUP kill a process without running `finally`; this runs them
    raise SystemExit(128 + signum)


def _sweep_stale_tables() -> None:
    """Remove tables of earlier simulations (this pid namespace) whose process is gone (SIGKILL)."""
    prefix = f"{TABLE_PREFIX}{_pid_namespace()}_"
    for name in our_tables():
        pid = name[len(prefix):] if name.startswith(prefix) else ""
        if pid.isdigit() and not _alive(int(pid)):
            log.warning("removing nftables table %s left by a simulation that was killed", name)
            _run(["nft", "delete", "table", "inet", name], check=False)


def our_tables() -> list[str]:
    """Names of every paramserver simulation table in the kernel now."""
    out = _run(["nft", "-j", "list", "tables"], check=False)
    try:
        items = json.loads(out.stdout)["nftables"]
    except (ValueError, KeyError):
        return []
    return [t["table"]["name"] for t in items if "table" in t and t["table"]["name"].startswith(TABLE_PREFIX)]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _run(cmd: list[str], stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    try:
        out = subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=NFT_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as e:
        if check:
            raise PSError(f"{' '.join(cmd[:3])} failed: {e}") from e
        return subprocess.CompletedProcess(cmd, 1, "", str(e))
    if check and out.returncode != 0:
        raise PSError(f"{' '.join(cmd)} failed: {out.stderr.strip()}")
    return out
