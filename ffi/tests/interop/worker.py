"""The Python workers of tests/interop.rs, and its attach-error checks.

    worker.py main             instance 2 of `shmcluster run`: a hello
                               broadcast, "whoami" for maps, holds lock
                               "shared" ~300 ms when asked, serves HTTP on
                               the inherited listener (fd 3)
    worker.py victim           instance 3: takes the lock it is told to and
                               SIGKILLs itself inside the section
    worker.py abi              prints the library's ABI check answers
    worker.py bad-fd PATH      SHMCLUSTER_FD names PATH opened read-write
    worker.py closed-fd        SHMCLUSTER_FD names a descriptor not open

Results go to files in $INTEROP_DIR (written under a temporary name and
renamed) or to stdout; the test asserts on them.
"""

import ctypes
import os
import signal
import socket
import sys
import threading
import time

import shmcluster as sc


def put(name, text):
    path = os.path.join(os.environ["INTEROP_DIR"], name)
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.rename(path + ".tmp", path)


def take_listener(worker):
    """Takes the inherited listeners through the binding; returns how many
    there were and the first one's socket."""
    listeners = worker.take_listeners()
    return len(listeners), listeners[0][1]


def serve_http(sock, body):
    while True:
        try:
            conn, _ = sock.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(10)
            request = b""
            while b"\r\n\r\n" not in request:
                chunk = conn.recv(65536)
                if not chunk:
                    break
                request += chunk
            head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body)
            conn.sendall(head + body)


def main():
    w = sc.Worker.from_env()
    me = "python:%d:%d" % (w.index, w.slot)
    hellos = []
    state = {"hold_from": None}

    @w.on("hello")
    def hello(msg):
        hellos.append("%d %s" % (msg.sender_slot, msg.data.decode()))

    @w.on("whoami")
    def whoami(msg):
        return me.encode()

    @w.on("hold")
    def hold(msg):
        state["hold_from"] = msg.sender_slot

    count, sock = take_listener(w)
    body = ("python worker index=%d slot=%d pid=%d listeners=%d" % (w.index, w.slot, os.getpid(), count)).encode()
    threading.Thread(target=serve_http, args=(sock, body), daemon=True).start()

    w.ready()
    all_ready = w.wait_all_ready(15)
    sent = w.broadcast("hello", b"python:%d" % w.index)
    put("py-broadcast.txt", "all_ready=%d sent=%d\n" % (all_ready, sent))
    while not w.should_stop():
        w.poll(0.05)
        if state["hold_from"] is not None:
            requester, state["hold_from"] = state["hold_from"], None
            with w.synchronize("shared", timeout=10) as lock:
                acquired = time.monotonic_ns()
                w.emit(requester, "held", b"")
                time.sleep(0.3)
                put("py-release.txt", "acquired_ns=%d release_ns=%d owner_died=%d\n"
                    % (acquired, time.monotonic_ns(), lock.previous_owner_died))
    put("hello-%d.txt" % w.index, "".join(h + "\n" for h in hellos))
    w.close()


def victim():
    w = sc.Worker.from_env()
    me = "python:%d:%d" % (w.index, w.slot)
    state = {"die": None}

    @w.on("whoami")
    def whoami(msg):
        return me.encode()

    @w.on("die")
    def die(msg):
        state["die"] = (msg.sender_slot, msg.data.decode())

    w.ready()
    while not w.should_stop():
        w.poll(0.05)
        if state["die"] is not None:
            requester, name = state["die"]
            lock = w.lock(name, timeout=10)
            put("victim-%s-generation-%d.txt" % (name, w.generation), "token=%d\n" % lock.fencing_token)
            w.emit(requester, "holding", name.encode())
            os.kill(os.getpid(), signal.SIGKILL)
    w.close()


def fake_env(fd):
    os.environ.update({
        "SHMCLUSTER_FD": str(fd), "SHMCLUSTER_WORKER": "1", "SHMCLUSTER_WORKERS": "1",
        "SHMCLUSTER_GENERATION": "1", "SHMCLUSTER_INDEX": "0",
    })
    os.environ.pop("SHMCLUSTER_CONTROL_FD", None)


def attach_error(fd):
    fake_env(fd)
    try:
        sc.Worker.from_env()
        print("from_env=ok")
    except sc.ShmclusterError as e:
        print("from_env=%d class=%s message=%s" % (e.code, type(e).__name__, e))
    # Still a working library: a segment of its own, a request to itself.
    seg = sc.Segment(1)
    w = seg.worker(0)
    w.on("echo", lambda m: m.data)
    print("after: echo=%s" % w.request(0, "echo", b"still alive", timeout=5).decode())
    w.close()
    seg.close()


def abi():
    lib = sc.load_library()
    print("abi_ok=%d abi_next=%d library=%d binding=%d" % (
        lib.shmc_check_abi_version(sc.ABI_VERSION), lib.shmc_check_abi_version(sc.ABI_VERSION + 1),
        lib.shmc_abi_version(), sc.ABI_VERSION))


if __name__ == "__main__":
    role = sys.argv[1]
    if role == "main":
        main()
    elif role == "victim":
        victim()
    elif role == "abi":
        abi()
    elif role == "bad-fd":
        attach_error(os.open(sys.argv[2], os.O_RDWR))
    elif role == "closed-fd":
        attach_error(987)
    else:
        sys.exit("unknown role %r" % role)
