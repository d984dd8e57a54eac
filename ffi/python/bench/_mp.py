"""The ``multiprocessing`` rows of request.py: a child echoing, one round
trip in flight, the same small payload as the shmcluster rows.

    python3 _mp.py pipe|queue [--n N] [--warmup N] [--payload B]

``pipe``: ``Pipe()`` with ``send_bytes`` / ``recv_bytes`` (no pickling);
``queue``: two ``Queue``\\ s, ``put`` / ``get`` of ``bytes`` (pickled, fed by
the queue's thread). Prints one JSON line as _peer.py (CPU: this process's
and the child's ``getrusage`` around the timed loop; the child reports its
own at the end), and reaps the child.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import sys
import time
from typing import Any, List, Tuple

from _peer import cpu_us, delta, row, say


def pipe_child(conn: Any) -> None:
    while True:
        b = conn.recv_bytes()
        if b == b"cpu":
            conn.send(cpu_us())
        elif b == b"stop":
            return
        else:
            conn.send_bytes(b)


def queue_child(inq: Any, outq: Any) -> None:
    while True:
        b = inq.get()
        if b == b"cpu":
            outq.put(cpu_us())
        elif b == b"stop":
            return
        else:
            outq.put(b)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("kind", choices=["pipe", "queue"])
    p.add_argument("--n", type=int, default=20_000)
    p.add_argument("--warmup", type=int, default=1_000)
    p.add_argument("--payload", type=int, default=32)
    opts = p.parse_args()
    payload = b"\x07" * opts.payload
    ctx = mp.get_context("fork")
    if opts.kind == "pipe":
        mine, theirs = ctx.Pipe()
        child = ctx.Process(target=pipe_child, args=(theirs,), daemon=True)

        def rtt(b: bytes) -> Any:
            mine.send_bytes(b)
            return mine.recv_bytes()

        def ask_cpu() -> Tuple[int, int]:
            mine.send_bytes(b"cpu")
            return mine.recv()

        def stop() -> None:
            mine.send_bytes(b"stop")
    else:
        inq, outq = ctx.Queue(), ctx.Queue()
        child = ctx.Process(target=queue_child, args=(inq, outq), daemon=True)

        def rtt(b: bytes) -> Any:
            inq.put(b)
            return outq.get()

        def ask_cpu() -> Tuple[int, int]:
            inq.put(b"cpu")
            return outq.get()

        def stop() -> None:
            inq.put(b"stop")
    child.start()
    try:
        for _ in range(opts.warmup):
            rtt(payload)
        took: List[int] = []
        clock = time.perf_counter_ns
        child_before = ask_cpu()
        me_before = cpu_us()
        wall = clock()
        for _ in range(opts.n):
            t = clock()
            back = rtt(payload)
            took.append(clock() - t)
            if len(back) != len(payload):
                raise SystemExit(f"FAILED: echo of {len(payload)} bytes came back with {len(back)}")
        wall_ns = clock() - wall
        me = delta(me_before, cpu_us())
        theirs_cpu = delta(child_before, ask_cpu())
        say(row(f"mp_{opts.kind}", took, wall_ns, (me[0] + theirs_cpu[0], me[1] + theirs_cpu[1]), opts.kind))
        stop()
        child.join(10)
    finally:
        if child.is_alive():
            child.kill()
        child.join()
    say("DONE")


if __name__ == "__main__":
    sys.exit(main())
