"""acqhost: an ISO 8583 acquirer host."""

from acqhost.errors import AcqHostError, CodecError, Decline, FramingError, TLVError

__version__ = "0.1.0"

__all__ = ("AcqHostError", "CodecError", "Decline", "FramingError", "TLVError", "__version__")
