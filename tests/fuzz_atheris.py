"""Coverage-guided fuzzing of the host with atheris (libFuzzer): bytes through a connection's
core (framing), the dispatcher, the codec and the host core, on a real SQLite store with a
signed-on terminal.

Run (the `fuzz` extra installs atheris; ``make fuzz`` does both, a million inputs):

    python tests/fuzz_atheris.py -runs=1000000 CORPUS_DIR [other libFuzzer flags]

The first byte of an input picks how the rest is read: its low two bits the framing (len2,
len4, len2-tpdu, or none: the rest is one message), bit 2 whether the harness MACs each
message under the terminal's session (its last eight bytes replaced), so that the routes
behind the MAC check are explored and not only its 63; bit 3 whether it seals the password
(48 PW) of a rebind submit under the session, so that the checks behind it are explored
too. Every answer is held to the oracle of tests/fuzzkit.py (documented codes, echoes, MACs,
no approval without a valid MAC); anything that breaks it, and any exception but the
framing's documented FramingError (the connection's end), is a crash: libFuzzer stops and
writes the input to crash-<sha1> (``make fuzz``: fuzz-crash-<sha1>).

An empty CORPUS_DIR is seeded with a valid request of every route in every mode. Not
collected by pytest (its name does not start with test_).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import atheris

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

with atheris.instrument_imports(include=["acqhost", "simulators", "tests"]):
    from acqhost.wire.tlv import decode_tlv, encode_tlv
    from tests import fuzzkit

FRAMINGS = ("len2", "len4", "len2-tpdu", None)
MAC_BIT = 4
PW_BIT = 8


def seeds(host: fuzzkit.FuzzHost) -> list[bytes]:
    """A valid request of every route, in each framing, MAC'd by the harness and not."""
    out = []
    for route, fields in host.valid_requests().items():
        unmacd = route in ("sign_on", "echo")  # PROTOCOL.md 4.2
        message = host.codec.encode(fields) if unmacd else host.macd(fields)
        # For PW_BIT: the password in clear, for the harness to seal.
        clear = {**fields, "48": encode_tlv({**decode_tlv(fields.get("48", "")), "PW": "0000"})}
        clear_message = host.macd(clear) if route == "rebind_submit" else message
        for mode, framing in enumerate(FRAMINGS):
            for bits, m in ((0, message), (MAC_BIT, message), (MAC_BIT | PW_BIT, clear_message)):
                data = m if framing is None else fuzzkit.framed(framing, m)
                out.append(bytes([mode | bits]) + data)
    return out


def main() -> None:
    folder = tempfile.TemporaryDirectory(prefix="acqhost-fuzz-")
    host = fuzzkit.FuzzHost(Path(folder.name))
    # The codec's decoders are compiled from the spec at start-up (exec), out of reach of the
    # import hook: every function loaded by now is instrumented, those included.
    atheris.instrument_all()
    corpus = [Path(a) for a in sys.argv[1:] if not a.startswith("-")]
    for directory in corpus[:1]:
        if directory.is_file():  # an input to run again (a crash), not a corpus
            break
        directory.mkdir(parents=True, exist_ok=True)
        if not any(directory.iterdir()):
            for n, seed in enumerate(seeds(host)):
                (directory / f"seed-{n:03d}").write_bytes(seed)

    def sealed_and_macd(message: bytes) -> bytes:
        return host.remac(host.seal_password(message))

    TRANSFORMS = {0: None, MAC_BIT: host.remac, PW_BIT: host.seal_password,
                  MAC_BIT | PW_BIT: sealed_and_macd}  # fmt: skip

    def one_input(data: bytes) -> None:
        if not data:
            return
        mode, rest = data[0], data[1:]
        framing = FRAMINGS[mode & 3]
        transform = TRANSFORMS[mode & (MAC_BIT | PW_BIT)]
        if framing is None:
            host.run(transform(rest) if transform and len(rest) > 8 else rest)
        else:
            host.connection(framing, rest, transform)

    atheris.Setup(sys.argv, one_input)
    try:
        atheris.Fuzz()
    finally:
        host.close()
        folder.cleanup()


if __name__ == "__main__":
    main()
