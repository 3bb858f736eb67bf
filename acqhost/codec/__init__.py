"""The compiled ISO 8583 codec: ``compile_spec(spec) -> Codec``."""

from acqhost.codec._codec import Codec, compile_spec
from acqhost.errors import CodecError

__all__ = ("Codec", "CodecError", "compile_spec")
