"""A worker of tests/test_cluster.py's binary-upgrade test, run by a real
``shmcluster run -w 1``: it reads the master's events on a thread while
the main thread serves, and writes each as a JSON line (kind, value, text)
to ``OUTDIR/events-<pid>.jsonl``; ``OUTDIR/ready-<pid>`` says it is ready.
It ends when the master tells it to stop (the drain after an upgrade, or
the shutdown).

Usage: upgrade_worker.py OUTDIR
"""

from __future__ import annotations

import json
import os
import sys
import threading

import shmcluster as sc


def main() -> None:
    outdir = sys.argv[1]
    w = sc.Worker.from_env()
    events = w.events()
    done = threading.Event()
    log = open(os.path.join(outdir, f"events-{os.getpid()}.jsonl"), "w")

    def read() -> None:
        while not done.is_set():
            e = events.next(timeout=0.05)
            if e is not None:
                log.write(json.dumps({"kind": e.kind, "value": e.value, "text": str(e)}) + "\n")
                log.flush()

    reader = threading.Thread(target=read)
    reader.start()
    w.ready()
    open(os.path.join(outdir, f"ready-{os.getpid()}"), "w").close()
    try:
        w.run()  # until the master tells it to stop
    finally:
        done.set()
        reader.join()
        # What was published before the stop is in the log by now.
        e = events.next(timeout=0)
        while e is not None:
            log.write(json.dumps({"kind": e.kind, "value": e.value, "text": str(e)}) + "\n")
            e = events.next(timeout=0)
        log.close()
        events.close()


if __name__ == "__main__":
    main()
