"""Coverage-guided fuzzing of the host with atheris (libFuzzer): bytes through the framing, the
codec and the host core, on a real SQLite store with a signed-on terminal.

Run (the `fuzz` extra installs atheris; ``make fuzz`` does both, a million inputs):

    python tests/fuzz_atheris.py -runs=1000000 CORPUS_DIR [other libFuzzer flags]

The first byte of an input picks how the rest is read: its low two bits the framing (len2,
len4, len2-tpdu, or none: the rest is one message), bit 2 whether the harness MACs each
message under the terminal's session (its last eight bytes replaced), so that the routes
behind the MAC check are explored and not only its 63. Every answer is held to the oracle of
tests/fuzzkit.py (documented codes, echoes, MACs, no approval without a valid MAC); anything
that breaks it, and any exception but the framing's documented FramingError (the
connection's end), is a crash: libFuzzer stops and writes the input to crash-<sha1>.

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
    from tests import fuzzkit

FRAMINGS = ("len2", "len4", "len2-tpdu", None)
MAC_BIT = 4


def seeds(host: fuzzkit.FuzzHost) -> list[bytes]:
    """A valid request of every route, in each framing, MAC'd by the harness and not."""
    out = []
    for route, fields in host.valid_requests().items():
        unmacd = route in ("sign_on", "echo")  # PROTOCOL.md 4.2
        message = host.codec.encode(fields) if unmacd else host.macd(fields)
        for mode, framing in enumerate(FRAMINGS):
            data = message if framing is None else fuzzkit.framed(framing, message)
            out.extend((bytes([mode]) + data, bytes([mode | MAC_BIT]) + data))
    return out


def main() -> None:
    folder = tempfile.TemporaryDirectory(prefix="acqhost-fuzz-")
    host = fuzzkit.FuzzHost(Path(folder.name))
    corpus = [Path(a) for a in sys.argv[1:] if not a.startswith("-")]
    for directory in corpus[:1]:
        directory.mkdir(parents=True, exist_ok=True)
        if not any(directory.iterdir()):
            for n, seed in enumerate(seeds(host)):
                (directory / f"seed-{n:03d}").write_bytes(seed)

    def one_input(data: bytes) -> None:
        if not data:
            return
        mode, rest = data[0], data[1:]
        framing = FRAMINGS[mode & 3]
        transform = host.remac if mode & MAC_BIT else None
        if framing is None:
            host.run(transform(rest) if transform and len(rest) > 8 else rest)
        else:
            fuzzkit.through_framing(host, framing, rest, transform)

    atheris.Setup(sys.argv, one_input)
    try:
        atheris.Fuzz()
    finally:
        host.close()
        folder.cleanup()


if __name__ == "__main__":
    main()
