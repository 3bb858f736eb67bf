"""The wire: framing, field 48 TLV, spec loading and the compiled codec. Pure: no I/O."""
