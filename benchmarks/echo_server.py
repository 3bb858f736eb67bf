"""The ceiling: a bare length-prefixed echo server on uvloop. Each 2-byte-length frame is sent
back as it came; no decoding, no work. Run: ``python benchmarks/echo_server.py PORT``."""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import uvloop


class Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: Any = transport
        self.buf = b""

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data
        pos, n, out = 0, len(buf), []
        while n - pos >= 2:
            end = pos + 2 + ((buf[pos] << 8) | buf[pos + 1])
            if end > n:
                break
            out.append(buf[pos:end])
            pos = end
        self.buf = buf[pos:]
        if out:
            self.transport.write(b"".join(out))


async def main(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Echo, "127.0.0.1", port)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    uvloop.run(main(int(sys.argv[1])))
