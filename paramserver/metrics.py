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

import bisect
import itertools
import logging
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString

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


class _Histogram:
    """One histogram in plain numbers (bucket counts and a sum), exported by ShardCollector."""

    __slots__ = ("name", "doc", "bounds", "counts", "sum", "created")

    def __init__(self, name: str, doc: str, bounds):
        self.name, self.doc = name, doc
        self.bounds = tuple(float(b) for b in bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # not cumulative; the last is above every bound
        self.sum, self.created = 0.0, time.time()

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1  # a bucket holds values <= its bound
        self.sum += value

    def family(self, shard: str) -> HistogramMetricFamily:
        buckets = list(zip((*map(floatToGoString, self.bounds), "+Inf"), itertools.accumulate(self.counts)))
        f = HistogramMetricFamily(self.name, self.doc, labels=["shard"])
        f.add_metric([shard], buckets, self.sum)
        f.add_sample(f"{self.name}_created", {"shard": shard}, self.created)
        return f


class ShardMetrics(Served):
    """A shard's metrics. The per-message ones (counts, bytes, latencies, the version) are
    plain numbers that the registry reads only when scraped: prometheus_client's metric
    objects take a lock and run several Python calls on every update, a tenth of the
    shard's time for a small push. Only the shard's thread writes them; a scrape from
    the HTTP thread reads them as they stand."""

    def __init__(self, shard: int):
        super().__init__()
        self.shard = str(shard)
        # worker -> [messages, raw bytes, wire bytes, created], from the worker's first push / pull
        self.pushes: dict[int, list] = {}
        self.pulls: dict[int, list] = {}
        self.push_seconds = _Histogram("paramserver_push_seconds", "time a shard takes to decode, check and admit a push", LATENCY)
        self.pull_seconds = _Histogram("paramserver_pull_seconds",
                                       "from a pull's arrival to its answer, consistency waits included", LATENCY)
        self.apply_seconds = _Histogram("paramserver_apply_seconds", "one optimizer step on a shard", LATENCY)
        self.round_seconds = _Histogram("paramserver_round_seconds", "time between consecutive updates of a shard", LATENCY)
        self.staleness = _Histogram("paramserver_staleness", "versions a gradient's weights were behind when applied",
                                    STALENESS)
        self.version = 0
        self.rejected = Counter("paramserver_rejected_messages", "messages refused, by reason (the error code)",
                                ["shard", "reason"], registry=self.registry)
        self.registry.register(ShardCollector(self))

    def pushed(self, worker: int, raw: int, wire: int, seconds: float) -> None:
        _count(self.pushes, worker, raw, wire)
        self.push_seconds.observe(seconds)

    def pulled(self, worker: int, raw: int, wire: int, seconds: float) -> None:
        _count(self.pulls, worker, raw, wire)
        self.pull_seconds.observe(seconds)

    def applied(self, staleness: int, seconds: float, since_last: float | None, version: int) -> None:
        self.staleness.observe(staleness)
        self.apply_seconds.observe(seconds)
        if since_last is not None:
            self.round_seconds.observe(since_last)
        self.version = version

    def refused(self, reason: str) -> None:
        self.rejected.labels(self.shard, reason).inc()


def _count(table: dict[int, list], worker: int, raw: int, wire: int) -> None:
    c = table.get(worker)
    if c is None:
        c = table[worker] = [0, 0, 0, time.time()]
    c[0] += 1
    c[1] += raw
    c[2] += wire


# the per-worker counters: (ShardMetrics attribute, name, help, bytes name, bytes help)
WORKER_COUNTERS = (
    ("pushes", "paramserver_pushes", "pushes admitted, by worker and shard",
     "paramserver_pushed_bytes", "bytes of pushes: raw (as float32) and wire (as sent)"),
    ("pulls", "paramserver_pulls", "pulls answered, by worker and shard",
     "paramserver_pulled_bytes", "bytes of pull answers: raw (as float32) and wire (as sent)"),
)


class ShardCollector:
    """Turns ShardMetrics' numbers into metric families at scrape time."""

    def __init__(self, m: ShardMetrics):
        self.m = m

    def collect(self):
        m, shard = self.m, self.m.shard
        for attr, name, doc, bytes_name, bytes_doc in WORKER_COUNTERS:
            count = CounterMetricFamily(name, doc, labels=["worker", "shard"])
            volume = CounterMetricFamily(bytes_name, bytes_doc, labels=["worker", "shard", "kind"])
            # list(): one C-level copy, as the shard's thread may add a worker meanwhile
            for worker, (n, raw, wire, created) in list(getattr(m, attr).items()):
                w = str(worker)
                count.add_metric([w, shard], n, created=created)
                volume.add_metric([w, shard, "raw"], raw, created=created)
                volume.add_metric([w, shard, "wire"], wire, created=created)
            yield count
            yield volume
        for h in (m.push_seconds, m.pull_seconds, m.apply_seconds, m.round_seconds, m.staleness):
            yield h.family(shard)
        version = GaugeMetricFamily("paramserver_shard_version", "updates applied to the shard's weights", labels=["shard"])
        version.add_metric([shard], m.version)
        yield version


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
