#!/usr/bin/env python3
"""A shaping TCP proxy for benchmarks: one link of RATE Mbit/s (shared by every connection, each
direction on its own) with RTT ms of round trip (half added each way), in front of one server.

    bench/shape.py --listen 127.0.0.1:0 --to 127.0.0.1:8080 --mbit 100 --rtt-ms 20

Prints "listening on HOST:PORT" once it accepts. Used where tc/netem is not available (the
sch_netem module is missing on the machines forkd is benchmarked on)."""

from __future__ import annotations

import argparse
import asyncio
import collections
import time


class Link:
    """One direction of the link: a byte clock (when the wire is next free) and a delay."""

    def __init__(self, bytes_per_s: float, delay_s: float) -> None:
        self.rate = bytes_per_s
        self.delay = delay_s
        self.free_at = 0.0
        self.sent = 0

    def schedule(self, n: int) -> float:
        """When n bytes that arrive now have crossed the link (serialised, then propagated)."""
        now = time.monotonic()
        start = max(now, self.free_at)
        self.free_at = start + n / self.rate
        self.sent += n
        return self.free_at + self.delay


async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, link: Link) -> None:
    queue: collections.deque[tuple[float, bytes]] = collections.deque()
    ready = asyncio.Event()
    done = False

    async def deliver() -> None:
        while True:
            while not queue:
                if done:
                    return
                ready.clear()
                await ready.wait()
            due, data = queue.popleft()
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            writer.write(data)
            await writer.drain()

    sender = asyncio.create_task(deliver())
    try:
        while True:
            # Small reads: the link clock, not the socket buffer, decides when bytes move.
            data = await reader.read(16 << 10)
            if not data:
                break
            queue.append((link.schedule(len(data)), data))
            ready.set()
            # Back-pressure: do not read far ahead of what the link has delivered.
            while len(queue) > 64:
                await asyncio.sleep(0.002)
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        done = True
        ready.set()
        try:
            await sender
        except ConnectionError:
            pass
        try:
            writer.write_eof()
        except (OSError, RuntimeError):
            pass


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--listen", default="127.0.0.1:0")
    ap.add_argument("--to", required=True)
    ap.add_argument("--mbit", type=float, default=100.0)
    ap.add_argument("--rtt-ms", type=float, default=20.0)
    a = ap.parse_args()
    rate = a.mbit * 1e6 / 8
    down = Link(rate, a.rtt_ms / 2000)
    up = Link(rate, a.rtt_ms / 2000)
    to_host, to_port = a.to.rsplit(":", 1)

    async def handle(cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        try:
            sr, sw = await asyncio.open_connection(to_host, int(to_port))
        except OSError:
            cw.close()
            return
        await asyncio.gather(pump(cr, sw, up), pump(sr, cw, down))
        for w in (cw, sw):
            w.close()

    host, port = a.listen.rsplit(":", 1)
    server = await asyncio.start_server(handle, host, int(port))
    addr = server.sockets[0].getsockname()
    print(f"listening on {addr[0]}:{addr[1]}", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
