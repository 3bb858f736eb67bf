"""The load generator: it never sends a sale twice to a host, and says when it ran out."""

from __future__ import annotations

import asyncio
from typing import Any

from acqhost.wire.framing import FrameEncoder
from simulators.loadtest import drive


class _Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: Any = transport

    def data_received(self, data: bytes) -> None:  # whole frames come back as they went
        self.transport.write(data)


def _run(repeat: bool) -> dict[str, Any]:
    frames = [FrameEncoder("len2").encode(b"frame %d" % i) for i in range(3)]

    async def main() -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(_Echo, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            return await drive(port, frames, 1, 2, None, 0.3, repeat=repeat)

    return asyncio.run(main())


def test_running_out_of_distinct_frames_is_reported_not_hidden() -> None:
    result = _run(repeat=False)
    assert result["exhausted"] is True and result["answered"] == 3


def test_an_echo_target_gets_the_frames_again() -> None:
    result = _run(repeat=True)
    assert result["exhausted"] is False and result["answered"] > 3
