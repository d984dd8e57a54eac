"""A worker of tests/test_aio_leader.py, run by a real ``shmcluster run -w 3``:
the asyncio leader calls across processes.

Every worker registers ``who``/``pid``/``slow`` for invoke (so all
campaign), subscribes to ``cfg``, watches leader changes and counts ``ev``
events. The first worker that is not the leader drives (it takes
``OUTDIR/driver``): invoke, publish, a late subscribe (the last value),
emit and broadcast (each worker answers ``events`` with what it got),
then SIGKILLs the leader in the middle of a slow non-idempotent invoke
(``LeaderDied``) while an idempotent one is also in flight (it goes to the
next leader), invokes the next leader, writes ``OUTDIR/result.json`` and
asks the master to stop. The others (and a respawned worker) serve.

Usage: aio_cluster_worker.py OUTDIR
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from typing import Any, Callable, Dict, List

import shmcluster as sc
from shmcluster.aio import AsyncWorker


async def wait_for(cond: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def main() -> None:
    outdir = sys.argv[1]
    aw = AsyncWorker.from_env()
    changes: List[sc.LeaderChange] = []
    cfg: List[bytes] = []
    late: List[bytes] = []
    got: List[bytes] = []

    aw.on_leader_change(changes.append)
    aw.on_invoke("who", lambda m: str(aw.slot))
    aw.on_invoke("pid", lambda m: str(os.getpid()))

    @aw.on_invoke("slow")
    async def slow(m: sc.Message) -> str:
        await asyncio.sleep(3)
        return str(aw.slot)

    aw.on("ev", lambda m: got.append(m.data))
    aw.on("events", lambda m: json.dumps(sorted(g.decode() for g in got)))

    async def on_cfg(m: sc.Message) -> None:
        await asyncio.sleep(0)
        cfg.append(m.data)

    await aw.subscribe("cfg", on_cfg)
    aw.ready()
    await wait_for(lambda: aw.leader() is not None, "a leader")
    aw.worker.wait_all_ready(10)
    leader = aw.leader()
    assert leader is not None
    if aw.is_leader() or aw.slot != min(s for s in range(3) if s != leader.slot):
        await aw.stopped()
        aw.close()
        return
    try:
        os.close(os.open(os.path.join(outdir, "driver"), os.O_CREAT | os.O_EXCL))
    except FileExistsError:  # a respawned worker: the scenario ran
        await aw.stopped()
        aw.close()
        return

    r: Dict[str, Any] = {"slot": aw.slot, "leader": leader.slot, "term": leader.term}
    r["who"] = (await aw.invoke("who")).decode()
    await aw.publish("cfg", b"v1")
    await wait_for(lambda: b"v1" in cfg, "the published value")
    await aw.publish("late", b"last")
    told = await aw.subscribe("late", lambda m: late.append(m.data))
    await wait_for(lambda: b"last" in late, "the last value of a topic")
    r["cfg"], r["late"], r["told"] = [c.decode() for c in cfg], [v.decode() for v in late], told

    other = next(s for s in range(3) if s not in (aw.slot, leader.slot))
    r["emit"] = aw.emit(other, "ev", b"to-one")
    r["broadcast"] = aw.broadcast("ev", b"to-all")
    await asyncio.sleep(0.2)
    r["events"] = {s: json.loads(await aw.request(s, "events")) for s in range(3)}

    pid = int(await aw.invoke("pid"))
    doomed = asyncio.ensure_future(aw.invoke("slow", timeout=20))
    retried = asyncio.ensure_future(aw.invoke("slow", timeout=20, idempotent=True))
    await asyncio.sleep(0.5)
    os.kill(pid, signal.SIGKILL)
    try:
        await doomed
        r["doomed"] = "answered"
    except sc.LeaderDied as e:
        r["doomed"] = "LeaderDied: " + str(e)
    r["retried"] = (await retried).decode()
    after = aw.leader()
    r["after"] = None if after is None else [after.slot, after.term]
    r["who_after"] = (await aw.invoke("who")).decode()
    r["changes"] = [c._asdict() for c in changes]
    with open(os.path.join(outdir, "result.json.tmp"), "w") as f:
        json.dump(r, f)
    os.rename(os.path.join(outdir, "result.json.tmp"), os.path.join(outdir, "result.json"))
    aw.worker.request_shutdown()
    await aw.stopped()
    aw.close()


if __name__ == "__main__":
    asyncio.run(asyncio.wait_for(main(), 80))
