"""Checkpoints: one safetensors file per shard plus one manifest, published atomically.

Layout of a checkpoint directory DIR::

    DIR/ckpt-00000003/shard-0.safetensors   parameters + optimizer state of shard 0
    DIR/ckpt-00000003/manifest.json         clocks, step, config, shard map, sha256 of every file
    DIR/latest                              the name of the newest complete checkpoint

Files are written into `DIR/.tmp-ckpt-...`, fsynced, and the directory is
renamed into place; `latest` is replaced last, by rename. A crash at any moment
leaves the previous checkpoint whole. Loading verifies every checksum and runs
no code: safetensors holds tensors and strings only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass

import torch
from safetensors.torch import load_file, save_file

from .errors import ConfigError

log = logging.getLogger(__name__)

FORMAT = 1
PREFIX, TMP = "ckpt-", ".tmp-ckpt-"
# fault injection for the crash tests: seconds to pause between the steps of a write
FAULT_SLEEP_ENV = "PS_FAULT_CHECKPOINT_SLEEP"


def _pause() -> None:
    pause = float(os.environ.get(FAULT_SLEEP_ENV, "0") or 0)
    if pause > 0:
        time.sleep(pause)


def fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# -- one shard's state ---------------------------------------------------------------


def save_shard(path: str, param: torch.Tensor, optimizer: torch.optim.Optimizer, meta: dict) -> str:
    """Write a shard's tensors and optimizer state to `path`, fsynced; returns its sha256."""
    state = optimizer.state_dict()
    tensors = {"param": param.detach().clone().contiguous()}
    # the optimizer steps one view of `param` per chunk: its state is kept flat like param
    # (per-element state concatenated in chunk order; a scalar such as Adam's step is shared)
    per_param = [state["state"].get(i, {}) for i in range(len(optimizer.param_groups[0]["params"]))]
    for name, value in per_param[0].items():
        if torch.is_tensor(value):
            value = torch.cat([s[name].reshape(-1) for s in per_param]) if value.dim() else value
            tensors[f"optim.{name}"] = value.detach().clone().contiguous()
    groups = [{k: v for k, v in g.items() if k != "params"} for g in state["param_groups"]]
    save_file(tensors, path, metadata={"meta": json.dumps(meta), "param_groups": json.dumps(groups)})
    _pause()
    fsync_path(path)
    return sha256(path)


def load_shard(path: str) -> tuple[dict[str, torch.Tensor], dict, list]:
    """(tensors, meta, param_groups) of a shard file; the caller checked its sha256."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        header = f.metadata() or {}
    try:
        return load_file(path), json.loads(header["meta"]), json.loads(header["param_groups"])
    except (KeyError, ValueError) as e:
        raise ConfigError(f"{path}: not a paramserver shard file ({e})") from e


def restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict, groups: list) -> None:
    flat = {name[len("optim."):]: t for name, t in tensors.items() if name.startswith("optim.")}
    sizes = [p.numel() for p in optimizer.param_groups[0]["params"]]
    state = {}
    if flat:
        for name, t in flat.items():
            if t.dim() and t.numel() != sum(sizes):
                raise ConfigError(f"optimizer state {name!r} holds {t.numel()} values, the shard {sum(sizes)}")
        for i, part in enumerate(_split_state(flat, sizes)):
            state[i] = part
    current = optimizer.state_dict()
    merged = [{**g, **{k: v for k, v in saved.items() if k in g}, "params": g["params"]}
              for g, saved in zip(current["param_groups"], groups)]
    optimizer.load_state_dict({"state": state, "param_groups": merged})


def _split_state(flat: dict[str, torch.Tensor], sizes: list[int]) -> list[dict[str, torch.Tensor]]:
    """Flat per-element state cut back into one dict per chunk parameter."""
    parts = [{} for _ in sizes]
    for name, t in flat.items():
        pieces = t.split(sizes) if t.dim() else [t.clone() for _ in sizes]
        for part, piece in zip(parts, pieces):
            part[name] = piece
    return parts


# -- publishing and finding checkpoints ----------------------------------------------


def begin(root: str, number: int, run_id: str) -> str:
    """A fresh temporary directory for checkpoint `number`."""
    os.makedirs(root, exist_ok=True)
    tmp = os.path.join(root, f"{TMP}{number:08d}-{run_id[:8]}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    return tmp


def publish(root: str, tmp: str, number: int, manifest: dict, keep: int) -> str:
    """Write the manifest, rename `tmp` into place, point `latest` at it, prune old ones."""
    path = os.path.join(tmp, "manifest.json")
    with open(path, "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    fsync_path(tmp)
    _pause()
    final = os.path.join(root, f"{PREFIX}{number:08d}")
    shutil.rmtree(final, ignore_errors=True)
    os.rename(tmp, final)
    fsync_path(root)
    _pause()
    pointer = os.path.join(root, "latest.tmp")
    with open(pointer, "w") as f:
        f.write(os.path.basename(final) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(pointer, os.path.join(root, "latest"))
    fsync_path(root)
    prune(root, keep)
    return final


def prune(root: str, keep: int) -> None:
    """Keep the newest `keep` complete checkpoints; drop abandoned temporary directories."""
    done = complete(root)
    for name in done[:-keep] if keep > 0 else []:
        shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    for name in os.listdir(root):
        if name.startswith(TMP):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def complete(root: str) -> list[str]:
    """Names of the checkpoints in `root` that have a manifest, oldest first."""
    if not os.path.isdir(root):
        return []
    names = [n for n in os.listdir(root) if n.startswith(PREFIX)]
    return sorted(n for n in names if os.path.isfile(os.path.join(root, n, "manifest.json")))


@dataclass(frozen=True)
class Checkpoint:
    path: str
    manifest: dict

    @property
    def number(self) -> int:
        return int(self.manifest["number"])

    def shard_file(self, index: int) -> str:
        return os.path.join(self.path, self.manifest["shards"][index]["file"])


def latest(root: str) -> Checkpoint:
    """The newest complete checkpoint in `root`, verified; ConfigError says what is wrong."""
    if not os.path.isdir(root):
        raise ConfigError(f"--resume {root}: no such directory")
    pointer = os.path.join(root, "latest")
    name = open(pointer).read().strip() if os.path.isfile(pointer) else None
    names = complete(root)
    if name not in names:
        # `latest` is replaced after the rename, so a crash between the two leaves
        # a newer complete checkpoint than it names: the newest complete one wins
        if not names:
            raise ConfigError(f"--resume {root}: no complete checkpoint there (no {PREFIX}*/manifest.json)")
        name = names[-1]
    elif names and names[-1] != name:
        name = names[-1]
    return verify(os.path.join(root, name))


def verify(path: str) -> Checkpoint:
    try:
        with open(os.path.join(path, "manifest.json")) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}/manifest.json is unreadable: {e}") from e
    if manifest.get("format") != FORMAT:
        raise ConfigError(f"{path}/manifest.json: format {manifest.get('format')!r}, this version reads {FORMAT}")
    for name, digest in manifest.get("files", {}).items():
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            raise ConfigError(f"{file}: missing from checkpoint")
        if sha256(file) != digest:
            raise ConfigError(f"{file}: checksum mismatch (damaged or changed after it was written)")
    return Checkpoint(path, manifest)


def signature(layout) -> str:
    """A short hash of the model's parameter names and shapes."""
    return hashlib.sha256(json.dumps(layout.signature()).encode()).hexdigest()[:16]


def export(ckpt: Checkpoint, out: str) -> dict[str, torch.Tensor]:
    """Write the checkpoint's weights as one safetensors file a torch Module loads directly."""
    m = ckpt.manifest
    flat = torch.empty(m["total"], dtype=torch.float32)
    for i in range(len(m["shards"])):
        tensors, meta, _ = load_shard(ckpt.shard_file(i))
        flat[meta["lo"] : meta["lo"] + tensors["param"].numel()] = tensors["param"]
    state = {e["name"]: flat[e["offset"] : e["offset"] + e["numel"]].view(e["shape"]).clone() for e in m["layout"]}
    save_file(state, out, metadata={"run_id": m["run_id"], "task": m["config"]["task"], "step": str(m["updates"])})
    return state


# -- driving one checkpoint across the shards (pure: the coordinator does the I/O) ----


@dataclass
class _Pending:
    number: int
    tmp: str
    deadline: float
    replies: dict  # shard index -> CheckpointOk
    seqs: dict  # shard index -> sequence number of our request


class Orchestrator:
    """One checkpoint at a time: when one is due, what to ask, when it is complete."""

    def __init__(self, cfg, run_id: str, number: int, write_timeout: float, clock=time.monotonic):
        self.cfg, self.run_id, self.number = cfg, run_id, number
        self.write_timeout, self.now = write_timeout, clock
        self.last = clock()
        self.current: _Pending | None = None
        self.written = 0
        self.published_at: float | None = None  # clock() of the newest publish

    @property
    def enabled(self) -> bool:
        return bool(self.cfg.directory)

    def due(self) -> bool:
        return self.enabled and self.current is None and self.now() - self.last >= self.cfg.every

    def start(self) -> tuple[str, int]:
        """Begin checkpoint number+1; returns (directory name to send the shards, number)."""
        self.number += 1
        tmp = begin(self.cfg.directory, self.number, self.run_id)
        self.current = _Pending(self.number, tmp, self.now() + self.write_timeout, {}, {})
        return os.path.basename(tmp), self.number

    def on_reply(self, reply) -> bool:
        """Record a shard's CheckpointOk; True once every shard has answered."""
        if self.current is None or self.current.seqs.get(reply.index) != reply.seq:
            return False  # a late answer to an abandoned checkpoint
        self.current.replies[reply.index] = reply
        return True

    def complete(self, shards: int) -> bool:
        return self.current is not None and len(self.current.replies) == shards

    def expired(self) -> bool:
        return self.current is not None and self.now() > self.current.deadline

    def abandon(self, why: str, retry_after: float = 1.0) -> None:
        if self.current is not None:
            log.warning("checkpoint %d abandoned: %s", self.current.number, why)
            shutil.rmtree(self.current.tmp, ignore_errors=True)
        self.current = None
        self.last = self.now() - self.cfg.every + retry_after

    def publish(self, manifest: dict) -> str:
        """Finish the current checkpoint with `manifest` (files and shard versions added here)."""
        cur = self.current
        replies = [cur.replies[i] for i in sorted(cur.replies)]
        manifest = {
            **manifest, "format": FORMAT, "number": cur.number, "run_id": self.run_id, "created": time.time(),
            "files": {r.file: r.sha256 for r in replies},
            "updates": min(r.updates for r in replies),
        }
        for shard, r in zip(manifest["shards"], replies):
            shard.update(file=r.file, version=r.version, updates=r.updates)
        path = publish(self.cfg.directory, cur.tmp, cur.number, manifest, self.cfg.keep)
        self.current, self.last = None, self.now()
        self.written += 1
        self.published_at = self.last
        log.info("checkpoint %d written: %s (step %d)", cur.number, path, manifest["updates"])
        return path
