"""TCP probes for the harness's self-check: a server, a ping-pong client and a bulk-download client.

    python scripts/wan/probe.py serve --bind ADDR --port PORT          # prints "ready"
    python scripts/wan/probe.py ping --to ADDR --port PORT --count 50  # JSON: round-trip times in ms
    python scripts/wan/probe.py bulk --to ADDR --port PORT --seconds 10 --warmup 2  # JSON: goodput

The bulk rate is measured where the bytes arrive, after ``--warmup`` seconds, so that TCP slow start and
the sender's socket buffer do not count. The probes ask for SCHED_FIFO (below the delay line) when they
may: they measure the links, and on loaded shared cores a wake-up can otherwise take tens of milliseconds.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import struct
import sys
import threading
import time

PING_SIZE = 32
CHUNK = 256 * 1024
RT_PRIORITY = 5  # below delay.py's: the delay line must never wait for a probe


def serve(bind: str, port: int) -> None:
    listener = socket.create_server((bind, port))
    print("ready", flush=True)
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=_handle, args=(conn,), daemon=True).start()


def _handle(conn: socket.socket) -> None:
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    with conn:
        mode = _recv_exact(conn, 1)
        if mode == b"p":
            while message := _recv_exact(conn, PING_SIZE):
                conn.sendall(message)
        elif mode == b"b":
            (seconds,) = struct.unpack("!d", _recv_exact(conn, 8))
            _send_for(conn, seconds)


def _send_for(conn: socket.socket, seconds: float) -> None:
    payload, end = bytes(CHUNK), time.monotonic() + seconds
    try:
        while time.monotonic() < end:
            conn.sendall(payload)
    except OSError:
        pass  # the client hung up: it has its measurement


def _recv_exact(conn: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            return b""
        data += chunk
    return data


def ping(to: str, port: int, count: int) -> dict:
    with socket.create_connection((to, port), timeout=30) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(b"p")
        rtts = []
        for _ in range(count):
            start = time.perf_counter()
            s.sendall(bytes(PING_SIZE))
            if not _recv_exact(s, PING_SIZE):
                raise ConnectionError("the probe server closed the connection")
            rtts.append((time.perf_counter() - start) * 1000)
    return {"rtt_ms": rtts}


def bulk(to: str, port: int, seconds: float, warmup: float) -> dict:
    with socket.create_connection((to, port), timeout=30) as s:
        s.sendall(b"b" + struct.pack("!d", seconds + warmup))
        start = time.monotonic()
        counted, first, last = 0, None, None
        while chunk := s.recv(CHUNK):
            now = time.monotonic()
            if now - start >= warmup:
                if first is None:
                    first = now
                else:
                    counted += len(chunk)
                last = now
    if first is None or last <= first:
        raise ConnectionError("no data arrived after the warm-up")
    return {"bytes": counted, "seconds": last - first, "mbit": counted * 8 / (last - first) / 1e6}


def realtime() -> None:
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(RT_PRIORITY))
    except (OSError, AttributeError):
        pass  # not permitted: the figures then include the scheduler's delays


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--bind", required=True)
    for name in ("ping", "bulk"):
        c = sub.add_parser(name)
        c.add_argument("--to", required=True)
    for c in sub.choices.values():
        c.add_argument("--port", type=int, required=True)
    sub.choices["ping"].add_argument("--count", type=int, default=50)
    sub.choices["bulk"].add_argument("--seconds", type=float, default=10.0)
    sub.choices["bulk"].add_argument("--warmup", type=float, default=2.0)
    args = p.parse_args()
    realtime()
    try:
        if args.cmd == "serve":
            serve(args.bind, args.port)
        elif args.cmd == "ping":
            print(json.dumps(ping(args.to, args.port, args.count)))
        else:
            print(json.dumps(bulk(args.to, args.port, args.seconds, args.warmup)))
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
