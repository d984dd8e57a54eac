"""A worker that speaks systemd's notify protocol and nothing of shmcluster.

Run by tests/systemd_notify.rs as `shmcluster run -- python3 notify_worker.py MODE`.
Files in $NOTIFY_TEST_DIR steer it and tell the test what it did:

- writes `env-<index>`: its pid and NOTIFY_SOCKET / WATCHDOG_USEC / WATCHDOG_PID;
- waits for `go` before it sends READY=1;
- MODE `beat`: then sends WATCHDOG=1 every 100 ms; STOPPING=1 once `stopping`
  exists (and keeps beating); STOPPING=1 again at SIGTERM, then exits 0;
- MODE `silent`: READY=1 and never a heartbeat;
- MODE `impostor`: before anything, a child process sends READY=1 and
  WATCHDOG=1 to the worker's socket (the master must ignore it), then
  `impostor-done` is written; then as `beat`;
- MODE `env`: only writes `env-<index>` and sleeps until SIGTERM.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

DIR = Path(os.environ["NOTIFY_TEST_DIR"])
INDEX = os.environ.get("SHMCLUSTER_INDEX", "x")
stop = False

# Run in a child process: five READY=1 + WATCHDOG=1 datagrams to the
# worker's NOTIFY_SOCKET from a pid that is not the worker's.
IMPOSTOR = """
import os, socket
addr = os.environ["NOTIFY_SOCKET"]
addr = "\\0" + addr[1:] if addr.startswith("@") else addr
with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
    s.connect(addr)
    for _ in range(5):
        s.sendall(b"READY=1\\nWATCHDOG=1")
"""


def on_term(_signum: int, _frame: object) -> None:
    global stop
    stop = True


def notify(message: str) -> None:
    """sd_notify(3): one datagram to $NOTIFY_SOCKET ('@' is the abstract namespace)."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.connect(addr)
        s.sendall(message.encode())


def write_env() -> None:
    keys = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
    lines = [f"pid={os.getpid()}"] + [f"{k}={os.environ.get(k, '')}" for k in keys]
    tmp = DIR / f".env-{INDEX}"
    tmp.write_text("\n".join(lines) + "\n")
    tmp.rename(DIR / f"env-{INDEX}")


def wait_for(name: str) -> None:
    while not (DIR / name).exists() and not stop:
        time.sleep(0.02)


def main() -> int:
    signal.signal(signal.SIGTERM, on_term)
    mode = sys.argv[1]
    write_env()
    if mode == "env":
        while not stop:
            time.sleep(0.05)
        return 0
    if mode == "impostor":
        # Another process (a child of the worker) with the worker's socket.
        subprocess.run([sys.executable, "-c", IMPOSTOR], check=True)
        (DIR / "impostor-done").write_text("")
    wait_for("go")
    notify("READY=1\nSTATUS=serving")
    said_stopping = False
    while not stop:
        if mode != "silent":
            notify("WATCHDOG=1")
        if not said_stopping and (DIR / "stopping").exists():
            notify("STOPPING=1")
            said_stopping = True
        time.sleep(0.1)
    notify("STOPPING=1")
    return 0


if __name__ == "__main__":
    sys.exit(main())

