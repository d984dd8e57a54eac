"""pytest tests of the Python binding, in one process (workers as threads
on one segment) and with forked processes for the owner-died case."""

import ctypes
import os
import signal
import threading
import time

import pytest

import shmcluster as sc


def serve(worker, stop):
    """Serves `worker` on a thread until `stop` is set."""
    t = threading.Thread(target=lambda: worker.run(until=stop.is_set), daemon=True)
    t.start()
    return t


def test_abi_version_matches():
    assert sc.load_library().shmc_abi_version() == sc.ABI_VERSION


def _library_text(fn, code):
    buf = ctypes.create_string_buffer(512)
    n = ctypes.c_size_t()
    assert fn(code, buf, len(buf), ctypes.byref(n)) == sc.OK
    return buf.value.decode()


def test_result_constants_match_the_library():
    """The binding's constants are the loaded library's codes: every
    number, name and text (the generated _codes.py has not drifted)."""
    lib = sc.load_library()
    count = ctypes.c_size_t()
    assert lib.shmc_result_codes(None, 0, ctypes.byref(count)) == sc.BUFFER_TOO_SMALL
    codes = (ctypes.c_uint32 * count.value)()
    assert lib.shmc_result_codes(codes, count.value, ctypes.byref(count)) == sc.OK
    names = {c: _library_text(lib.shmc_result_name, c).removeprefix("SHMC_RESULT_") for c in codes}
    texts = {c: _library_text(lib.shmc_error_string, c) for c in codes}
    assert names == sc.RESULT_NAMES
    assert texts == sc.RESULT_TEXTS
    for code, name in names.items():
        assert getattr(sc, name) == code, name


def test_request_broadcast_map_consume_and_errors():
    seg = sc.Segment(3)
    w0, w1, w2 = seg.worker(0), seg.worker(1), seg.worker(2)
    got = []

    for w in (w1, w2):
        @w.on("echo")
        def echo(msg, w=w):
            return b"%d:" % w.slot + msg.data

        @w.on("note")
        def note(msg, w=w):
            got.append((w.slot, msg.sender_slot, msg.data))

        @w.on("fail")
        def fail(msg):
            raise ValueError("nope")

    stop = threading.Event()
    threads = [serve(w1, stop), serve(w2, stop)]
    try:
        assert w0.request(1, "echo", b"hi") == b"1:hi"
        with pytest.raises(sc.NoHandler):
            w0.request(1, "nobody", b"")
        with pytest.raises(sc.HandlerFailed) as e:
            w0.request(2, "fail", b"")
        assert "nope" in str(e.value)
        # broadcast: every live worker, the caller included (w0 has no handler)
        assert w0.broadcast("note", b"x") == 3
        # map: one entry per worker, w0 without a handler
        entries = dict(w0.map("echo", b"m", timeout=5))
        assert entries[1] == b"1:m" and entries[2] == b"2:m"
        assert isinstance(entries[0], sc.NoHandler)
        slot, delivery, attempts = w0.consume("echo", b"task")
        assert slot in (1, 2) and attempts >= 1 and delivery != 0
        deadline = time.time() + 5
        while len(got) < 2 and time.time() < deadline:
            w0.poll(0.01)
        assert sorted(got) == [(1, 0, b"x"), (2, 0, b"x")]
    finally:
        stop.set()
        for t in threads:
            t.join(5)


def test_other_hosts_without_a_bridge_are_unreachable_at_once():
    """request_at / emit_at on a worker whose host has no NATS bridge (a
    plain segment: no master, no --nats) raise HostUnreachable without
    waiting for the timeout, from the worker and from its handle; a map's
    entries are all this host's ("" as their host)."""
    seg = sc.Segment(2)
    w0, w1 = seg.worker(0), seg.worker(1)

    @w1.on("ping")
    def ping(msg):
        return b"pong"

    stop = threading.Event()
    thread = serve(w1, stop)
    try:
        start = time.monotonic()
        with pytest.raises(sc.HostUnreachable) as e:
            w0.request_at("b", 1, "ping", b"", timeout=30)
        assert e.value.code == sc.HOST_UNREACHABLE
        assert time.monotonic() - start < 5, "did not fail at once"
        with pytest.raises(sc.HostUnreachable):
            w0.emit_at("b", 1, "ping", b"")
        # From another thread, through the handle of the served worker.
        with pytest.raises(sc.HostUnreachable):
            w1.handle().request_at("b", 0, "ping", b"", timeout=30)
        with pytest.raises(sc.HostUnreachable):
            w1.request_at("b", 0, "ping", b"", timeout=30)
        # Still usable afterwards, and the map says which host answered.
        entries = w0.map("ping", b"", timeout=5, hosts=True)
        assert [(h, s) for h, s, _ in entries] == [("", 0), ("", 1)]
        assert isinstance(entries[0][2], sc.NoHandler) and entries[1][2] == b"pong"
    finally:
        stop.set()
        thread.join(5)
    # A handle's emit_at is queued for the worker's thread: it returns and
    # the missing bridge drops it there (nothing to raise to).
    w0.handle().emit_at("b", 1, "ping", b"")
    w0.poll(0.01)
    with pytest.raises(sc.ShmclusterError):
        w0.request_at("", 1, "ping", b"")  # not a host name


def test_synchronize_context_manager_and_owner_died():
    seg = sc.Segment(2)
    w0 = seg.worker(0)
    with w0.synchronize("counter") as lock:
        first = lock.fencing_token
        assert not lock.previous_owner_died
    # A forked child takes the lock and is SIGKILLed holding it.
    r, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            child = seg.worker(1)
            lock = child.lock("counter")
            os.write(wfd, b"x")
            time.sleep(60)
        finally:
            os._exit(1)
    os.read(r, 1)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    with w0.synchronize("counter", timeout=5) as lock:
        assert lock.previous_owner_died, "the next holder is told"
        assert lock.fencing_token > first


def test_leader_invoke_and_publish_standalone():
    seg = sc.Segment(1)
    w = seg.worker(0)
    w.campaign()
    deadline = time.time() + 5
    while time.time() < deadline:
        try:
            w.publish("t", b"v1", timeout=0.1)
            break
        except sc.NoLeader:
            w.poll(0.01)
    with pytest.raises(sc.NoHandler):
        w.invoke("missing", b"", timeout=2)


def test_bad_arguments_raise():
    seg = sc.Segment(1)
    w = seg.worker(0)
    with pytest.raises(sc.ShmclusterError):
        w.request(7, "x", b"")
    with pytest.raises(sc.ShmclusterError):
        w.emit(0, "e" * 300, b"")


def test_other_threads_call_while_the_main_thread_runs():
    """Issue 12 item 7: an HTTP thread calls map/request while the main
    thread is in w.run() (it got BUSY); now they go through the worker's
    thread-safe handle and the running thread answers them."""
    seg = sc.Segment(2)
    w0, w1 = seg.worker(0), seg.worker(1)
    for w in (w0, w1):
        @w.on("echo")
        def echo(msg, w=w):
            return b"%d:" % w.slot + msg.data

    inside = {}

    @w0.on("nested")
    def nested(msg):
        # The handle from the thread that drives w0 would wait for itself.
        try:
            w0.handle().request(1, "echo", b"x", timeout=1)
            inside["error"] = None
        except sc.ShmclusterError as e:
            inside["error"] = e.code
        return b""

    stop = threading.Event()
    server1 = serve(w1, stop)
    results, errors = [], []

    def http_thread(i):
        try:
            got = dict(w0.map("echo", b"m%d" % i, timeout=5))
            results.append((got[0], got[1], w0.request(1, "echo", b"r%d" % i),
                            w0.handle().request(0, "echo", b"h%d" % i)))
            w0.handle().emit(1, "echo", b"fire and forget")
        except Exception as e:  # the assertion below reports it
            errors.append(e)

    threads = [threading.Thread(target=http_thread, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    done = lambda: all(not t.is_alive() for t in threads)  # noqa: E731
    try:
        w0.run(until=done)  # the main thread drives w0 meanwhile
    finally:
        for t in threads:
            t.join(10)
    assert errors == []
    assert sorted(results) == sorted(
        (b"0:m%d" % i, b"1:m%d" % i, b"1:r%d" % i, b"0:h%d" % i) for i in range(4))

    # From inside one of w0's handlers, on the thread that drives it.
    t = threading.Thread(target=lambda: w1.request(0, "nested", b"", timeout=5))
    t.start()
    w0.run(until=lambda: not t.is_alive())
    t.join(5)
    assert inside["error"] == sc.IN_HANDLER

    h = w0.handle()
    stop.set()
    server1.join(5)
    w0.close()
    with pytest.raises(sc.WorkerClosed):
        h.request(1, "echo", b"", timeout=1)


def test_accept_returns_connections_and_ends_on_stop():
    """Worker.accept gives connections as sockets and ends when the worker
    is told to stop, instead of blocking in accept() (issue 12 item 7)."""
    import socket

    seg = sc.Segment(1)
    w = seg.worker(0)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    with pytest.raises(sc.TimedOut):
        w.accept(listener, timeout=0.1)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
        conn = w.accept(listener, timeout=5)
        with conn:
            client.sendall(b"ping")
            assert conn.recv(4) == b"ping"
            assert conn.family == socket.AF_INET and conn.gettimeout() is None

    got = []
    t = threading.Thread(target=lambda: got.extend(w.incoming(listener)))
    t.start()
    time.sleep(0.2)  # it is waiting in accept now
    w.request_shutdown()  # no master: the worker's own stop
    t.join(5)
    assert not t.is_alive(), "incoming() ended on the stop request"
    assert got == []
    listener.close()


def test_ready_and_stop_checks_from_another_thread_while_it_runs():
    """ready() and should_stop() from the main thread while a thread runs
    the worker (app.py does this) are not refused as BUSY."""
    seg = sc.Segment(1)
    w = seg.worker(0)
    stop = threading.Event()
    t = serve(w, stop)
    try:
        time.sleep(0.05)
        for _ in range(50):
            w.ready()
            assert not w.should_stop()
            time.sleep(0.002)
    finally:
        stop.set()
        t.join(5)


def test_handle_leader_calls_from_another_thread():
    """invoke and publish through the handle, while the main thread runs
    the worker (a standalone worker leads its own role)."""
    seg = sc.Segment(1)
    w = seg.worker(0)
    w.campaign()
    outcome = {}

    def caller():
        h = w.handle()
        deadline = time.time() + 5
        while time.time() < deadline:
            try:
                h.publish("t", b"v1", timeout=0.2)
                outcome["published"] = True
                break
            except sc.NoLeader:
                pass
        try:
            h.invoke("missing", b"", timeout=2)
        except sc.ShmclusterError as e:
            outcome["invoke"] = type(e)

    t = threading.Thread(target=caller)
    t.start()
    w.run(until=lambda: not t.is_alive())
    t.join(5)
    assert outcome == {"published": True, "invoke": sc.NoHandler}
