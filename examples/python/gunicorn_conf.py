"""gunicorn settings for examples/python/gunicorn_app.py under
`shmcluster run` (one gunicorn arbiter per shmcluster worker)."""

import json
import os
import signal
import threading

# One sync worker per shmcluster worker: the shmcluster slot is the
# worker's, and the master counts, reloads and stops the arbiters.
workers = 1
worker_class = "sync"
# No `bind`: the arbiter adopts the master's listener (LISTEN_FDS, fd 3).
# A stop or reload waits at most this long for the request in hand.
graceful_timeout = 10
accesslog = None


def post_worker_init(worker):
    """Attaches the gunicorn worker (a forked child of the arbiter the
    master spawned) to its shmcluster slot, serves messages on a thread,
    and tells the master it is ready."""
    import shmcluster
    import gunicorn_app

    # The library turns SIGTERM into a stop request; gunicorn's worker
    # needs its own handlers back (SIGTERM from the arbiter ends the worker
    # gracefully, after the request in hand).
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)}
    w = shmcluster.Worker.from_env()
    for s, h in saved.items():
        if h is not None:
            signal.signal(s, h)
    me = {"index": w.index, "slot": w.slot, "pid": os.getpid()}
    w.on("whoami", lambda _m: json.dumps(me))
    gunicorn_app.cluster.update(worker=w, me=me)
    threading.Thread(target=w.run, name="shmcluster", daemon=True).start()
    w.ready()
control_socket_disable = True
