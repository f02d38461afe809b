"""Gradient codecs: how a float32 chunk of a push travels, chosen by name.

    name               on the wire, per chunk of n floats           error feedback
    none               float32[n], zero-copy                        -
    fp16, bf16         float16 / bfloat16[n]                        -
    topk:RATIO[:noef]  ceil(RATIO*n) (index, bf16 value) pairs      yes (:noef: off)
    sign[:noef]        1 bit per entry + params {scale}             yes (:noef: off)
    qsgd:BITS          BITS bits per entry + params {norm}          - (unbiased)
    pkg.module:Class[:arg...]   a user codec: a subclass of `Codec`

(`topk` alone means topk:0.01, `qsgd` alone qsgd:4.) Each module's docstring
gives its exact frame layout and error bound.

One interface (`base.Codec`), one small module per codec:

    encode(key, chunk) -> Encoded(dtype, shape, params, buffer)   on the worker
    decode(meta, buffer, numel) -> float32 ndarray of shape (numel,) on the shard

`encode` reads a chunk (a view of the worker's flat gradient) and may keep
state by chunk key: error feedback lives there, in the one codec instance of
each worker's ShardClient. `decode` keeps no state and validates everything it
reads; the shard then checks finiteness. Every chunk is one frame, as the
protocol requires, and its TensorMeta carries the codec's full name, so the
shard rebuilds the codec, parameters included, from the wire with `for_wire`.

To add a codec: a class with `encode`/`decode` in a module here, registered in
CODECS; or, with no change here, `--codec package.module:Class` where the
class subclasses `Codec` and is importable on both workers and shards.

A codec name off the wire may name a module for the shard to import (only
dotted identifiers, and only a `Codec` subclass is ever instantiated); on a
network that is not trusted, CURVE authentication keeps unknown peers out.
"""

from __future__ import annotations

import importlib
import re

from ..errors import ConfigError, ProtocolError
from ..protocol import ErrorCode
from . import delta
from .base import Codec, Encoded, ErrorFeedback, bad, expect, param
from .bf16 import Bf16Codec
from .fp16 import Fp16Codec
from .none import NoneCodec
from .qsgd import QsgdCodec
from .sign import SignCodec
from .topk import TopKCodec

# a user codec needs only these: subclass Codec, return Encoded, check frames with expect/param/bad
__all__ = ["CODECS", "HELP", "Codec", "Encoded", "ErrorFeedback", "bad", "delta", "expect", "for_wire", "get", "param"]

CODECS: dict[str, type[Codec]] = {
    c.name: c for c in (NoneCodec, Fp16Codec, Bf16Codec, TopKCodec, SignCodec, QsgdCodec)
}
HELP = "none | fp16 | bf16 | topk:RATIO[:noef] | sign[:noef] | qsgd:BITS | package.module:Class"
MAX_NAME = 256  # protocol.TensorMeta.codec
_DOTTED = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


def get(name: str) -> Codec:
    """A fresh codec for a worker (its error-feedback state is its own); ConfigError if unknown."""
    name = name.strip()
    if len(name) > MAX_NAME:
        raise ConfigError(f"codec name longer than {MAX_NAME} characters")
    head, *args = name.split(":")
    if head in CODECS:
        cls = CODECS[head]
    elif args:
        cls, args = _user_class(head, args[0]), args[1:]
    else:
        raise ConfigError(f"unknown codec {name!r}: use {HELP}")
    try:
        codec = cls(*args)
    except (TypeError, ValueError) as e:  # wrong number or kind of options
        raise ConfigError(f"codec {name!r}: wrong options ({e}): use {HELP}") from None
    codec.name = name
    return codec


def for_wire(name: str) -> Codec:
    """The codec a received TensorMeta names; anything wrong is a protocol error, never a crash.

    Decoding keeps no state, so one instance per name serves every message (a
    name is parsed once, not once per chunk of every message).
    """
    codec = _DECODERS.get(name)
    if codec is not None:
        return codec
    try:
        codec = get(name)
    except ConfigError as e:
        raise ProtocolError(str(e), ErrorCode.BAD_TENSOR) from None
    if len(_DECODERS) < MAX_DECODERS:  # names come off the wire: the table stays bounded
        _DECODERS[name] = codec
    return codec


MAX_DECODERS = 256
_DECODERS: dict[str, Codec] = {}


def _user_class(module: str, attr: str) -> type[Codec]:
    # a name off the wire picks what is imported: only dotted names, and only a
    # Codec subclass is ever instantiated (never an arbitrary callable)
    if not (_DOTTED.fullmatch(module) and attr.isidentifier()):
        raise ConfigError(f"unknown codec {module}:{attr!r}: use {HELP}")
    try:
        cls = getattr(importlib.import_module(module), attr)
    except Exception as e:  # a user module may fail in any way while importing
        raise ConfigError(f"cannot load codec {module}:{attr}: {type(e).__name__}: {e}") from None
    if not (isinstance(cls, type) and issubclass(cls, Codec)):
        raise ConfigError(f"{module}:{attr} is not a paramserver.codecs.Codec subclass")
    return cls
