"""What a user would write by hand: asyncio streams + pyiso8583, each sale committed to SQLite
(WAL, synchronous FULL) before its 0210 is sent. No MAC, no pipeline: less work than acqhost
does, which only flatters this baseline. Run: ``python benchmarks/plain_host.py PORT DB``."""

from __future__ import annotations

import asyncio
import sqlite3
import sys

import iso8583

from acqhost.wire import specs

SPEC = specs.load("acq87")


async def main(port: int, path: str) -> None:
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("CREATE TABLE IF NOT EXISTS sales (rrn INTEGER PRIMARY KEY AUTOINCREMENT, "
               "tid TEXT, stan TEXT, local_date TEXT, amount INTEGER, "
               "UNIQUE (tid, stan, local_date))")  # fmt: skip

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                header = await reader.readexactly(2)
                data = await reader.readexactly(int.from_bytes(header, "big"))
                req, _ = iso8583.decode(data, SPEC)
                cur = db.execute("INSERT OR IGNORE INTO sales (tid, stan, local_date, amount) "
                                 "VALUES (?, ?, ?, ?)",
                                 (req["41"], req["11"], req["13"], int(req["4"])))  # fmt: skip
                rc = "00" if cur.rowcount == 1 else "94"
                resp = {k: req[k] for k in ("3", "4", "7", "11", "12", "13", "41", "42", "49")}
                resp.update({"t": "0210", "37": f"{cur.lastrowid or 0:012d}", "39": rc})
                out, _ = iso8583.encode(resp, SPEC)
                writer.write(len(out).to_bytes(2, "big") + bytes(out))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", port)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), sys.argv[2]))
