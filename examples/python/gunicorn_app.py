"""A WSGI app for gunicorn under `shmcluster run`: each shmcluster worker
is a gunicorn arbiter with one sync worker (examples/python/gunicorn_conf.py),
all accepting on the listener the master bound. From the repository root:

    cargo build -p shmcluster -p shmcluster-ffi
    PYTHONPATH=ffi/python:examples/python target/debug/shmcluster run -w 4 \\
        --listen 127.0.0.1:8000 -- gunicorn -c examples/python/gunicorn_conf.py gunicorn_app:app

    curl 127.0.0.1:8000/          # "hello from worker 2 (slot 2, pid 4242)"
    curl 127.0.0.1:8000/peers     # a map over every worker, as JSON
    curl 127.0.0.1:8000/count     # a counter shared by the workers, under a lock
    curl '127.0.0.1:8000/slow?ms=800'   # answers after 800 ms (a request to drain)
    target/debug/shmcluster reload --wait   # a rolling reload (SIGHUP to the master)
    target/debug/shmcluster stop --wait     # a graceful shutdown

The master spawns gunicorn with LISTEN_FDS=1 and LISTEN_PID set to its pid:
gunicorn's arbiter adopts fd 3 instead of binding. Its sync worker (a
forked child) attaches to the shmcluster slot in `post_worker_init`
(gunicorn_conf.py) and serves messages on a thread of its own; the
request handlers call `map` and `synchronize` from gunicorn's thread
(through the worker's thread-safe handle).
"""

import json
import os
import tempfile
import time
from urllib.parse import parse_qs

COUNTER = os.environ.get("GUNICORN_APP_COUNTER") or os.path.join(tempfile.gettempdir(), "gunicorn_app.count")

# Set by gunicorn_conf.post_worker_init in the worker process.
cluster = {"worker": None, "me": None}


def app(environ, start_response):
    w, me = cluster["worker"], cluster["me"]
    path = environ.get("PATH_INFO", "/")
    if path == "/":
        body = "hello from worker %(index)d (slot %(slot)d, pid %(pid)d)\n" % me
    elif path == "/slow":
        ms = int(parse_qs(environ.get("QUERY_STRING", "")).get("ms", ["1000"])[0])
        time.sleep(ms / 1000)
        body = "hello from worker %(index)d (slot %(slot)d, pid %(pid)d)\n" % me
    elif path == "/peers":
        peers = []
        for slot, value in w.map("whoami", timeout=5):
            peers.append({"slot": slot, "error": str(value)} if isinstance(value, Exception) else json.loads(value))
        body = json.dumps(peers) + "\n"
    elif path == "/count":
        with w.synchronize("gunicorn_app.count"):
            try:
                with open(COUNTER) as f:
                    n = int(f.read() or 0)
            except FileNotFoundError:
                n = 0
            with open(COUNTER, "w") as f:
                f.write(str(n + 1))
        body = "%d (slot %d, pid %d)\n" % (n + 1, me["slot"], me["pid"])
    else:
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found\n"]
    data = body.encode()
    start_response("200 OK", [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(data)))])
    return [data]
