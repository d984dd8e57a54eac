"""A Python HTTP worker for `shmcluster run`, on the standard library's
http.server. From the repository root:

    cargo build --release -p shmcluster -p shmcluster-ffi
    target/release/shmcluster run -w 4 --listen 127.0.0.1:8080 -- python3 ffi/examples/app.py

    curl 127.0.0.1:8080/         # "hello from worker 2 (slot 2, pid 4242)"
    curl 127.0.0.1:8080/peers    # a map over every worker, as JSON
    target/release/shmcluster reload --wait   # a rolling reload, in about a second
    target/release/shmcluster stop --wait     # a graceful shutdown

Or with the package installed (pip builds the library and the command):

    python3 -m venv v && v/bin/pip install ./ffi/python
    v/bin/shmcluster run -w 2 --listen 127.0.0.1:8080 -- v/bin/python ffi/examples/app.py

Each worker takes the listener the master bound (fd 3), accepts on it with
`worker.incoming(sock)` — which ends as soon as the master tells the worker
to stop, so a reload or a shutdown does not wait out its drain deadline the
way a blocking `sock.accept()` would — and serves each connection on a
thread. Messages are served by `worker.run()` on a thread of their own; the
HTTP threads call `worker.map` from there, which goes through the worker's
thread-safe handle. When the worker is told to stop it finishes the
requests it has, and exits 0.

The binding is the installed package, else the one next to this file
(ffi/python); the library is the one bundled with the installed package,
else SHMCLUSTER_LIB or the workspace's target/ directory.
"""

import json
import os
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

try:
    import shmcluster
except ImportError:
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
    import shmcluster


def main():
    worker = shmcluster.Worker.from_env()
    listeners = worker.take_listeners()
    if not listeners:
        sys.exit("app.py: no listener; start it with `shmcluster run --listen ADDR -- python3 app.py`")
    _name, sock = listeners[0]
    me = {"index": worker.index, "slot": worker.slot, "pid": os.getpid()}

    @worker.on("whoami")
    def whoami(_msg):
        return json.dumps(me).encode()

    class Handler(BaseHTTPRequestHandler):
        # HTTP/1.0: one request a connection, so a draining worker is done
        # as soon as its last answer is written.
        def do_GET(self):
            if self.path == "/":
                self.answer(200, "hello from worker %(index)d (slot %(slot)d, pid %(pid)d)\n" % me)
            elif self.path == "/peers":
                # From this HTTP thread: the messaging thread runs the map.
                peers = []
                for slot, answer in worker.map("whoami", timeout=5):
                    if isinstance(answer, Exception):
                        peers.append({"slot": slot, "error": str(answer)})
                    else:
                        peers.append(json.loads(answer))
                self.answer(200, json.dumps(peers) + "\n")
            else:
                self.answer(404, "not found\n")

        def answer(self, status, text):
            body = text.encode()
            self.send_response(status)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    # The server only runs requests (a thread each, joined at close): the
    # accepting is worker.incoming's, on the master's socket.
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler, bind_and_activate=False)
    stopping = threading.Event()  # ends run() if the loop below fails
    messaging = threading.Thread(target=worker.run, kwargs={"until": stopping.is_set}, name="shmcluster")
    messaging.start()
    worker.ready()
    try:
        for conn in worker.incoming(sock):
            try:
                peer = conn.getpeername()
            except OSError:  # the client is gone already
                conn.close()
                continue
            server.process_request(conn, peer)
    finally:
        server.server_close()  # waits for the requests in flight
        stopping.set()         # (run() has returned already if told to stop)
        messaging.join()
        worker.close()


if __name__ == "__main__":
    main()
