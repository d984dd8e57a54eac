"""One worker of the Python rows of request.py, run as both workers of
``shmcluster run -w 2 -- python3 _peer.py MODE [--n N] [--warmup N] [--payload B]``.

Instance 0 drives, instance 1 answers (``echo``: the payload back). MODE is
``driver-server``, each ``blocking`` or ``async``:

- ``blocking-blocking``: ``Worker.request`` while the other runs ``w.run()``;
- ``async-async``: ``await aw.request(..)`` against an :class:`AsyncWorker`;
- ``async-blocking``: ``await aw.request(..)`` against ``w.run()``;
- ``pyo3-pyo3``: the PyO3 prototype (``_fast``, ffi/pyo3-bench) both sides:
  ``w.request`` against ``w.run()``, as ``blocking-blocking``.

The driver prints one JSON line per row (``py_request``, and for a
blocking or PyO3 driver also ``py_self_request`` / ``pyo3_self_request``: a request to its own slot, the
binding's cost with no wake and no second process), then ``DONE``, and
serves until told to stop. CPU as examples/request_rtt.rs: both processes'
``resource.getrusage(RUSAGE_SELF)`` around the timed loop.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import struct
import sys
import time
from typing import Any, List, Tuple

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from shmcluster import Message, Worker  # noqa: E402
from shmcluster.aio import AsyncWorker  # noqa: E402


def cpu_us() -> Tuple[int, int]:
    """This process's CPU time (user, system) in microseconds."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return int(r.ru_utime * 1e6), int(r.ru_stime * 1e6)


def cpu_answer(_m: Message) -> bytes:
    return struct.pack("<QQ", *cpu_us())


def echo(m: Message) -> bytes:
    return m.data


def slot_answer(_m: Message, slot: int) -> bytes:
    return str(slot).encode()


def row(name: str, took: List[int], wall_ns: int, cpu: Tuple[int, int], mode: str) -> str:
    took.sort()
    n = len(took)
    user, sys_ = cpu
    return json.dumps({
        "row": name, "mode": mode, "n": n,
        "p50_ns": took[(n - 1) // 2], "p99_ns": took[int((n - 1) * 0.99)],
        "mean_ns": round(sum(took) / n),
        "cpu_us_per_op": round((user + sys_) / n, 3), "cpu_sys_us_per_op": round(sys_ / n, 3),
        "cpu_cores": round((user + sys_) * 1000 / wall_ns, 3),
    })


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def delta(before: Tuple[int, int], after: Tuple[int, int]) -> Tuple[int, int]:
    return after[0] - before[0], after[1] - before[1]


# blocking ---------------------------------------------------------------------
def blocking_main(mode: str, opts: argparse.Namespace) -> None:
    w = Worker.from_env()
    w.on("echo", echo)
    w.on("cpu", cpu_answer)
    w.on("slot", lambda m: slot_answer(m, w.slot))
    w.ready()
    if w.index != 0:
        w.run()
        return
    if not w.wait_all_ready(10.0):
        raise SystemExit("FAILED: the peer was not ready in 10 s")
    peer = next(s for s, _ in w.map("slot") if s != w.slot)
    payload = b"\x07" * opts.payload
    for name, to in (("py_request", peer), ("py_self_request", w.slot)):
        say(measure_blocking(w, name, to, peer, payload, opts, mode))
    say("DONE")
    w.run()


def measure_blocking(w: Any, name: str, to: int, peer: int, payload: bytes,
                     opts: argparse.Namespace, mode: str) -> str:
    request = w.request
    for _ in range(opts.warmup):
        request(to, "echo", payload)
    took: List[int] = []
    clock = time.perf_counter_ns
    peer_before = struct.unpack("<QQ", w.request(peer, "cpu", b""))
    me_before = cpu_us()
    wall = clock()
    for _ in range(opts.n):
        t = clock()
        back = request(to, "echo", payload)
        took.append(clock() - t)
        if len(back) != len(payload):
            raise SystemExit(f"FAILED: echo of {len(payload)} bytes came back with {len(back)}")
    wall_ns = clock() - wall
    me = delta(me_before, cpu_us())
    peer_cpu = delta(peer_before, struct.unpack("<QQ", w.request(peer, "cpu", b"")))
    return row(name, took, wall_ns, (me[0] + peer_cpu[0], me[1] + peer_cpu[1]), mode)


# PyO3 (the _fast prototype, ffi/pyo3-bench) ---------------------------------------
def fast_main(mode: str, opts: argparse.Namespace) -> None:
    import _fast  # built by maturin from ffi/pyo3-bench

    w = _fast.Worker.from_env()
    w.on("echo", lambda data, _sender: data)
    w.on("cpu", lambda _data, _sender: struct.pack("<QQ", *cpu_us()))
    w.ready()
    if w.index != 0:
        w.run()
        return
    peer = w.peer(10.0)
    payload = b"\x07" * opts.payload
    for name, to in (("pyo3_request", peer), ("pyo3_self_request", w.slot)):
        say(measure_blocking(w, name, to, peer, payload, opts, mode))
    say("DONE")
    w.run()


# asyncio ----------------------------------------------------------------------
async def async_main(mode: str, opts: argparse.Namespace) -> None:
    aw = AsyncWorker.from_env()
    aw.on("echo", echo)
    aw.on("cpu", cpu_answer)
    aw.on("slot", lambda m: slot_answer(m, aw.slot))
    aw.ready()
    if aw.index != 0:
        await aw.stopped(0.05)
        return
    if not aw.worker.wait_all_ready(10.0):
        raise SystemExit("FAILED: the peer was not ready in 10 s")
    peer = next(s for s, body in await aw.map("slot") if s != aw.slot)
    payload = b"\x07" * opts.payload
    request = aw.request
    for _ in range(opts.warmup):
        await request(peer, "echo", payload)
    took: List[int] = []
    clock = time.perf_counter_ns
    peer_before = struct.unpack("<QQ", await aw.request(peer, "cpu"))
    me_before = cpu_us()
    wall = clock()
    for _ in range(opts.n):
        t = clock()
        back = await request(peer, "echo", payload)
        took.append(clock() - t)
        if len(back) != len(payload):
            raise SystemExit(f"FAILED: echo of {len(payload)} bytes came back with {len(back)}")
    wall_ns = clock() - wall
    me = delta(me_before, cpu_us())
    peer_cpu = delta(peer_before, struct.unpack("<QQ", await aw.request(peer, "cpu")))
    say(row("py_async_request", took, wall_ns, (me[0] + peer_cpu[0], me[1] + peer_cpu[1]), mode))
    say("DONE")
    await aw.stopped(0.05)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["blocking-blocking", "async-async", "async-blocking", "pyo3-pyo3"])
    p.add_argument("--n", type=int, default=20_000)
    p.add_argument("--warmup", type=int, default=1_000)
    p.add_argument("--payload", type=int, default=32)
    opts = p.parse_args()
    driver_kind, server_kind = opts.mode.split("-")
    index = int(os.environ.get("SHMCLUSTER_INDEX", "-1"))
    # Which side this process is: the index is known only once attached,
    # so a process whose kind depends on it peeks at the environment the
    # master set (SHMCLUSTER_INDEX), falling back on the driver's kind.
    kind = server_kind if index == 1 else driver_kind
    if kind == "blocking":
        blocking_main(opts.mode, opts)
    elif kind == "pyo3":
        fast_main(opts.mode, opts)
    else:
        asyncio.run(async_main(opts.mode, opts))


if __name__ == "__main__":
    main()
