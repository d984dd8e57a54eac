"""pytest tests of shmcluster.aio's leader calls, emit and broadcast:
workers of one segment driven by one asyncio loop, and a real cluster of
three under `shmcluster run` (aio_cluster_worker.py)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any, List, Tuple

import pytest

import shmcluster as sc
from shmcluster.aio import AsyncWorker

from test_aio import _shmcluster_bin

HERE = os.path.dirname(os.path.abspath(__file__))


def run(coro: Any, limit: float = 30) -> Any:
    """Runs `coro` on a fresh loop under a watchdog."""
    return asyncio.run(asyncio.wait_for(coro, limit))


def workers(n: int) -> Tuple[sc.Segment, List[AsyncWorker]]:
    seg = sc.Segment(n)
    return seg, [AsyncWorker(seg.worker(i)) for i in range(n)]


async def until(cond: Any, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.005)


def test_no_leader_is_a_typed_error_at_the_timeout_and_the_loop_runs_meanwhile():
    async def main():
        seg, (a0, a1) = workers(2)
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        t = asyncio.ensure_future(ticker())
        t0 = time.monotonic()
        with pytest.raises(sc.NoLeader):
            await a0.invoke("add", b"1", timeout=0.3)
        took = time.monotonic() - t0
        with pytest.raises(sc.NoLeader):
            await a0.publish("topic", b"v", timeout=0.1)
        t.cancel()
        assert 0.29 <= took < 2, took
        assert ticks >= 15, f"the loop ticked only {ticks} times while the invoke waited 300 ms"
        assert a0.leader() is None and not a0.is_leader()
        for a in (a0, a1):
            a.close()

    run(main())


def test_invoke_reaches_the_leader_sync_and_coroutine_handlers():
    async def main():
        seg, aws = workers(3)
        changes: List[sc.LeaderChange] = []
        seen_by_coroutine: List[sc.LeaderChange] = []
        aws[0].on_leader_change(changes.append)

        @aws[0].on_leader_change
        async def later(change: sc.LeaderChange) -> None:
            await asyncio.sleep(0)
            seen_by_coroutine.append(change)

        ran: List[int] = []
        for a in aws[1:]:
            a.on_invoke("who", lambda m, a=a: (ran.append(a.slot), str(a.slot))[1])

            @a.on_invoke("slow")
            async def slow(m: sc.Message, a: AsyncWorker = a) -> bytes:
                await asyncio.sleep(0.05)
                return b"%d:%s" % (a.slot, m.data)

            @a.on_invoke("boom")
            async def boom(m: sc.Message) -> None:
                raise ValueError("leader says no")

        await until(lambda: aws[0].leader() is not None, "an election")
        leader = aws[0].leader()
        assert leader is not None and leader.slot in (1, 2) and leader.term >= 1
        assert aws[leader.slot].is_leader() and not aws[0].is_leader()
        for a in aws:  # from a follower, from the leader itself, from a worker without the handler
            assert await a.invoke("who") == str(leader.slot).encode()
        assert ran == [leader.slot] * 3
        got = await asyncio.gather(*(aws[0].invoke("slow", str(i), idempotent=i % 2 == 0) for i in range(50)))
        assert got == [b"%d:%d" % (leader.slot, i) for i in range(50)]
        with pytest.raises(sc.HandlerFailed, match="leader says no"):
            await aws[0].invoke("boom")
        with pytest.raises(sc.NoHandler):
            await aws[0].invoke("nobody")
        await until(lambda: changes and seen_by_coroutine, "the leader-change callbacks")
        assert changes[0] == sc.LeaderChange(leader.slot, leader.term, False)
        assert seen_by_coroutine[0] == changes[0]
        aws[0].campaign()  # harmless, and it does not lead: the others campaigned first
        assert aws[0].leader() == leader
        for a in aws:
            a.close()

    run(main())


def test_publish_reaches_subscribers_and_a_late_one_gets_the_last_value():
    async def main():
        seg, aws = workers(3)
        early: List[bytes] = []
        # Before any leader: nobody is told now; the turn that sees one is.
        assert await aws[0].subscribe("cfg", lambda m: early.append(m.data)) is False
        aws[1].campaign()
        await until(lambda: aws[0].leader() is not None, "an election")
        got: List[bytes] = []

        async def on_cfg(m: sc.Message) -> None:
            await asyncio.sleep(0)
            got.append(m.data)

        assert await aws[2].subscribe("cfg", on_cfg) is True
        await asyncio.sleep(0.05)
        await aws[2].publish("cfg", b"v1")
        await aws[0].publish("cfg", "v2")
        await until(lambda: len(early) == 2 and len(got) == 2, "both values at both subscribers")
        assert early == [b"v1", b"v2"] and got == [b"v1", b"v2"]
        late: List[bytes] = []
        assert await aws[1].subscribe("cfg", lambda m: late.append(m.data)) is True
        await until(lambda: late, "the last value")
        assert late == [b"v2"]
        for a in aws:
            a.close()

    run(main())


def test_emit_and_broadcast_arrive():
    async def main():
        seg, aws = workers(3)
        got: List[Tuple[int, int, bytes]] = []
        for a in aws:
            a.on("ev", lambda m, a=a: got.append((a.slot, m.sender_slot, m.data)))
        assert aws[0].emit(2, "ev", b"one") == 1
        assert aws[1].broadcast("ev", "all") == 3
        assert aws[2].emit_others("ev", b"others") == 2
        await until(lambda: len(got) == 6, "six events")
        assert sorted(got) == [(0, 1, b"all"), (0, 2, b"others"), (1, 1, b"all"), (1, 2, b"others"),
                               (2, 0, b"one"), (2, 1, b"all")]
        with pytest.raises(sc.ShmclusterError):
            aws[0].emit(7, "ev")
        for a in aws:
            a.close()

    run(main())


def test_emit_to_a_full_lane_waits_at_most_its_timeout():
    """Both workers on one loop: while the loop is in emit, the reader of
    the lane (this same thread) cannot read, so an emit that finds the
    lane full returns TimedOut at its bound instead of stalling the loop;
    once the loop turns, everything sent arrives."""

    async def main():
        seg, (a0, a1) = workers(2)
        n = 0
        a1.on("ev", lambda m: None)

        def count(m: sc.Message) -> None:
            nonlocal n
            n += 1

        a1.on("ev", count)
        chunk = b"x" * 1024
        sent = 0
        with pytest.raises(sc.TimedOut):
            while True:
                a0.emit(1, "ev", chunk, timeout=0)
                sent += 1
                assert sent < 100_000
        assert sent > 10
        t0 = time.monotonic()
        with pytest.raises(sc.TimedOut):
            a0.emit(1, "ev", chunk, timeout=0.05)
        took = time.monotonic() - t0
        assert 0.045 <= took < 1, took
        await until(lambda: n == sent, f"{sent} events")
        assert a0.emit(1, "ev", chunk) == 1
        for a in (a0, a1):
            a.close()

    run(main())


def test_leader_calls_under_shmcluster_run():
    """Three asyncio workers under a real master: invoke reaches the
    leader, publish reaches an early subscriber and a late one gets the
    last value, emit and broadcast arrive in every process; the leader
    SIGKILLed mid-call: the plain invoke ends LeaderDied, the idempotent
    one is answered by the next leader, who then serves invokes."""
    outdir = tempfile.mkdtemp(prefix="shmcluster-aio-")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p), PYTHONDONTWRITEBYTECODE="1")
    master = subprocess.Popen(
        [_shmcluster_bin(), "run", "-w", "3", "--", sys.executable,
         os.path.join(HERE, "aio_cluster_worker.py"), outdir],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True,
    )
    try:
        log, _ = master.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(master.pid, signal.SIGKILL)
        log, _ = master.communicate()
        pytest.fail(f"the cluster did not finish within 90 s:\n{log}")
    finally:
        if master.poll() is None:
            os.killpg(master.pid, signal.SIGKILL)
            master.wait()
    path = os.path.join(outdir, "result.json")
    assert os.path.exists(path), f"no result; master exited {master.returncode}:\n{log}"
    with open(path) as f:
        r = json.load(f)
    shutil.rmtree(outdir, ignore_errors=True)
    assert master.returncode == 0, log

    me, old = r["slot"], r["leader"]
    assert me != old and r["who"] == str(old)
    assert r["cfg"] == ["v1"] and r["late"] == ["last"] and r["told"] is True
    assert r["emit"] == 1 and r["broadcast"] == 3
    other = next(s for s in range(3) if s not in (me, old))
    assert r["events"] == {str(me): ["to-all"], str(old): ["to-all"], str(other): ["to-all", "to-one"]}
    assert r["doomed"].startswith("LeaderDied"), r["doomed"]
    new = int(r["retried"])
    assert new != old
    assert r["after"] is not None and r["after"][0] == new and r["after"][1] > r["term"]
    assert r["who_after"] == str(new)
    assert r["changes"][0]["slot"] == old
    assert r["changes"][-1]["slot"] == new and r["changes"][-1]["term"] > r["changes"][0]["term"]
