"""A worker of tests/test_cluster.py, run by a real ``shmcluster run -w 2``:
the leader calls (on_invoke, subscribe, on_leader_change) and the master's
events, as a Python worker sees them.

Both workers campaign, register ``add`` for invoke, watch leader changes
and subscribe to ``news``. The follower (the worker that is not leader)
drives: invoke, publish, then tells the leader to exit with code 7, waits
until it leads itself and has seen the leader's EXIT event, writes what it
saw to ``OUTDIR/result.json`` and asks the master to shut the cluster down.
The leader serves until told to stop. A respawned worker only serves.

Usage: cluster_worker.py OUTDIR
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from typing import Any, Callable, Dict, List

import shmcluster as sc


def wait_for(w: sc.Worker, cond: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    """Drives the worker (its handlers run here) until ``cond()``."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        w.poll(0.02)


def main() -> None:
    outdir = sys.argv[1]
    w = sc.Worker.from_env()
    ident = w.identity()
    respawned = os.path.exists(os.path.join(outdir, "died"))

    changes: List[sc.LeaderChange] = []
    news: List[bytes] = []
    w.on_leader_change(changes.append)

    @w.on_invoke("add")
    def add(msg: sc.Message) -> str:
        a, b = msg.data.split(b",")
        return str(int(a) + int(b) + 1000 * ident.slot)

    @w.on_invoke("boom")
    def boom(msg: sc.Message) -> bytes:
        raise ValueError("leader says no")

    @w.on("die")
    def die(msg: sc.Message) -> None:
        open(os.path.join(outdir, "died"), "w").close()
        os._exit(7)

    events = w.events()
    w.campaign()
    w.subscribe("news", lambda m: news.append(m.data), timeout=10)
    w.ready()
    wait_for(w, lambda: w.leader() is not None, "a leader")
    if respawned or w.is_leader():
        w.run()  # until the master tells it to stop
        return

    result: Dict[str, Any] = {"slot": ident.slot}
    w.wait_all_ready(10)
    leader = w.leader()
    assert leader is not None
    result["leader"] = leader.slot
    result["add"] = w.invoke("add", b"2,3").decode()
    try:
        w.invoke("boom", b"")
    except sc.HandlerFailed as e:
        result["boom"] = str(e)
    w.publish("news", b"hello", timeout=10)
    wait_for(w, lambda: b"hello" in news, "the published value")
    result["news"] = [n.decode() for n in news]

    w.emit(leader.slot, "die")
    exits: List[sc.Event] = []

    def leads_and_saw_the_exit() -> bool:
        e = events.next(timeout=0)
        while e is not None:
            if e.kind == "EXIT":
                exits.append(e)
            e = events.next(timeout=0)
        return w.is_leader() and any(c.is_me for c in changes) and bool(exits)

    wait_for(w, leads_and_saw_the_exit, "the leader's death")
    result["changes"] = [c._asdict() for c in changes]
    result["exits"] = [dataclasses.asdict(e) for e in exits]
    result["missed"] = events.missed
    result["invoke_after"] = w.invoke("add", b"1,1").decode()
    with open(os.path.join(outdir, "result.json.tmp"), "w") as f:
        json.dump(result, f)
    os.rename(os.path.join(outdir, "result.json.tmp"), os.path.join(outdir, "result.json"))
    w.request_shutdown()
    w.run()


if __name__ == "__main__":
    main()
