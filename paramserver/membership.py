"""Who is alive: the pure membership table the coordinator keeps (the clock is
passed in, so tests drive time by hand).

A worker is live while its heartbeats are current; it leaves by saying so or by
missing them for the heartbeat timeout. Every change bumps `version`, which is how
the coordinator knows to tell the shards.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from . import protocol

MAX_WORKER_ID = 2**31 - 1  # protocol.Id


@dataclass
class Member:
    worker_id: int
    incarnation: int
    partition: int
    host: str
    pid: int
    clock: int
    joined: float
    last_seen: float
    loss: float = float("nan")
    steps_per_s: float = 0.0
    resources: dict = field(default_factory=dict)


class Members:
    """Who is alive. Pure: `now` comes from the caller."""

    def __init__(self, heartbeat_timeout: float, partitions: int):
        self.timeout, self.partitions = heartbeat_timeout, partitions
        self.live: dict[int, Member] = {}
        self.incarnations: dict[int, int] = {}  # every id ever seen -> its newest incarnation
        # where a returning worker resumes when nobody is live (otherwise at the slowest
        # live clock): its last clock, from a checkpoint or from when it left
        self.saved_clocks: dict[int, int] = {}
        self.version = 0  # bumps on every change of the live set

    def join(self, requested: int, host: str, pid: int, now: float) -> Member:
        # a worker asking for its old id gets it back (after a drop, or a server restart); a
        # newcomer gets the next id after those seen, or the lowest free one when a peer has
        # taken ids up to the top of the wire's range (max + 1 would not fit in a reply)
        worker = requested if requested >= 0 else max(self.incarnations, default=-1) + 1
        if worker > MAX_WORKER_ID:
            worker = next(i for i in range(len(self.incarnations) + 1) if i not in self.incarnations)
        incarnation = self.incarnations.get(worker, -1) + 1
        self.incarnations[worker] = incarnation
        partition = worker % self.partitions if self.partitions else worker
        # a newcomer starts at the slowest live clock, so ssp never sees it as far behind
        # (its own record, if an old incarnation is still live, does not count: it may be a
        # crashed process's last heartbeat); nobody else live: where it was
        own = self.live[worker].clock if worker in self.live else self.saved_clocks.get(worker, 0)
        self.saved_clocks.pop(worker, None)
        clock = min((m.clock for w, m in self.live.items() if w != worker), default=own)
        member = Member(worker, incarnation, partition, host, pid, clock, now, now)
        self.live[worker] = member
        self.version += 1
        return member

    def heartbeat(self, hb: protocol.Heartbeat, now: float) -> bool:
        m = self.live.get(hb.worker_id)
        if m is None or m.incarnation != hb.incarnation:
            return False
        m.last_seen, m.clock, m.loss = now, hb.clock, hb.loss
        m.steps_per_s, m.resources = hb.steps_per_s, dict(hb.resources)
        return True

    def leave(self, worker: int, incarnation: int) -> bool:
        m = self.live.get(worker)
        if m is None or m.incarnation != incarnation:
            return False
        del self.live[worker]
        self.saved_clocks[worker] = m.clock  # where it resumes if it returns to an empty run
        self.version += 1
        return True

    def expire(self, now: float) -> list[Member]:
        dead = [m for m in self.live.values() if now - m.last_seen > self.timeout]
        for m in dead:
            del self.live[m.worker_id]
            self.saved_clocks[m.worker_id] = m.clock
        if dead:
            self.version += 1
        return dead

    def snapshot(self) -> dict:
        clocks = {**self.saved_clocks, **{w: m.clock for w, m in self.live.items()}}
        return {str(w): {"incarnation": inc, "clock": clocks.get(w, 0)} for w, inc in self.incarnations.items()}

    def restore(self, saved: dict) -> None:
        self.incarnations = {int(w): v["incarnation"] for w, v in saved.items()}
        self.saved_clocks = {int(w): v["clock"] for w, v in saved.items()}

    def reset(self, saved: dict) -> None:
        """Back to a checkpoint's table: nobody is live until they rejoin."""
        newest = dict(self.incarnations)
        self.restore(saved)
        self.incarnations.update(newest)  # incarnations only ever grow
        self.live.clear()
        self.version += 1

    def table(self) -> dict[int, tuple[int, int]]:
        return {w: (m.incarnation, m.clock) for w, m in self.live.items()}
