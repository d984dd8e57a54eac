"""Where the ctypes binding's request time goes: one process, a segment of
2 slots, worker 0 requesting from itself (the handler runs inline: no wake,
no second process, so what is left is the binding and the library).

    flock -x /tmp/cpu.lock python3 ffi/python/bench/ctypes_cost.py [--n 100000]

Prints the cost of each layer (median of 5 timings, ns per call) and the
functions a request runs (cProfile: calls per request):

- a ctypes call with no argument, one pointer, and ``shmc_request``'s
  seven (``argtypes`` converted);
- ``lib.shmc_request`` + ``_take_bytes`` (3 more C calls) called directly,
  against a handler that is a bare ctypes callback answering from C
  (``shmc_reply_send`` with fixed bytes): the C round trip plus ctypes,
  no binding code;
- the same with the binding's handler trampoline (``Message``, ``_answer``);
- ``Worker.request`` (the binding as users call it);
- the C ABI's own self request, from C (c_self_request.c, compiled with
  ``cc`` if there is one): the floor under all of them;
- ``await AsyncWorker.request`` to itself (the asyncio path with no wake:
  the loop, the polled driver's ctypes calls, the future);
- a ctypes callback invoked from C alone (libc ``qsort`` of 2 elements calls
  its comparator once; minus a 1-element ``qsort``, which calls none).
"""

from __future__ import annotations

import argparse
import cProfile
import ctypes
import io
import os
import pstats
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable, List

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import shmcluster  # noqa: E402
from shmcluster import Segment, _ASYNC, _take_bytes, load_library  # noqa: E402


def per_call(fn: Callable[[], object], n: int, repeat: int = 5) -> float:
    """Median over ``repeat`` timings of ``n`` calls: ns per call."""
    times: List[float] = []
    for _ in range(repeat):
        clock = time.perf_counter_ns
        t = clock()
        for _ in range(n):
            fn()
        times.append((clock() - t) / n)
    return statistics.median(times)


def c_self_request(n: int) -> "int | None":
    """ns per self request of c_self_request.c, or None without ``cc``."""
    cc = shutil.which("cc")
    lib = os.environ.get("SHMCLUSTER_LIB") or shmcluster._find_library()
    if cc is None or not os.path.isabs(lib):
        return None
    here = os.path.dirname(os.path.abspath(__file__))
    include = os.path.join(here, "..", "..", "include")
    with tempfile.TemporaryDirectory() as tmp:
        exe = os.path.join(tmp, "c_self_request")
        libdir = os.path.dirname(lib)
        subprocess.run([cc, "-O2", "-o", exe, os.path.join(here, "c_self_request.c"), f"-I{include}",
                        f"-L{libdir}", "-lshmcluster", f"-Wl,-rpath,{libdir}"], check=True)
        out = subprocess.run([exe, str(n)], capture_output=True, text=True, check=True, timeout=120)
    return int(out.stdout.strip())


def async_self_request(w: "shmcluster.Worker", payload: bytes, n: int) -> float:
    """ns per ``await aw.request`` of worker ``w`` to itself (median of 5)."""
    import asyncio

    from shmcluster.aio import AsyncWorker

    async def go() -> float:
        aw = AsyncWorker(w)
        aw.on("echo_async", lambda m: m.data)
        for _ in range(2000):
            await aw.request(w.slot, "echo_async", payload)
        times: List[float] = []
        for _ in range(5):
            t = time.perf_counter_ns()
            for _ in range(n):
                await aw.request(w.slot, "echo_async", payload)
            times.append((time.perf_counter_ns() - t) / n)
        aw.close()
        return statistics.median(times)

    return asyncio.run(go())


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--payload", type=int, default=32)
    opts = p.parse_args()
    n = opts.n
    lib = load_library()
    seg = Segment(2)
    w = seg.worker(0)
    payload = b"\x07" * opts.payload
    w.on("echo", lambda m: m.data)

    # A handler with no Python binding code: answers from the callback.
    answer = payload

    def bare(_u: object, _msg: object, reply: int) -> None:
        lib.shmc_reply_send(reply, answer, len(answer))

    bare_cb = _ASYNC(bare)
    hid = ctypes.c_uint64()
    assert lib.shmc_on_request(w._ptr, b"bare", bare_cb, None, ctypes.byref(hid)) == 0
    # A callback that does nothing at all (the request then fails at once
    # with "reply dropped"? no: we answer), to price the callback alone.
    ptr, slot = w._ptr, w.slot
    out = ctypes.c_void_p()
    ref = ctypes.byref(out)
    forever = shmcluster.WAIT_FOREVER

    def direct(event: bytes) -> Callable[[], object]:
        def go() -> object:
            code = lib.shmc_request(ptr, slot, event, payload, len(payload), forever, ref)
            assert code == 0
            return _take_bytes(out)
        return go

    rows = [
        ("ctypes call, no argument (shmc_abi_version)", lambda: lib.shmc_abi_version()),
        ("ctypes call, one pointer (shmc_should_stop)", lambda: lib.shmc_should_stop(ptr)),
        ("ctypes.c_void_p() + byref", lambda: ctypes.byref(ctypes.c_void_p())),
        ("event.encode() + _ms(timeout)", lambda: ("echo".encode(), shmcluster._ms(10.0))),
        ("shmc_request + _take_bytes, bare C-answering callback", direct(b"bare")),
        ("shmc_request + _take_bytes, the binding's trampoline", direct(b"echo")),
        ("Worker.request (the binding)", lambda: w.request(slot, "echo", payload)),
    ]
    # A ctypes callback from C: qsort of 2 ints calls the comparator once.
    libc = ctypes.CDLL(None)
    CMP = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)
    cmp = CMP(lambda a, b: 0)
    arr = (ctypes.c_int * 2)(1, 2)
    libc.qsort.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, CMP]
    libc.qsort.restype = None
    rows.insert(3, ("ctypes callback from C (qsort 2 minus qsort 1)", None))
    qsort2 = per_call(lambda: libc.qsort(arr, 2, 4, cmp), n)
    qsort1 = per_call(lambda: libc.qsort(arr, 1, 4, cmp), n)
    for _ in range(2000):  # warm up
        w.request(slot, "echo", payload)
    print(f"| layer | ns per call |\n|---|---:|")
    c_floor = c_self_request(n)
    if c_floor is not None:
        print(f"| C ABI self request from C (no Python) | {c_floor} |")
    for name, fn in rows:
        ns = qsort2 - qsort1 if fn is None else per_call(fn, n)
        print(f"| {name} | {ns:.0f} |")

    print(f"| await AsyncWorker.request to itself | {async_self_request(w, payload, n // 5):.0f} |")

    prof = cProfile.Profile()
    k = 20_000
    prof.enable()
    for _ in range(k):
        w.request(slot, "echo", payload)
    prof.disable()
    s = io.StringIO()
    stats = pstats.Stats(prof, stream=s)
    print(f"\ncProfile of {k} Worker.request (calls per request, own time; cProfile inflates it):\n")
    print("| function | calls/request | tottime µs/request |\n|---|---:|---:|")
    entries = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])  # type: ignore[attr-defined]
    for (file, line, fn), (cc, nc, tt, ct, _callers) in entries[:14]:
        where = fn if file == "~" else f"{os.path.basename(file)}:{fn}"
        print(f"| `{where}` | {nc / k:.0f} | {tt * 1e6 / k:.2f} |")
    w.close()
    seg.close()


if __name__ == "__main__":
    main()
