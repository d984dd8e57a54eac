"""An ASGI app for uvicorn under `shmcluster run`: one uvicorn process per
shmcluster worker, all accepting on the listener the master bound (fd 3).
From the repository root:

    cargo build -p shmcluster -p shmcluster-ffi
    PYTHONPATH=ffi/python:examples/python target/debug/shmcluster run -w 4 \\
        --listen 127.0.0.1:8000 -- uvicorn uvicorn_app:app --fd 3

    curl 127.0.0.1:8000/          # "hello from worker 2 (slot 2, pid 4242)"
    curl 127.0.0.1:8000/peers     # a map over every worker, as JSON
    curl 127.0.0.1:8000/count     # a counter shared by the workers, under a lock
    curl '127.0.0.1:8000/flood?n=1000'   # 1,000 maps in flight; the worker serves on
    curl '127.0.0.1:8000/slow?ms=800'    # answers after 800 ms (a request to drain)
    target/debug/shmcluster reload --wait   # a rolling reload (SIGHUP to the master)
    target/debug/shmcluster stop --wait     # a graceful shutdown

- Readiness: the lifespan start-up attaches the worker
  (`AsyncWorker.from_env`, driven by uvicorn's own loop) and tells the
  master it is ready; a rolling reload stops an old worker only once its
  replacement is.
- Stop (a reload's drain, a shutdown): the master sets the worker's stop
  flag and sends SIGTERM, which the library takes (uvicorn's own handler
  would close the idle keep-alive connections at once, and a client whose
  next request is already on its way gets a reset). The app drains
  first: it stops accepting (`aw.stop_accepting()`: the other workers
  take the new connections from the shared backlog), answers what comes
  on its open connections with `Connection: close`, and when none has
  sent anything for `DRAIN_QUIET` seconds calls uvicorn's SIGTERM handler,
  which shuts down as usual (the lifespan shutdown detaches). A rolling
  reload under `wrk` loses no request.
- The listener gets TCP_NODELAY (inherited by the connections it
  accepts): `uvicorn --fd` wraps the descriptor as a Unix socket, so
  asyncio does not set it, and a response written in two parts (headers,
  body) waits for the client's delayed ACK, about 40 ms, on every
  keep-alive request.
- `/peers` awaits a `map` over every worker and `/count` holds a
  cross-process lock across awaits (`async with aw.synchronize(..)`) around a
  read-modify-write of a file (`UVICORN_APP_COUNTER`, default in the temp
  directory): no increment is lost whichever worker serves it.

The library is found through SHMCLUSTER_LIB or the workspace's target/.
"""

import asyncio
import json
import os
import signal
import socket
import tempfile
import time

from shmcluster.aio import AsyncWorker

COUNTER = os.environ.get("UVICORN_APP_COUNTER") or os.path.join(tempfile.gettempdir(), "uvicorn_app.count")

# A draining worker hands over to uvicorn's shutdown once its connections
# have been quiet this long (seconds), or after DRAIN_LIMIT at the latest.
DRAIN_QUIET = 0.3
DRAIN_LIMIT = 10.0

state = {"aw": None, "served": 0, "flooding": 0, "draining": False, "last_request": 0.0}


def nodelay_listener():
    """TCP_NODELAY on the listener the master handed us (fd 3), so on the
    connections uvicorn accepts from it."""
    try:
        sock = socket.socket(fileno=os.dup(3))
    except OSError:
        return
    try:
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    finally:
        sock.close()


async def drain(aw):
    """Waits for the master's stop, drains (see the module's text), then
    starts uvicorn's graceful shutdown."""
    await aw.stopped()
    aw.stop_accepting()
    state["draining"] = True
    start = time.monotonic()
    state["last_request"] = max(state["last_request"], start)
    while time.monotonic() - state["last_request"] < DRAIN_QUIET and time.monotonic() - start < DRAIN_LIMIT:
        await asyncio.sleep(0.05)
    uvicorn_exit = aw.saved_signal_handlers.get(signal.SIGTERM)
    if callable(uvicorn_exit):
        uvicorn_exit(signal.SIGTERM, None)
    else:
        os._exit(0)  # not under uvicorn's signal handling: nothing else to wait for


async def lifespan(receive, send):
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            try:
                # keep_python_signals=False: SIGTERM becomes the library's
                # stop request, which drain() turns into uvicorn's shutdown.
                # max_in_flight: /flood's 1,000 maps start at once (across
                # processes a full lane only waits for its reader).
                aw = AsyncWorker.from_env(keep_python_signals=False, max_in_flight=1024)
                nodelay_listener()
                me = {"index": aw.index, "slot": aw.slot, "pid": os.getpid()}
                aw.on("whoami", lambda _m: json.dumps(me))

                @aw.on("slow")
                async def slow(m):
                    await asyncio.sleep(float(m.data or b"0.5"))
                    return b"x"

                state["aw"], state["me"] = aw, me
                state["drainer"] = asyncio.ensure_future(drain(aw))
                aw.ready()
            except Exception as e:
                await send({"type": "lifespan.startup.failed", "message": str(e)})
                return
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            if state["aw"] is not None:
                state["drainer"].cancel()
                state["aw"].close()
            await send({"type": "lifespan.shutdown.complete"})
            return


async def answer(send, status, text, content_type="text/plain; charset=utf-8"):
    body = text.encode()
    headers = [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode())]
    if state["draining"]:
        headers.append((b"connection", b"close"))
    state["last_request"] = time.monotonic()
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def count():
    """Adds one to the shared counter under the cross-process lock; the
    await between the read and the write lets other requests (and the
    other workers) in, which the lock keeps out of this section."""
    async with state["aw"].synchronize("uvicorn_app.count"):
        try:
            with open(COUNTER) as f:
                n = int(f.read() or 0)
        except FileNotFoundError:
            n = 0
        await asyncio.sleep(0)
        with open(COUNTER, "w") as f:
            f.write(str(n + 1))
        return n + 1


async def flood(n, seconds):
    """Starts `n` maps whose handlers answer after `seconds`, and reports
    how many HTTP requests this worker answered while they were in flight."""
    aw = state["aw"]
    served = state["served"]
    t0 = time.monotonic()
    state["flooding"] += n
    try:
        results = await asyncio.gather(*(aw.map("slow", str(seconds), timeout=30) for _ in range(n)))
    finally:
        state["flooding"] -= n
    ok = sum(all(isinstance(v, bytes) for _, v in r) for r in results)
    return {"maps": n, "ok": ok, "seconds": round(time.monotonic() - t0, 3),
            "served_meanwhile": state["served"] - served, **state["me"]}


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        return await lifespan(receive, send)
    if scope["type"] != "http":
        return
    path = scope["path"]
    if path == "/":
        state["served"] += 1
        me = state["me"]
        return await answer(send, 200, "hello from worker %(index)d (slot %(slot)d, pid %(pid)d)\n" % me)
    if path == "/peers":
        peers = []
        for slot, value in await state["aw"].map("whoami", timeout=5):
            peers.append({"slot": slot, "error": str(value)} if isinstance(value, Exception) else json.loads(value))
        return await answer(send, 200, json.dumps(peers) + "\n", "application/json")
    if path == "/count":
        n = await count()
        return await answer(send, 200, "%d (slot %d, pid %d)\n" % (n, state["me"]["slot"], state["me"]["pid"]))
    if path == "/slow":
        query = dict(p.split("=", 1) for p in scope["query_string"].decode().split("&") if "=" in p)
        await asyncio.sleep(int(query.get("ms", "1000")) / 1000)
        me = state["me"]
        return await answer(send, 200, "hello from worker %(index)d (slot %(slot)d, pid %(pid)d)\n" % me)
    if path == "/flood":
        query = dict(p.split("=", 1) for p in scope["query_string"].decode().split("&") if "=" in p)
        report = await flood(int(query.get("n", "1000")), float(query.get("seconds", "0.5")))
        return await answer(send, 200, json.dumps(report) + "\n", "application/json")
    return await answer(send, 404, "not found\n")
