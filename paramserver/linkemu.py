"""A user-space link emulator: a TCP proxy per worker that holds bytes for a delay
and paces them at a rate, in both directions (the idea of toxiproxy; no root, no netem).

`LinkSpec` is the parsed `--link` text; `Pacer` is the pure timing model of one
direction of one link; `LinkEmulator` is the shell: one asyncio loop in one
thread, serving every proxy of a simulation. Loss and partitions are not faked
here: they are real packet drops (`netfault.py`).

Timing model of one direction (a FIFO link, like netem with a rate): a chunk
read at time t starts on the wire when the link is free, takes bytes*8/rate to
send, and arrives `delay` (+- `jitter`) after it was sent. A later chunk never
arrives before an earlier one (TCP keeps order), so in a dense stream (chunks
closer than the jitter) the delay tends to delay + jitter. All connections of
one worker share its link: a worker talking to 2 shards shares one rate.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import threading
from collections import deque
from dataclasses import dataclass

from .errors import ConfigError

log = logging.getLogger(__name__)

LINK_HELP = ("delay=50ms,jitter=5ms,rate=10mbit,loss=1%,down=5s@60s (any subset; down may repeat); "
             "N:SPEC for worker N only (0-based, in start order), repeat --link for several")
_TIME = {"us": 1e6, "ms": 1e3, "s": 1.0}  # divisors: 50/1e3 is exactly 0.05, 50*1e-3 is not
_RATE = {"bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9}
CONNECT_TIMEOUT = 5.0  # the proxy's own connection to the real server
BUFFER_BYTES = 8 << 20  # bytes a direction may hold in flight before the sender is held back (TCP)


@dataclass(frozen=True)
class LinkSpec:
    delay: float = 0.0  # seconds, each way
    jitter: float = 0.0  # seconds, uniform +- around the delay
    rate: float = 0.0  # bits per second, each way; 0: unlimited
    loss: float = 0.0  # percent of packets dropped, each way (nftables)
    downs: tuple[tuple[float, float], ...] = ()  # (start, duration) seconds after training began

    @property
    def shapes(self) -> bool:
        """Needs the proxy (delay, jitter, rate)."""
        return bool(self.delay or self.jitter or self.rate)

    @property
    def drops(self) -> bool:
        """Needs real packet drops (loss, partitions): nftables, root."""
        return bool(self.loss or self.downs)

    def __bool__(self) -> bool:
        return self.shapes or self.drops

    def __str__(self) -> str:
        parts = [f"{k}={_seconds(v)}" for k, v in (("delay", self.delay), ("jitter", self.jitter)) if v]
        if self.rate:
            parts.append(f"rate={_bits(self.rate)}")
        if self.loss:
            parts.append(f"loss={self.loss:g}%")
        parts += [f"down={_seconds(d)}@{_seconds(t)}" for t, d in self.downs]
        return ",".join(parts) or "none"

    def __post_init__(self):
        if self.jitter > self.delay:
            raise ConfigError(f"--link {self}: jitter needs a delay at least as large, e.g. delay=50ms,jitter=5ms")

    @classmethod
    def parse(cls, text: str) -> LinkSpec:
        """`delay=50ms,rate=10mbit,loss=1%,down=5s@60s` -> LinkSpec; ConfigError says what is wrong."""
        return cls(**_fields(text))


def _fields(text: str) -> dict:
    """The LinkSpec fields a `--link` text sets, each checked on its own."""
    fields: dict = {}
    downs = []
    for item in text.split(","):
        key, sep, value = (x.strip() for x in item.partition("="))
        if not sep or not value:
            raise ConfigError(f"--link {text!r}: {item.strip()!r} is not KEY=VALUE ({LINK_HELP})")
        key = key.lower()
        parsed = _parse_value(key, value, text)
        if key == "down":
            downs.append(parsed)
        elif key in fields:
            raise ConfigError(f"--link {text!r}: {key} given twice")
        else:
            fields[key] = parsed
    return {**fields, "downs": _merge(downs)} if downs else fields


def _parse_value(key: str, value: str, text: str):
    if key in ("delay", "jitter"):
        return _duration(value, f"--link {text!r}: {key}")
    if key == "rate":
        m = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*([a-z]+)", value.lower())
        if not m or m.group(2) not in _RATE or float(m.group(1)) <= 0:
            raise ConfigError(f"--link {text!r}: rate {value!r} must be a positive number with a unit: "
                              f"{', '.join(_RATE)} (bits per second, e.g. 10mbit)")
        return float(m.group(1)) * _RATE[m.group(2)]
    if key == "loss":
        try:
            loss = float(value.removesuffix("%"))
        except ValueError:
            loss = -1.0
        if not 0 < loss <= 100:
            raise ConfigError(f"--link {text!r}: loss {value!r} must be a percentage in (0, 100], e.g. 1%")
        return loss
    if key == "down":
        length, at, rest = (value.split("@") + ["", ""])[:3]
        if not at or rest:
            raise ConfigError(f"--link {text!r}: down {value!r} must be DURATION@START, e.g. 5s@60s")
        duration = _duration(length, f"--link {text!r}: down duration")
        start = _duration(at, f"--link {text!r}: down start")
        if duration <= 0:
            raise ConfigError(f"--link {text!r}: a down duration must be > 0")
        return (start, duration)
    raise ConfigError(f"--link {text!r}: unknown key {key!r}; the keys are delay, jitter, rate, loss and down")


def _duration(value: str, what: str) -> float:
    m = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*(us|ms|s)", value.strip().lower())
    if not m:
        raise ConfigError(f"{what} {value!r} needs a number and a unit: us, ms or s (e.g. 50ms)")
    return float(m.group(1)) / _TIME[m.group(2)]


def _merge(downs: list[tuple[float, float]]) -> tuple[tuple[float, float], ...]:
    """Overlapping partitions become one: (start, duration) sorted by start."""
    out: list[list[float]] = []
    for start, duration in sorted(downs):
        if out and start <= out[-1][0] + out[-1][1]:
            out[-1][1] = max(out[-1][1], start + duration - out[-1][0])
        else:
            out.append([start, duration])
    return tuple((s, d) for s, d in out)


def _seconds(v: float) -> str:
    return f"{v * 1e3:g}ms" if v < 1 else f"{v:g}s"


def _bits(v: float) -> str:
    for unit, scale in (("gbit", 10**9), ("mbit", 10**6), ("kbit", 10**3)):
        if v >= scale:
            return f"{v / scale:g}{unit}"
    return f"{v:g}bit"


def per_worker(texts, workers: int) -> list[LinkSpec]:
    """One LinkSpec per worker from repeated --link values.

    `SPEC` applies to every worker, `N:SPEC` to worker N; a worker's own keys
    replace the shared ones key by key (its `down`s replace the shared `down`s).
    """
    shared: dict = {}
    own: dict[int, dict] = {}
    for text in texts:
        index, fields = parse_item(text)
        if index is not None and index >= workers:
            raise ConfigError(f"--link {text!r} names worker {index}, but there are {workers} (0 to {workers - 1})")
        (shared if index is None else own.setdefault(index, {})).update(fields)
    return [LinkSpec(**{**shared, **own.get(i, {})}) for i in range(workers)]


def parse_item(text: str) -> tuple[int | None, dict]:
    """`[N:]SPEC` -> (N, or None for every worker; the LinkSpec fields SPEC sets)."""
    head, sep, rest = text.partition(":")
    index, spec = (None, text) if not sep or "=" in head else (head.strip(), rest)
    if index is not None and not index.isdigit():
        raise ConfigError(f"--link {text!r}: {head!r} is not a worker number (N:SPEC, N from 0)")
    try:
        fields = _fields(spec)
    except ConfigError as e:
        raise ConfigError(str(e).replace(repr(spec), repr(text), 1)) from None
    return (None if index is None else int(index)), fields


class Pacer:
    """One direction of one link: when each chunk arrives at the far end. Pure: times passed in."""

    def __init__(self, spec: LinkSpec, rng: random.Random | None = None):
        self.spec, self.rng = spec, rng or random.Random()
        self.free_at = 0.0  # when the link has sent everything it was given
        self.last_due = 0.0  # the latest arrival so far: nothing may arrive before it

    def __repr__(self) -> str:
        return f"<Pacer {self.spec}>"

    def due(self, now: float, nbytes: int) -> float:
        start = max(now, self.free_at)
        self.free_at = start + (nbytes * 8 / self.spec.rate if self.spec.rate else 0.0)
        delay = self.spec.delay + (self.rng.uniform(-self.spec.jitter, self.spec.jitter) if self.spec.jitter else 0.0)
        self.last_due = max(self.free_at + delay, self.last_due)
        return self.last_due

    def chunk_bytes(self) -> int:
        """Read size: about 2 ms of the rate, so pacing is smooth without tiny writes."""
        if not self.spec.rate:
            return 64 << 10
        return int(min(64 << 10, max(1 << 10, self.spec.rate / 8 * 0.002)))


@dataclass
class _Link:
    """A worker's link: one Pacer per direction, shared by all of its connections."""

    spec: LinkSpec
    source: str | None  # source address of the proxy's connections to the server (netfault)
    up: Pacer
    down: Pacer
    bytes_up: int = 0
    bytes_down: int = 0


class LinkEmulator:
    """Proxies `tcp://` endpoints through emulated links; one loop thread for all of them."""

    def __init__(self, listen_host: str = "127.0.0.1", seed: int | None = None):
        self.listen_host = listen_host
        self.rng = random.Random(seed)
        self.links: dict[int, _Link] = {}
        self._servers: list[asyncio.AbstractServer] = []
        self._tasks: set[asyncio.Task] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="linkemu", daemon=True)
        self._thread.start()
        self._closed = False

    def __repr__(self) -> str:
        return f"<LinkEmulator links={len(self.links)} proxies={len(self._servers)}>"

    def proxy(self, worker: int, target: str, spec: LinkSpec, source: str | None = None, timeout: float = 5.0) -> str:
        """A local address that reaches `target` (tcp://host:port) over worker's link."""
        host, port = _tcp(target)
        if worker not in self.links:
            self.links[worker] = _Link(spec, source, Pacer(spec, random.Random(self.rng.random())),
                                       Pacer(spec, random.Random(self.rng.random())))
        link = self.links[worker]
        future = asyncio.run_coroutine_threadsafe(self._listen(link, host, port), self._loop)
        return future.result(timeout)

    def stats(self) -> dict[int, dict]:
        return {w: {"spec": str(k.spec), "bytes_up": k.bytes_up, "bytes_down": k.bytes_down} for w, k in self.links.items()}

    def close(self, timeout: float = 5.0) -> None:
        """Stop every proxy and connection, then the loop thread; bounded by `timeout`."""
        if self._closed:
            return
        self._closed = True
        try:
            asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(timeout)
        except Exception as e:  # a stuck connection must not keep the process alive
            log.warning("link emulator did not shut down cleanly: %r", e)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout)
        if not self._thread.is_alive():
            self._loop.close()

    async def _listen(self, link: _Link, host: str, port: int) -> str:
        async def accept(reader, writer):
            task = asyncio.current_task()
            self._tasks.add(task)
            try:
                await self._connection(link, host, port, reader, writer)
            except asyncio.CancelledError:
                pass  # shutting down; asyncio would log a cancelled connection task as an error
            finally:
                self._tasks.discard(task)

        server = await asyncio.start_server(accept, self.listen_host, 0)
        self._servers.append(server)
        return f"tcp://{self.listen_host}:{server.sockets[0].getsockname()[1]}"

    async def _connection(self, link: _Link, host: str, port: int, c_reader, c_writer) -> None:
        try:
            local = (link.source, 0) if link.source else None
            s_reader, s_writer = await asyncio.wait_for(
                asyncio.open_connection(host, port, local_addr=local), CONNECT_TIMEOUT)
        except (OSError, asyncio.TimeoutError) as e:
            log.info("link to %s:%d: cannot connect (%r); closing the client side", host, port, e)
            c_writer.close()
            return
        up = _Pipe(c_reader, s_writer, link.up, lambda n: _count(link, "bytes_up", n))
        down = _Pipe(s_reader, c_writer, link.down, lambda n: _count(link, "bytes_down", n))
        try:
            await _all_or_abort(up.run(), down.run())
        except (ConnectionError, OSError) as e:  # a reset on one side resets the other, as on a real link
            log.debug("link to %s:%d closed: %r", host, port, e)
        finally:
            for w in (c_writer, s_writer):
                w.close()

    async def _shutdown(self) -> None:
        for server in self._servers:
            server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for server in self._servers:
            await server.wait_closed()


def _count(link: _Link, name: str, n: int) -> None:
    setattr(link, name, getattr(link, name) + n)


async def _all_or_abort(*coros) -> None:
    """Run coroutines to the end; the first one to fail cancels the others and its error is raised."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for t in done:
            t.result()
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class _Pipe:
    """One direction of one connection: read, stamp with the Pacer's arrival time, deliver then.

    Ends once the end of stream has been delivered (passed on as a half-close);
    raises if either side fails.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, pacer: Pacer, count):
        self.reader, self.writer, self.pacer, self.count = reader, writer, pacer, count
        self.queue: deque[tuple[float, bytes]] = deque()  # (arrival time, bytes); b"" is end of stream
        self.queued = 0
        self.error: BaseException | None = None
        self.changed = asyncio.Event()

    async def run(self) -> None:
        reader = asyncio.ensure_future(self._read())
        try:
            await self._deliver()
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)

    async def _read(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                while self.queued > BUFFER_BYTES:  # hold the sender back, as a full link does
                    self.changed.clear()
                    await self.changed.wait()
                data = await self.reader.read(self.pacer.chunk_bytes())
                self.queue.append((self.pacer.due(loop.time(), len(data)), data))
                self.queued += len(data)
                self.changed.set()
                if not data:
                    return
        except (ConnectionError, OSError) as e:
            self.error = e
            self.changed.set()

    async def _deliver(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self.queue:
                if self.error is not None:
                    raise self.error
                self.changed.clear()
                await self.changed.wait()
            due, data = self.queue.popleft()
            await asyncio.sleep(max(0.0, due - loop.time()))
            if not data:  # end of stream: pass the half-close on
                if self.writer.can_write_eof():
                    self.writer.write_eof()
                return
            self.writer.write(data)
            self.count(len(data))
            await self.writer.drain()
            self.queued -= len(data)
            self.changed.set()


def _tcp(address: str) -> tuple[str, int]:
    m = re.fullmatch(r"tcp://([^:;/]+|\[[^\]]+\]):(\d+)", address)
    if not m:
        raise ConfigError(f"the link emulator proxies tcp://HOST:PORT addresses only, not {address!r}")
    return m.group(1).strip("[]"), int(m.group(2))
