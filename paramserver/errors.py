"""One exception tree for the whole system.

    PSError
    ├── ConfigError          bad option or task; raised before anything starts
    ├── ProtocolError        a message that does not follow docs/protocol.md
    ├── RemoteError          the peer answered with an error reply
    │   └── (code, message) carry the remote type; see protocol.ErrorCode
    ├── DeadlineExceeded     a wait ran past its deadline (every wait has one)
    ├── Interrupted          a wait given up early because the caller's state changed
    └── ServerUnavailable    no answer from the server within the reconnect deadline

Lower-level errors (zmq, msgspec) are translated at the transport boundary.
"""


class PSError(Exception):
    """Base of every error paramserver raises on purpose."""


class ConfigError(PSError):
    """An option, task or environment variable is wrong; the message says how to fix it."""


class ProtocolError(PSError):
    """A message broke the wire contract; `code` is the protocol.ErrorCode to reply with."""

    def __init__(self, message: str, code: str = "bad_message"):
        super().__init__(message)
        self.code = code


class RemoteError(PSError):
    """The peer answered with an error reply; re-raised here with its code and message."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class DeadlineExceeded(PSError, TimeoutError):
    """A request or wait did not finish before its deadline."""


class Interrupted(PSError):
    """A wait was abandoned early: the run ended, or the worker must rejoin."""


class ServerUnavailable(PSError):
    """The coordinator or a shard did not answer within the reconnect deadline."""
