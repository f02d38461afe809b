"""CURVE encryption and authentication (ZeroMQ's, through pyzmq's `zmq.auth`).

The server holds one key pair: its coordinator and shards are CURVE servers
with it, and the coordinator uses it as a client of its shards. Workers each
hold their own pair; a worker is admitted while its public key file is in the
server's `--authorized-keys` directory. The directory is read again as it
changes, so adding a file admits a worker without a restart and removing one
cuts it off: libzmq checks keys only at the handshake, so every received
message's authenticated key (its `User-Id`) is checked against the live list.
Control messages (membership, checkpoints, stop) are accepted only from the
server's own key.
"""

from __future__ import annotations

import glob
import logging
import os
import threading
import time
from dataclasses import dataclass

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from .errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Keys:
    """A CURVE identity, and for a client the server's public key (all z85 bytes)."""

    public: bytes
    secret: bytes
    server_public: bytes = b""

    @property
    def user_id(self) -> str:
        return self.public.decode("ascii")


def keygen(directory: str, name: str) -> tuple[str, str]:
    """Write NAME.key (public, to share) and NAME.key_secret (keep private) into directory."""
    os.makedirs(directory, exist_ok=True)
    public, secret = zmq.auth.create_certificates(directory, name)
    os.chmod(secret, 0o600)
    return public, secret


def load_secret(path: str) -> tuple[bytes, bytes]:
    """(public, secret) from a *.key_secret file; ConfigError if it is not one."""
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read CURVE key {path}: {e}") from e
    if not secret:
        raise ConfigError(f"{path} holds no secret key: pass the *.key_secret file made by `ps-server keygen`")
    return public, secret


def load_public(path: str) -> bytes:
    try:
        public, _ = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read CURVE public key {path}: {e}") from e
    return public


def client_keys(secret_file: str, server_key_file: str) -> Keys | None:
    """A worker's or tool's keys; None when neither file is given (no encryption)."""
    if not secret_file and not server_key_file:
        return None
    if not (secret_file and server_key_file):
        raise ConfigError("CURVE needs both --curve-secret-key (yours) and --server-key (the server's public key)")
    public, secret = load_secret(secret_file)
    return Keys(public, secret, load_public(server_key_file))


class AllowList:
    """The public keys in a directory, re-read at most every `refresh` seconds."""

    def __init__(self, directory: str, always: tuple[bytes, ...] = (), refresh: float = 0.5):
        if not os.path.isdir(directory):
            raise ConfigError(f"--authorized-keys {directory}: no such directory")
        self.directory, self.always, self.refresh = directory, set(always), refresh
        self._keys: set[bytes] = set()
        self._read_at = -1.0
        self._lock = threading.Lock()  # the ZAP thread and the serving thread both ask

    def keys(self) -> set[bytes]:
        with self._lock:
            if time.monotonic() - self._read_at >= self.refresh:
                self._keys = self._read()
                self._read_at = time.monotonic()
            return self._keys | self.always

    def _read(self) -> set[bytes]:
        keys = set()
        for path in glob.glob(os.path.join(self.directory, "*.key")):
            try:
                public, _ = zmq.auth.load_certificate(path)
                keys.add(public)
            except (OSError, ValueError):
                log.warning("ignoring unreadable key file %s", path)
        return keys

    def allows(self, user_id: str | None) -> bool:
        return user_id is not None and user_id.encode("ascii") in self.keys()


class _Authenticator(ThreadAuthenticator):
    """Answers ZAP requests from the allow-list, logging refusals with the peer address."""

    def __init__(self, ctx: zmq.Context, allow: AllowList):
        super().__init__(ctx)
        self.allow, self._address = allow, ""
        self.allow_any = False
        self.credentials_providers = {"*": self}

    async def handle_zap_message(self, msg):
        if len(msg) >= 4:
            self._address = msg[3].decode("utf-8", "replace")
        await super().handle_zap_message(msg)

    def callback(self, domain: str, z85_key: bytes) -> bool:
        ok = z85_key in self.allow.keys()
        if not ok:
            log.warning("refused CURVE handshake from %s: key %s is not in %s",
                        self._address, z85_key.decode("ascii", "replace"), self.allow.directory)
        return ok


@dataclass
class ServerSecurity:
    """What a CURVE-protected server process needs: its keys and the allow-list."""

    keys: Keys
    allow: AllowList
    _auth: _Authenticator | None = None

    @classmethod
    def load(cls, secret_file: str, authorized_dir: str) -> ServerSecurity | None:
        if not secret_file and not authorized_dir:
            return None
        if not (secret_file and authorized_dir):
            raise ConfigError("CURVE needs both --curve-secret-key and --authorized-keys")
        public, secret = load_secret(secret_file)
        return cls(Keys(public, secret, public), AllowList(authorized_dir, always=(public,)))

    def start(self, ctx: zmq.Context) -> None:
        """Run the ZAP handler for `ctx` (one per process, stopped by `stop`)."""
        self._auth = _Authenticator(ctx, self.allow)
        self._auth.start()

    def stop(self) -> None:
        if self._auth is not None:
            self._auth.stop()
            self._auth = None

    def is_server(self, user_id: str | None) -> bool:
        return user_id == self.keys.user_id

    def __getstate__(self):  # spawned processes start their own authenticator
        return {"keys": self.keys, "allow": (self.allow.directory, tuple(self.allow.always))}

    def __setstate__(self, state):
        self.keys = state["keys"]
        self.allow = AllowList(*state["allow"])
        self._auth = None


def make_server(sock: zmq.Socket, keys: Keys) -> None:
    sock.curve_secretkey, sock.curve_publickey, sock.curve_server = keys.secret, keys.public, True


def make_client(sock: zmq.Socket, keys: Keys) -> None:
    sock.curve_secretkey, sock.curve_publickey = keys.secret, keys.public
    sock.curve_serverkey = keys.server_public


def user_id(frame) -> str | None:
    """The authenticated key of the peer that sent `frame` (None without CURVE)."""
    try:
        return frame.get("User-Id")
    except (zmq.ZMQError, AttributeError):
        return None


