"""The worker side of paramserver: join a server, pull, compute, push.

    from workers import WorkerConfig, run_worker
    result = run_worker(WorkerConfig(server="tcp://127.0.0.1:5555", max_steps=100))
"""

from .config import WorkerConfig, WorkerResult
from .trainer import run_worker

__all__ = ["WorkerConfig", "WorkerResult", "run_worker"]
