"""pytest tests of shmcluster.aio: workers of one segment driven by one
asyncio loop (each AsyncWorker registers its slot's eventfd with the
loop), and a real cluster under `shmcluster run` (SHMCLUSTER_BIN, the
workspace's target/{debug,release}/shmcluster, or the one on the PATH)."""

import asyncio
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time

import pytest

import shmcluster as sc
from shmcluster.aio import AsyncWorker


def run(coro, limit=30):
    """Runs `coro` on a fresh loop under a watchdog."""
    return asyncio.run(asyncio.wait_for(coro, limit))


def workers(n):
    seg = sc.Segment(n)
    return seg, [seg.worker(i) for i in range(n)]


def test_request_sync_and_coroutine_handlers():
    async def main():
        seg, (w0, w1) = workers(2)
        a0, a1 = AsyncWorker(w0), AsyncWorker(w1)
        a1.on("echo", lambda m: b"echo:" + m.data)

        @a1.on("slow")
        async def slow(m):
            await asyncio.sleep(0.05)
            return m.data.upper()

        @a1.on("boom")
        async def boom(m):
            await asyncio.sleep(0)
            raise ValueError("no such thing")

        assert await a0.request(1, "echo", b"hi") == b"echo:hi"
        assert await a0.request(1, "slow", "abc") == b"ABC"
        with pytest.raises(sc.HandlerFailed, match="no such thing"):
            await a0.request(1, "boom")
        with pytest.raises(sc.NoHandler):
            await a0.request(1, "nobody")
        # Both directions, and many at once from one task.
        a0.on("id", lambda m: b"0")
        assert await a1.request(0, "id") == b"0"
        got = await asyncio.gather(*(a0.request(1, "echo", str(i)) for i in range(200)))
        assert got == [b"echo:%d" % i for i in range(200)]
        a0.close(), a1.close()
        w0.close(), w1.close()
        seg.close()

    run(main())


def test_sync_handlers_and_listeners_may_use_the_worker():
    """A plain (not async) handler, subscriber or leader-change callback
    runs on the loop's thread, so it may call the AsyncWorker: emit from a
    request handler, broadcast from a subscriber, emit from a leader-change
    callback (each got BUSY when run inside the turn)."""

    async def main():
        loop = asyncio.get_running_loop()
        seg, (w0, w1) = workers(2)
        a0, a1 = AsyncWorker(w0), AsyncWorker(w1)
        notes = asyncio.Queue()
        a0.on("note", lambda m: notes.put_nowait(m.data))

        def handler(m):
            a1.emit(0, "note", b"from handler")
            return b"ok"

        a1.on("x", handler)
        assert await a0.request(1, "x") == b"ok"
        assert await asyncio.wait_for(notes.get(), 2) == b"from handler"

        a1.on_leader_change(lambda change: a1.emit(0, "note", b"leader %d" % change.slot))
        a0.campaign()
        assert await asyncio.wait_for(notes.get(), 5) == b"leader 0"

        await a1.subscribe("t", lambda m: a1.emit(0, "note", b"value " + m.data))
        await a0.publish("t", b"v1", timeout=5)
        assert await asyncio.wait_for(notes.get(), 5) == b"value v1"
        a0.close(), a1.close()
        w0.close(), w1.close()
        seg.close()

    run(main())


def test_closing_the_worker_closes_its_async_worker():
    """Worker.close() before AsyncWorker.close() frees the handle the
    AsyncWorker drives: it is closed first, so its calls fail with
    WorkerClosed instead of using freed memory."""

    async def main():
        seg, (w0, w1) = workers(2)
        a0, a1 = AsyncWorker(w0), AsyncWorker(w1)
        a1.on("x", lambda m: b"ok")
        assert await a0.request(1, "x") == b"ok"
        w0.close()
        await asyncio.sleep(0.02)  # a turn would run now
        for _ in range(3):
            with pytest.raises(sc.WorkerClosed):
                await a0.request(1, "x", timeout=1)
        a0.close()  # harmless twice
        a1.close()
        w1.close()
        seg.close()

    run(main())


def test_close_fails_the_calls_waiting_for_a_place_in_flight():
    """Calls beyond max_in_flight wait for a place; close() fails them with
    WorkerClosed too, as the ones started (none waits forever)."""

    async def main():
        seg, (w0, w1) = workers(2)
        a0, a1 = AsyncWorker(w0, max_in_flight=1), AsyncWorker(w1)

        @a1.on("slow")
        async def slow(m):
            await asyncio.sleep(5)
            return b"late"

        calls = [asyncio.ensure_future(a0.request(1, "slow", timeout=10)) for _ in range(3)]
        await asyncio.sleep(0.05)  # one started, two waiting for its place
        a0.close()
        done, pending = await asyncio.wait(calls, timeout=2)
        assert not pending, f"{len(pending)} calls never ended after close()"
        for c in done:
            assert isinstance(c.exception(), sc.WorkerClosed), c.exception()
        a1.close()
        w0.close(), w1.close()
        seg.close()

    run(main())


def test_10000_concurrent_requests_between_workers_of_one_loop():
    """More calls at once than a lane holds: the AsyncWorker starts at most
    max_in_flight of them, so a start never waits on a full lane whose
    reader is this same thread (which stalled until the deadline)."""

    async def main():
        seg, (w0, w1) = workers(2)
        a0, a1 = AsyncWorker(w0), AsyncWorker(w1)
        a1.on("echo", lambda m: m.data)
        t0 = time.monotonic()
        got = await asyncio.gather(*(a0.request(1, "echo", b"%d" % i) for i in range(10000)))
        took = time.monotonic() - t0
        assert got == [b"%d" % i for i in range(10000)]
        assert took < 10, f"10,000 requests took {took:.1f} s"
        a0.close(), a1.close()

    run(main())


def test_the_loop_is_not_blocked_while_calls_wait():
    """A request whose handler takes 300 ms: the loop keeps ticking
    meanwhile (a blocking call would stall it for the whole time)."""

    async def main():
        seg, (w0, w1) = workers(2)
        a0, a1 = AsyncWorker(w0), AsyncWorker(w1)

        @a1.on("slow")
        async def slow(m):
            await asyncio.sleep(0.3)
            return b"done"

        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        t = asyncio.ensure_future(ticker())
        assert await a0.request(1, "slow") == b"done"
        t.cancel()
        assert ticks >= 15, f"the loop ticked only {ticks} times in 300 ms"
        with pytest.raises(sc.TimedOut):
            await a0.request(1, "slow", timeout=0.05)
        a0.close(), a1.close()

    run(main())


def test_map_and_consume():
    async def main():
        seg, ws = workers(3)
        aws = [AsyncWorker(w) for w in ws]
        for a in aws:
            a.on("who", lambda m, a=a: str(a.slot))

        @aws[2].on("fails")
        async def fails(m):
            raise RuntimeError("slot 2 says no")

        aws[0].on("fails", lambda m: b"ok")
        entries = await aws[0].map("who")
        assert entries == [(0, b"0"), (1, b"1"), (2, b"2")]
        entries = dict(await aws[1].map("fails", timeout=2))
        assert entries[0] == b"ok"
        assert isinstance(entries[1], sc.NoHandler)
        assert isinstance(entries[2], sc.HandlerFailed)

        done = []

        @aws[1].on("task")
        async def task(m):
            await asyncio.sleep(0.01)
            done.append(m.data)

        slot, delivery, attempts = await aws[0].consume("task", b"t1")
        assert slot == 1 and attempts >= 1 and delivery != 0
        assert done == [b"t1"]
        for a in aws:
            a.close()

    run(main())


def test_synchronize_holds_the_lock_across_awaits():
    """Two workers' tasks increment a shared counter with an await in the
    middle of the read-modify-write: with the lock, no update is lost."""

    async def main():
        seg, (w0, w1) = workers(2)
        a0, a1 = AsyncWorker(w0), AsyncWorker(w1)
        counter = {"n": 0, "inside": 0, "overlap": 0}

        async def bump(a):
            for _ in range(20):
                async with a.synchronize("counter") as section:
                    assert section.fencing_token > 0
                    counter["inside"] += 1
                    if counter["inside"] > 1:
                        counter["overlap"] += 1
                    n = counter["n"]
                    await asyncio.sleep(0.001)
                    counter["n"] = n + 1
                    counter["inside"] -= 1

        await asyncio.gather(bump(a0), bump(a1), bump(a0))
        assert counter == {"n": 60, "inside": 0, "overlap": 0}

        # A timeout while another worker holds it.
        async with a0.synchronize("held"):
            with pytest.raises(sc.LockError):
                async with a1.synchronize("held", timeout=0.1):
                    pass
        # Released: the other worker gets it now.
        async with a1.synchronize("held", timeout=1):
            pass
        a0.close(), a1.close()

    run(main())


def test_close_ends_a_section_waiting_for_its_lock():
    """close() while a section waits for a lock another worker holds: the
    waiter fails with WorkerClosed at once (not when the lock is freed),
    its thread ends, and the lock table it used is freed only after."""

    async def main():
        seg, (w0, w1) = workers(2)
        a0, a1 = AsyncWorker(w0), AsyncWorker(w1)
        async with a0.synchronize("held"):
            async def wait():
                async with a1.synchronize("held"):
                    pass

            def sections():
                return sum(t.name == "shmcluster-lock-held" for t in threading.enumerate())

            waiter = asyncio.ensure_future(wait())
            await asyncio.sleep(0.05)  # let it start waiting
            assert sections() == 2  # a0's, holding; a1's, waiting
            a1.close()
            with pytest.raises(sc.WorkerClosed):
                await asyncio.wait_for(waiter, 2)
            deadline = time.monotonic() + 2
            while sections() > 1:
                assert time.monotonic() < deadline, "the section's thread outlived close()"
                await asyncio.sleep(0.01)
        # a1 never took it: a0's section ended and the lock is free.
        async with a0.synchronize("held", timeout=1):
            pass
        a0.close()
        w0.close(), w1.close()
        seg.close()

    run(main())


def test_turns_resume_after_another_thread_held_the_worker():
    """Another thread in a blocking call on the Worker (here: waiting for a
    lock) makes the loop's turns BUSY: the AsyncWorker comes back on a
    timer and serves again when the call returns, with no error raised
    out of its loop callbacks."""

    async def main():
        loop = asyncio.get_running_loop()
        errors = []
        loop.set_exception_handler(lambda _loop, ctx: errors.append(ctx))
        seg, (w0, w1) = workers(2)
        a0, a1 = AsyncWorker(w0), AsyncWorker(w1)
        a1.on("echo", lambda m: m.data)
        assert await a0.request(1, "echo", b"before") == b"before"
        async with a0.synchronize("x"):
            blocked = loop.run_in_executor(None, lambda: w1.lock("x", timeout=0.3))
            await asyncio.sleep(0.05)  # the thread holds w1 now
            during = asyncio.ensure_future(a0.request(1, "echo", b"during", timeout=5))
            with pytest.raises(sc.LockError):
                await blocked
        assert await during == b"during"
        assert await a0.request(1, "echo", b"after", timeout=2) == b"after"
        assert errors == []
        a0.close(), a1.close()
        w0.close(), w1.close()
        seg.close()

    run(main())


def test_an_asyncio_server_answers_while_1000_maps_are_in_flight():
    """1,000 maps whose handlers answer after 500 ms are in flight while a
    TCP echo server on the same loop answers 50 round trips at once."""

    async def main():
        seg, ws = workers(2)
        a0, a1 = AsyncWorker(ws[0]), AsyncWorker(ws[1])
        for a in (a0, a1):
            @a.on("slow")
            async def slow(m):
                await asyncio.sleep(0.5)
                return b"x"

        async def echo(reader, writer):
            while line := await reader.readline():
                writer.write(line)
                await writer.drain()
            writer.close()

        server = await asyncio.start_server(echo, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        maps = [asyncio.ensure_future(a0.map("slow", timeout=20)) for _ in range(1000)]
        await asyncio.sleep(0.05)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        t0 = time.monotonic()
        for i in range(50):
            writer.write(b"%d\n" % i)
            assert await reader.readline() == b"%d\n" % i
        echo_time = time.monotonic() - t0
        in_flight = sum(not m.done() for m in maps)
        writer.close()
        results = await asyncio.gather(*maps)
        server.close()
        assert in_flight == 1000, f"only {in_flight} maps were in flight during the echoes"
        assert echo_time < 0.4, f"50 echoes took {echo_time:.3f} s with the maps in flight"
        assert all(r == [(0, b"x"), (1, b"x")] for r in results)
        a0.close(), a1.close()

    run(main(), limit=60)


def _shmcluster_bin():
    env = os.environ.get("SHMCLUSTER_BIN")
    if env:
        return env
    root = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
    for target in (os.environ.get("CARGO_TARGET_DIR"), os.path.join(root, "target")):
        for profile in ("debug", "release"):
            if target and os.path.exists(os.path.join(target, profile, "shmcluster")):
                return os.path.join(target, profile, "shmcluster")
    on_path = shutil.which("shmcluster")  # an installed wheel's
    if on_path:
        return on_path
    pytest.fail("no shmcluster binary: cargo build -p shmcluster (or set SHMCLUSTER_BIN)")


WORKER = textwrap.dedent("""
    import asyncio, os, sys
    from shmcluster.aio import AsyncWorker

    async def main():
        aw = AsyncWorker.from_env()
        aw.on("whoami", lambda m: str(aw.index))

        @aw.on("slow")
        async def slow(m):
            await asyncio.sleep(0.05)
            return str(aw.index)

        aw.ready()
        aw.worker.wait_all_ready(10)
        if aw.index == 0:
            entries = await aw.map("whoami")
            slow = await aw.map("slow")
            async with aw.synchronize("x"):
                await asyncio.sleep(0.01)
            other = entries[1][0]
            answer = await aw.request(other, "slow")
            print("MAP", sorted(v for _, v in entries), sorted(v for _, v in slow), answer, flush=True)
            aw.worker.request_shutdown()
        await aw.stopped()
        aw.close()

    asyncio.run(main())
""")


def test_under_shmcluster_run(tmp_path):
    """Two asyncio workers under a real master: a map, a request and a
    section across processes, then a clean shutdown."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    p = subprocess.run([_shmcluster_bin(), "run", "-w", "2", "--", sys.executable, str(script)],
                       capture_output=True, text=True, timeout=60, env=env)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "MAP [b'0', b'1'] [b'0', b'1'] b'1'" in p.stdout, p.stdout + p.stderr
