"""A worker of tests/metrics.rs, spawned by `shmcluster run --metrics ...
-- python3 tests/metrics/worker.py` (PYTHONPATH=ffi/python,
SHMCLUSTER_LIB=libshmcluster.so).

Every worker answers `ping` with b"pong". Instance 0 of two or more, once every instance
is ready, enters the critical section of the lock `metrics-test` three
times and requests `ping` of slot 1 once (5 bytes out, 4 back), so that
the metrics show the lock's acquisitions and the messages; then it serves
until told to stop, as the others do from the start.
"""

import sys

import shmcluster as sc


def main() -> int:
    w = sc.Worker.from_env()

    @w.on("ping")
    def ping(msg: sc.Message) -> bytes:
        return b"pong"

    w.ready()
    me = w.identity()
    if me.index == 0 and me.instances >= 2:
        if not w.wait_all_ready(timeout=30):
            print("metrics worker: the others were not ready in 30 s", file=sys.stderr)
            return 1
        for _ in range(3):
            with w.synchronize("metrics-test"):
                pass
        answer = w.request(1, "ping", b"hello", timeout=10)
        if answer != b"pong":
            print(f"metrics worker: ping answered {answer!r}", file=sys.stderr)
            return 1
    while not w.should_stop():
        w.poll(0.05)
    w.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
