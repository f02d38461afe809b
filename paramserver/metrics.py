"""Prometheus metrics of the coordinator and the shards (`--metrics-port`).

Each process has its own registry (several shards may share one test process)
and, when given a port, serves it over HTTP from a daemon thread: the
coordinator on `--metrics-port`, shard i on `--metrics-port` + 1 + i, on the
bind host. Names follow the Prometheus conventions: `paramserver_` prefix,
`_total` for counters, base units (`_seconds`, `_bytes`).

Labels stay bounded: `worker` only ever names a member (the shard checks
before counting), `shard` and `reason` come from small fixed sets.
"""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

log = logging.getLogger(__name__)

# seconds: a push of a small model takes well under 1 ms, a 100 MB one about 0.1 s
LATENCY = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
STALENESS = (0, 1, 2, 3, 4, 6, 8, 12, 16, 32, 64)


class Served:
    """A registry, and its HTTP endpoint once `serve` is called."""

    def __init__(self):
        self.registry = CollectorRegistry()
        self._httpd = None
        self.port = 0

    def serve(self, host: str, port: int) -> int:
        """Serve /metrics on host:port (0: a free port); returns the port."""
        self._httpd, _ = start_http_server(port, addr=host, registry=self.registry)
        self.port = self._httpd.server_address[1]
        log.info("metrics at http://%s:%d/metrics", host, self.port)
        return self.port

    def close(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None


class ShardMetrics(Served):
    def __init__(self, shard: int):
        super().__init__()
        r, self.shard = self.registry, str(shard)
        self.pushes = Counter("paramserver_pushes", "pushes admitted, by worker and shard", ["worker", "shard"], registry=r)
        self.pulls = Counter("paramserver_pulls", "pulls answered, by worker and shard", ["worker", "shard"], registry=r)
        self.pushed_bytes = Counter("paramserver_pushed_bytes", "bytes of pushes: raw (as float32) and wire (as sent)",
                                    ["worker", "shard", "kind"], registry=r)
        self.pulled_bytes = Counter("paramserver_pulled_bytes", "bytes of pull answers: raw (as float32) and wire (as sent)",
                                    ["worker", "shard", "kind"], registry=r)
        self.push_seconds = Histogram("paramserver_push_seconds", "time a shard takes to decode, check and admit a push",
                                      ["shard"], buckets=LATENCY, registry=r)
        self.pull_seconds = Histogram("paramserver_pull_seconds",
                                      "from a pull's arrival to its answer, consistency waits included",
                                      ["shard"], buckets=LATENCY, registry=r)
        self.apply_seconds = Histogram("paramserver_apply_seconds", "one optimizer step on a shard",
                                       ["shard"], buckets=LATENCY, registry=r)
        self.round_seconds = Histogram("paramserver_round_seconds", "time between consecutive updates of a shard",
                                       ["shard"], buckets=LATENCY, registry=r)
        self.staleness = Histogram("paramserver_staleness", "versions a gradient's weights were behind when applied",
                                   ["shard"], buckets=STALENESS, registry=r)
        self.rejected = Counter("paramserver_rejected_messages", "messages refused, by reason (the error code)",
                                ["shard", "reason"], registry=r)
        self.version = Gauge("paramserver_shard_version", "updates applied to the shard's weights", ["shard"], registry=r)
        self._by_worker: dict = {}  # (worker, counter) -> its labelled children
        self._push_seconds = self.push_seconds.labels(self.shard)
        self._pull_seconds = self.pull_seconds.labels(self.shard)
        self._apply_seconds = self.apply_seconds.labels(self.shard)
        self._round_seconds = self.round_seconds.labels(self.shard)
        self._staleness = self.staleness.labels(self.shard)
        self._version = self.version.labels(self.shard)

    def _children(self, worker: int, count: Counter, volume: Counter) -> tuple:
        # labels() hashes and locks on every call: each push and pull would pay it three times
        key = (worker, count)
        got = self._by_worker.get(key)
        if got is None:
            w = str(worker)
            got = self._by_worker[key] = (count.labels(w, self.shard), volume.labels(w, self.shard, "raw"),
                                          volume.labels(w, self.shard, "wire"))
        return got

    def pushed(self, worker: int, raw: int, wire: int, seconds: float) -> None:
        self._count(self._children(worker, self.pushes, self.pushed_bytes), raw, wire)
        self._push_seconds.observe(seconds)

    def pulled(self, worker: int, raw: int, wire: int, seconds: float) -> None:
        self._count(self._children(worker, self.pulls, self.pulled_bytes), raw, wire)
        self._pull_seconds.observe(seconds)

    @staticmethod
    def _count(children: tuple, raw: int, wire: int) -> None:
        n, raw_bytes, wire_bytes = children
        n.inc()
        raw_bytes.inc(raw)
        wire_bytes.inc(wire)

    def applied(self, staleness: int, seconds: float, since_last: float | None, version: int) -> None:
        self._staleness.observe(staleness)
        self._apply_seconds.observe(seconds)
        if since_last is not None:
            self._round_seconds.observe(since_last)
        self._version.set(version)

    def refused(self, reason: str) -> None:
        self.rejected.labels(self.shard, reason).inc()


class CoordinatorMetrics(Served):
    def __init__(self):
        super().__init__()
        r = self.registry
        self.live_workers = Gauge("paramserver_live_workers", "workers in the live set", registry=r)
        self.joins = Counter("paramserver_joins", "joins granted (rejoins included)", registry=r)
        self.drops = Counter("paramserver_dropped_workers", "workers dropped for missing heartbeats", registry=r)
        self.rejected = Counter("paramserver_coordinator_rejected_messages", "messages the coordinator refused, by reason",
                                ["reason"], registry=r)
        self.checkpoints = Counter("paramserver_checkpoints_written", "checkpoints published", registry=r)
        self.checkpoint_age = Gauge("paramserver_checkpoint_age_seconds",
                                    "seconds since the newest checkpoint was published (-1: none yet)", registry=r)
        self.updates = Gauge("paramserver_updates", "updates applied (the slowest shard's count)", registry=r)
