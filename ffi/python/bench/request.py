"""Issue 17's benchmark: the Python request round trip through the binding
beside the Rust messenger's and beside ``multiprocessing``'s, in one run.

    flock -x /tmp/cpu.lock python3 ffi/python/bench/request.py            # from the checkout
    python3 ffi/python/bench/request.py --rounds 5 --n 20000 --json
    python3 ffi/python/bench/request.py --pyo3 /tmp/v/bin/python    # + the PyO3 rows

Every row: two processes, one round trip in flight, a 32-byte payload
echoed back. The rows run alternately in rounds (a noisy host weighs on
every row alike); the table gives each row's median and range over the
rounds of its p50, its p99 and the CPU it cost per request (both
processes, user + system, from ``getrusage``), and the ratio of its median
p50 to the Rust request's. Then (``--json``) every run's JSON lines.

Children (each under ``shmcluster run -w 2`` but the ``multiprocessing``
ones):

- ``examples/request_rtt.rs``: ``rust_request`` (the default wait: spin,
  then park), ``rust_request_spin`` and ``rust_request_park`` (the caller's
  wait strategy; the server keeps the default), ``rust_self_request`` (a
  request to its own slot: no wake, no second process);
- ``_peer.py blocking-blocking``: ``py_request`` (``Worker.request`` while
  the other worker runs ``w.run()``) and ``py_self_request``;
- ``_peer.py async-async`` / ``async-blocking``: ``py_async_request``
  (``await aw.request(..)``) against an ``AsyncWorker`` / ``w.run()``;
- ``_peer.py pyo3-pyo3`` (with ``--pyo3 PYTHON``): ``pyo3_request`` and
  ``pyo3_self_request``, the rows of ``blocking-blocking`` through the PyO3
  prototype (ffi/pyo3-bench) instead of ctypes;
- ``_mp.py pipe`` / ``queue``: ``mp_pipe``, ``mp_queue``.

The Python binding has no wait-strategy setting (the library's default
everywhere), so only the Rust rows have spinning and parked variants.

It builds what it runs first (``cargo build --release``: the library, the
command, the example; ``--no-build`` skips that). Each child runs in its
own process group under a watchdog (``--limit`` seconds), killed whole if
it overstays, and is always reaped.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import threading
import time
from typing import Dict, List, Optional, Sequence, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", "..", ".."))


def target_dir() -> str:
    return os.environ.get("CARGO_TARGET_DIR") or os.path.join(ROOT, "target")


def build() -> None:
    for args in (["-p", "shmcluster", "--bin", "shmcluster", "--example", "request_rtt"],
                 ["-p", "shmcluster-ffi"]):
        cmd = ["cargo", "build", "--release", "--quiet", *args]
        print("$ " + " ".join(cmd), file=sys.stderr)
        subprocess.run(cmd, cwd=ROOT, check=True)


class ChildFailed(Exception):
    pass


def run_child(cmd: Sequence[str], env: Dict[str, str], limit: float, stop_on_done: bool) -> List[dict]:
    """Runs ``cmd`` in its own process group; returns its JSON lines. On
    ``DONE`` a ``shmcluster run`` master is sent SIGTERM (a clean shutdown);
    past ``limit`` seconds the whole group is killed. Always reaped."""
    child = subprocess.Popen(
        list(cmd), cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, start_new_session=True,
    )
    overran = threading.Event()

    def kill_group(sig: int) -> None:
        try:
            os.killpg(child.pid, sig)
        except ProcessLookupError:
            pass

    def watchdog() -> None:
        overran.set()
        kill_group(signal.SIGKILL)

    timer = threading.Timer(limit, watchdog)
    timer.start()
    err: List[str] = []
    drain = threading.Thread(target=lambda: err.extend(child.stderr), daemon=True)  # type: ignore[arg-type]
    drain.start()
    rows: List[dict] = []
    failed: Optional[str] = None
    try:
        assert child.stdout is not None
        for line in child.stdout:
            line = line.strip()
            if line.startswith("{"):
                rows.append(json.loads(line))
            elif line == "DONE" and stop_on_done:
                child.send_signal(signal.SIGTERM)
            elif line.startswith("FAILED"):
                failed = line
                child.send_signal(signal.SIGTERM)
        code = child.wait()
    finally:
        timer.cancel()
        if child.poll() is None:
            kill_group(signal.SIGKILL)
            child.wait()
        # Anything left in the group (a worker the master did not reap).
        kill_group(signal.SIGKILL)
        drain.join(5)
    name = os.path.basename(cmd[-1] if not cmd[-1].startswith("-") else " ".join(cmd))
    if overran.is_set():
        raise ChildFailed(f"{' '.join(cmd)} overran {limit} s\n{''.join(err[-20:])}")
    if failed or code != 0 or not rows:
        raise ChildFailed(f"{name}: exit {code}, {failed or 'no rows'}\n{''.join(err[-20:])}")
    return rows


def children(opts: argparse.Namespace) -> List[Tuple[List[str], bool]]:
    tgt = target_dir()
    master = [os.path.join(tgt, "release", "shmcluster"), "run", "-w", "2", "--"]
    sizes = ["--n", str(opts.n), "--warmup", str(opts.warmup), "--payload", str(opts.payload)]
    py = sys.executable
    out: List[Tuple[List[str], bool]] = [
        (master + [os.path.join(tgt, "release", "examples", "request_rtt")] + sizes, True),
    ]
    for mode in ("blocking-blocking", "async-async", "async-blocking"):
        out.append((master + [py, os.path.join(HERE, "_peer.py"), mode] + sizes, True))
    if opts.pyo3:
        out.append((master + [opts.pyo3, os.path.join(HERE, "_peer.py"), "pyo3-pyo3"] + sizes, True))
    for kind in ("pipe", "queue"):
        out.append(([py, os.path.join(HERE, "_mp.py"), kind] + sizes, False))
    return out


def med_range(xs: List[float], scale: float, digits: int) -> str:
    fmt = f"{{:.{digits}f}}"
    m = fmt.format(statistics.median(xs) / scale)
    if len(xs) == 1:
        return m
    return f"{m} ({fmt.format(min(xs) / scale)}–{fmt.format(max(xs) / scale)})"


ORDER = [
    "rust_request", "rust_request_spin", "rust_request_park", "rust_self_request",
    "py_request", "py_self_request", "py_async_request async-async", "py_async_request async-blocking",
    "pyo3_request", "pyo3_self_request", "mp_pipe", "mp_queue",
]

LABEL = {
    "rust_request": "Rust `request_bytes` (default wait)",
    "rust_request_spin": "Rust, caller spins",
    "rust_request_park": "Rust, caller parks",
    "rust_self_request": "Rust, request to itself",
    "py_request": "Python `Worker.request` ↔ `w.run()`",
    "py_self_request": "Python `Worker.request` to itself",
    "py_async_request async-async": "Python `await aw.request` ↔ AsyncWorker",
    "py_async_request async-blocking": "Python `await aw.request` ↔ `w.run()`",
    "pyo3_request": "PyO3 prototype `w.request` ↔ `w.run()`",
    "pyo3_self_request": "PyO3 prototype, request to itself",
    "mp_pipe": "multiprocessing `Pipe` (send_bytes)",
    "mp_queue": "multiprocessing `Queue` ×2",
}


def key(r: dict) -> str:
    return r["row"] + (" " + r["mode"] if r["row"] == "py_async_request" else "")


def table(all_rows: List[dict], rounds: int) -> str:
    by: Dict[str, List[dict]] = {}
    for r in all_rows:
        by.setdefault(key(r), []).append(r)
    base = statistics.median(r["p50_ns"] for r in by.get("rust_request", [{"p50_ns": 1}]))
    lines = [
        f"| row | p50 µs | p99 µs | CPU µs/request | p50 / Rust |",
        "|---|---:|---:|---:|---:|",
    ]
    for k in ORDER + sorted(set(by) - set(ORDER)):
        rs = by.get(k)
        if not rs:
            continue
        p50 = [r["p50_ns"] for r in rs]
        lines.append(
            f"| {LABEL.get(k, k)} | {med_range(p50, 1000, 2)} | {med_range([r['p99_ns'] for r in rs], 1000, 1)} "
            f"| {med_range([r['cpu_us_per_op'] for r in rs], 1, 2)} | {statistics.median(p50) / base:.1f}× |"
        )
    return "\n".join(lines) + f"\n\nmedian (min–max) over {rounds} round(s)"


def machine() -> str:
    model = platform.processor() or "?"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} vCPUs, Python {platform.python_version()}, {platform.release()}"


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--n", type=int, default=20_000, help="timed requests per row")
    p.add_argument("--warmup", type=int, default=1_000)
    p.add_argument("--payload", type=int, default=32, help="bytes")
    p.add_argument("--limit", type=float, default=120.0, help="seconds one child may take")
    p.add_argument("--no-build", action="store_true")
    p.add_argument("--json", action="store_true", help="also print every run's JSON lines")
    p.add_argument("--pyo3", metavar="PYTHON", help="also the PyO3 prototype's rows, run by this "
                   "interpreter (a venv with ffi/pyo3-bench installed)")
    opts = p.parse_args(argv)
    if opts.rounds < 1 or opts.n < 1:
        p.error("--rounds and --n must be >= 1")
    if not opts.no_build:
        build()
    if opts.pyo3:
        probe = subprocess.run([opts.pyo3, "-c", "import _fast"], capture_output=True, text=True)
        if probe.returncode != 0:
            p.error(f"{opts.pyo3} cannot import _fast: {probe.stderr.strip().splitlines()[-1:]}; "
                    "install it with `<venv>/bin/pip install ffi/pyo3-bench` (maturin)")
    env = dict(os.environ)
    env["SHMCLUSTER_LIB"] = os.path.join(target_dir(), "release", "libshmcluster.so")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.path.join(ROOT, "ffi", "python"), HERE, env.get("PYTHONPATH")]))
    print(f"machine: {machine()}", file=sys.stderr)
    all_rows: List[dict] = []
    started = time.monotonic()
    for r in range(opts.rounds):
        for cmd, via_master in children(opts):
            rows = run_child(cmd, env, opts.limit, via_master)
            for row in rows:
                row["round"] = r
            all_rows.extend(rows)
        print(f"round {r + 1}/{opts.rounds} done ({time.monotonic() - started:.0f} s)", file=sys.stderr)
    print(f"machine: {machine()}; {opts.n} requests per row after {opts.warmup} untimed, "
          f"{opts.payload}-byte payload\n")
    print(table(all_rows, opts.rounds))
    if opts.json:
        print()
        for row in all_rows:
            print(json.dumps(row))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ChildFailed as e:
        print(f"request.py: {e}", file=sys.stderr)
        sys.exit(1)
