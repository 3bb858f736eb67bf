"""The compiled ISO 8583 codec: ``compile_spec(spec) -> Codec``."""

from acqhost.errors import CodecError
from acqhost.wire.codec._codec import Codec, compile_spec

__all__ = ("Codec", "CodecError", "compile_spec")
