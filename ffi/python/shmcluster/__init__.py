"""shmcluster for Python: a small ctypes binding over libshmcluster (the C ABI).

A worker spawned by ``shmcluster run`` attaches with :func:`Worker.from_env`;
tests and single-process programs make a segment with :class:`Segment` and
attach one :class:`Worker` per slot. Payloads are ``bytes``; the ``*_json``
helpers encode and decode JSON. Errors raise :class:`ShmclusterError` (with a
subclass per family of result codes).

Handlers run on the thread that drives the worker (``poll``/``run``), while
it dispatches. Other threads (an HTTP server's) call through
:meth:`Worker.handle`, a thread-safe :class:`Handle` whose calls that thread
runs; the worker's own ``request``/``map``/... do that for them when the
worker is busy on another thread. A server accepts connections with
:meth:`Worker.accept` / :meth:`Worker.incoming`, which end when the master
tells the worker to stop (a reload's drain, a shutdown), unlike a blocking
``socket.accept()``. A worker must not be used in a forked child.
"""

import ctypes
import json
import os
import socket
import threading
import time
from contextlib import contextmanager

__all__ = [
    "Segment", "Worker", "Handle", "Lock", "ShmclusterError", "NoHandler", "HandlerFailed",
    "WorkerDied", "TimedOut", "LockError", "WorkerClosed", "NoLeader", "LeaderDied", "HostUnreachable",
    "WAIT_FOREVER",
    "ABI_VERSION", "load_library", "RESULT_NAMES", "RESULT_TEXTS",
]

ABI_VERSION = 1
WAIT_FOREVER = 2**64 - 1

# Result codes: every SHMC_RESULT_* of the C header as a module constant
# (OK, NO_HANDLER, ...), RESULT_NAMES and RESULT_TEXTS. _codes.py is
# generated from the library's one definition (ffi/src/result.rs) and
# checked against it by ffi/tests/python_codes.rs: the numbers cannot drift.
from ._codes import *  # noqa: E402,F401,F403
from ._codes import NAMES as RESULT_NAMES, TEXTS as RESULT_TEXTS  # noqa: E402

TARGET_WORKER, TARGET_ALL, TARGET_OTHERS = 0, 1, 2


class ShmclusterError(Exception):
    """A call into libshmcluster failed: ``code`` is the shmc_result."""

    def __init__(self, code, message):
        super().__init__(f"{message} (shmc_result {code})")
        self.code = code


class NoHandler(ShmclusterError):
    """No worker has (or the target has no) handler for the event."""


class HandlerFailed(ShmclusterError):
    """The handler failed (its error, a panic, an undecodable payload)."""


class WorkerDied(ShmclusterError):
    """The target worker died before answering."""


class TimedOut(ShmclusterError):
    """The deadline passed."""


class WorkerClosed(ShmclusterError):
    """The worker behind a handle has been closed."""


class LockError(ShmclusterError):
    """A synchronize lock could not be taken (name, table, deadlock, timeout)."""


class NoLeader(ShmclusterError):
    """No leader was elected in time."""


class LeaderDied(ShmclusterError):
    """The leader died before answering."""


class HostUnreachable(ShmclusterError):
    """Another host cannot be reached: this host has no NATS bridge (the
    master was not started with ``--nats``), the host is not connected, or
    no worker serves the slot there."""


_CLASSES = {
    NO_HANDLER: NoHandler, HANDLER_FAILED: HandlerFailed, WORKER_DIED: WorkerDied,
    TIMED_OUT: TimedOut, NO_LEADER: NoLeader, LEADER_DIED: LeaderDied,
    WORKER_CLOSED: WorkerClosed, HOST_UNREACHABLE: HostUnreachable,
}


def _find_library():
    env = os.environ.get("SHMCLUSTER_LIB")
    if env:
        return env
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.abspath(os.path.join(here, "..", "..", ".."))
    for profile in ("release", "debug"):
        for target in (os.environ.get("CARGO_TARGET_DIR"), os.path.join(root, "target")):
            if target:
                path = os.path.join(target, profile, "libshmcluster.so")
                if os.path.exists(path):
                    return path
    return "libshmcluster.so"


class _Message(ctypes.Structure):
    _fields_ = [
        ("sender_slot", ctypes.c_uint32), ("sender_generation", ctypes.c_uint32),
        ("event", ctypes.c_void_p), ("event_len", ctypes.c_size_t),
        ("data", ctypes.c_void_p), ("len", ctypes.c_size_t),
        ("delivery_id", ctypes.c_uint64), ("kind", ctypes.c_uint32),
    ]


class _Section(ctypes.Structure):
    _fields_ = [("previous_owner_died", ctypes.c_bool), ("fencing_token", ctypes.c_uint64)]


class _Consumed(ctypes.Structure):
    _fields_ = [
        ("slot", ctypes.c_uint32), ("generation", ctypes.c_uint32),
        ("delivery_id", ctypes.c_uint64), ("attempts", ctypes.c_uint32),
    ]


class _MapEntry(ctypes.Structure):
    _fields_ = [
        ("slot", ctypes.c_uint32), ("generation", ctypes.c_uint32), ("status", ctypes.c_uint32),
        ("data", ctypes.c_void_p), ("len", ctypes.c_size_t),
    ]


class _Identity(ctypes.Structure):
    _fields_ = [
        ("slot", ctypes.c_uint32), ("generation", ctypes.c_uint32), ("index", ctypes.c_uint32),
        ("instances", ctypes.c_uint32), ("slots", ctypes.c_uint32), ("has_master", ctypes.c_bool),
    ]


_HANDLER = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.POINTER(_Message), ctypes.c_void_p)
_SECTION = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.POINTER(_Section))
_ASYNC = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.POINTER(_Message), ctypes.c_void_p)

_lib = None


def load_library(path=None):
    """Loads libshmcluster (``SHMCLUSTER_LIB``, the workspace's target dir, or
    the loader's search path) and checks its ABI version."""
    global _lib
    if _lib is not None and path is None:
        return _lib
    lib = ctypes.CDLL(path or _find_library())
    P, U32, U64, SZ = ctypes.c_void_p, ctypes.c_uint32, ctypes.c_uint64, ctypes.c_size_t
    sig = {
        "shmc_abi_version": ([], U32),
        "shmc_check_abi_version": ([U32], U32),
        "shmc_error_string": ([U32, ctypes.c_char_p, SZ, ctypes.POINTER(SZ)], U32),
        "shmc_result_codes": ([ctypes.POINTER(U32), SZ, ctypes.POINTER(SZ)], U32),
        "shmc_result_name": ([U32, ctypes.c_char_p, SZ, ctypes.POINTER(SZ)], U32),
        "shmc_last_error_message": ([ctypes.c_char_p, SZ, ctypes.POINTER(SZ)], U32),
        "shmc_segment_create": ([U32, ctypes.POINTER(P)], U32),
        "shmc_segment_free": ([P], None),
        "shmc_worker_from_env": ([ctypes.POINTER(P)], U32),
        "shmc_worker_attach": ([P, U32, ctypes.POINTER(P)], U32),
        "shmc_worker_attach_fd": None,
        "shmc_worker_free": ([P], U32),
        "shmc_identity_get": ([P, ctypes.POINTER(_Identity)], U32),
        "shmc_ready": ([P], U32),
        "shmc_wait_all_ready": ([P, U64, ctypes.POINTER(ctypes.c_bool)], U32),
        "shmc_should_stop": ([P], ctypes.c_bool),
        "shmc_request_shutdown": ([P], U32),
        "shmc_request_reload": ([P], U32),
        "shmc_on": ([P, ctypes.c_char_p, _HANDLER, P, ctypes.POINTER(U64)], U32),
        "shmc_off": ([P, ctypes.c_char_p, ctypes.POINTER(SZ)], U32),
        "shmc_on_request": ([P, ctypes.c_char_p, _ASYNC, P, ctypes.POINTER(U64)], U32),
        "shmc_reply_send": ([P, ctypes.c_char_p, SZ], U32),
        "shmc_reply_fail": ([P, ctypes.c_char_p], U32),
        "shmc_reply_free": ([P], None),
        "shmc_emit": ([P, U32, U32, ctypes.c_char_p, ctypes.c_char_p, SZ, ctypes.POINTER(SZ)], U32),
        "shmc_broadcast": ([P, ctypes.c_char_p, ctypes.c_char_p, SZ, ctypes.POINTER(SZ)], U32),
        "shmc_request": ([P, U32, ctypes.c_char_p, ctypes.c_char_p, SZ, U64, ctypes.POINTER(P)], U32),
        "shmc_request_at": ([P, ctypes.c_char_p, U32, ctypes.c_char_p, ctypes.c_char_p, SZ, U64, ctypes.POINTER(P)], U32),
        "shmc_emit_at": ([P, ctypes.c_char_p, U32, ctypes.c_char_p, ctypes.c_char_p, SZ], U32),
        "shmc_map_result_host": ([P, SZ, ctypes.c_char_p, SZ, ctypes.POINTER(SZ)], U32),
        "shmc_consume": ([P, ctypes.c_char_p, ctypes.c_char_p, SZ, U64, ctypes.POINTER(_Consumed)], U32),
        "shmc_map": ([P, ctypes.c_char_p, ctypes.c_char_p, SZ, U64, ctypes.POINTER(P)], U32),
        "shmc_map_result_len": ([P], SZ),
        "shmc_map_result_get": ([P, SZ, ctypes.POINTER(_MapEntry)], U32),
        "shmc_map_result_free": ([P], None),
        "shmc_bytes_data": ([P], P),
        "shmc_bytes_len": ([P], SZ),
        "shmc_bytes_free": ([P], None),
        "shmc_poll": ([P, U64, ctypes.POINTER(SZ)], U32),
        "shmc_dispatch": ([P, ctypes.POINTER(SZ)], U32),
        "shmc_synchronize": ([P, ctypes.c_char_p, U64, _SECTION, P], U32),
        "shmc_lock_acquire": ([P, ctypes.c_char_p, U64, ctypes.POINTER(P)], U32),
        "shmc_lock_previous_owner_died": ([P], ctypes.c_bool),
        "shmc_lock_fencing_token": ([P], U64),
        "shmc_unlock": ([P], U32),
        "shmc_campaign": ([P, ctypes.c_char_p], U32),
        "shmc_is_leader": None,
        "shmc_invoke": ([P, ctypes.c_char_p, ctypes.c_char_p, SZ, U64, ctypes.POINTER(P)], U32),
        "shmc_publish": ([P, ctypes.c_char_p, ctypes.c_char_p, SZ, U64], U32),
        "shmc_subscribe": ([P, ctypes.c_char_p, U64, _HANDLER, P], U32),
        "shmc_listener_count": ([P, ctypes.POINTER(SZ)], U32),
        "shmc_listener_name": ([P, SZ, ctypes.c_char_p, SZ, ctypes.POINTER(SZ)], U32),
        "shmc_listener_take": ([P, SZ, ctypes.POINTER(ctypes.c_int32)], U32),
        "shmc_worker_accept": ([P, ctypes.c_int32, U64, ctypes.POINTER(ctypes.c_int32)], U32),
        "shmc_worker_handle": ([P, ctypes.POINTER(P)], U32),
        "shmc_handle_free": ([P], None),
        "shmc_handle_emit": ([P, U32, U32, ctypes.c_char_p, ctypes.c_char_p, SZ], U32),
        "shmc_handle_broadcast": ([P, ctypes.c_char_p, ctypes.c_char_p, SZ], U32),
        "shmc_handle_request": ([P, U32, ctypes.c_char_p, ctypes.c_char_p, SZ, U64, ctypes.POINTER(P)], U32),
        "shmc_handle_request_at": ([P, ctypes.c_char_p, U32, ctypes.c_char_p, ctypes.c_char_p, SZ, U64, ctypes.POINTER(P)], U32),
        "shmc_handle_emit_at": ([P, ctypes.c_char_p, U32, ctypes.c_char_p, ctypes.c_char_p, SZ], U32),
        "shmc_handle_map": ([P, ctypes.c_char_p, ctypes.c_char_p, SZ, U64, ctypes.POINTER(P)], U32),
        "shmc_handle_consume": ([P, ctypes.c_char_p, ctypes.c_char_p, SZ, U64, ctypes.POINTER(_Consumed)], U32),
        "shmc_handle_invoke": ([P, ctypes.c_char_p, ctypes.c_char_p, SZ, U64, ctypes.POINTER(P)], U32),
        "shmc_handle_publish": ([P, ctypes.c_char_p, ctypes.c_char_p, SZ, U64], U32),
    }
    for name, s in sig.items():
        fn = getattr(lib, name)
        if s is not None:
            fn.argtypes, fn.restype = s
    version = lib.shmc_abi_version()
    if version != ABI_VERSION:
        raise ShmclusterError(9, f"libshmcluster has ABI version {version}, this binding expects {ABI_VERSION}")
    if path is None:
        _lib = lib
    return lib


def _check(code, what):
    if code == OK:
        return
    lib = load_library()
    buf = ctypes.create_string_buffer(512)
    n = ctypes.c_size_t()
    lib.shmc_last_error_message(buf, len(buf), ctypes.byref(n))
    detail = buf.raw[: min(n.value, len(buf))].decode("utf-8", "replace").rstrip("\0")
    if not detail:
        lib.shmc_error_string(code, buf, len(buf), ctypes.byref(n))
        detail = buf.raw[: min(n.value, len(buf))].decode("utf-8", "replace").rstrip("\0")
    cls = _CLASSES.get(code, LockError if 300 <= code < 306 else ShmclusterError)
    raise cls(code, f"{what}: {detail}")


def _ms(timeout):
    return WAIT_FOREVER if timeout is None else max(0, int(timeout * 1000))


def _take_bytes(ptr):
    lib = load_library()
    try:
        n = lib.shmc_bytes_len(ptr)
        data = lib.shmc_bytes_data(ptr)
        return ctypes.string_at(data, n) if n else b""
    finally:
        lib.shmc_bytes_free(ptr)


class Segment:
    """A new shared-memory segment with ``workers`` slots (for tests and
    single-process programs; a cluster's master makes its own)."""

    def __init__(self, workers):
        lib = load_library()
        out = ctypes.c_void_p()
        _check(lib.shmc_segment_create(workers, ctypes.byref(out)), "segment_create")
        self._ptr = out

    def worker(self, slot):
        """Attaches a :class:`Worker` to ``slot``."""
        return Worker._attach(self, slot)

    def close(self):
        if self._ptr:
            load_library().shmc_segment_free(self._ptr)
            self._ptr = None

    def __del__(self):
        self.close()


class Lock:
    """A held lock (:meth:`Worker.lock`): a context manager; unlock on the
    thread that took it."""

    def __init__(self, ptr):
        self._ptr = ptr
        lib = load_library()
        self.previous_owner_died = bool(lib.shmc_lock_previous_owner_died(ptr))
        self.fencing_token = int(lib.shmc_lock_fencing_token(ptr))

    def unlock(self):
        if self._ptr:
            ptr, self._ptr = self._ptr, None
            _check(load_library().shmc_unlock(ptr), "unlock")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.unlock()
        return False


def _entry_host(lib, out, i):
    """The name of the host map entry ``i`` came from ("" for this host)."""
    buf = ctypes.create_string_buffer(65)  # host names are 1 to 64 bytes
    n = ctypes.c_size_t()
    _check(lib.shmc_map_result_host(out, i, buf, len(buf), ctypes.byref(n)), "map_result_host")
    return buf.value.decode("utf-8", "replace")


def _map_entries(out, hosts=False):
    """Reads and frees a shmc_map_result: (slot, bytes) or (slot, exception);
    with ``hosts``, (host, slot, bytes or exception), ``host`` "" for this
    host's workers."""
    lib = load_library()
    try:
        entries = []
        for i in range(lib.shmc_map_result_len(out)):
            e = _MapEntry()
            _check(lib.shmc_map_result_get(out, i, ctypes.byref(e)), "map_result_get")
            body = ctypes.string_at(e.data, e.len) if e.len else b""
            if e.status != OK:
                cls = _CLASSES.get(e.status, ShmclusterError)
                body = cls(e.status, body.decode("utf-8", "replace"))
            entries.append((_entry_host(lib, out, i), e.slot, body) if hosts else (e.slot, body))
        return entries
    finally:
        lib.shmc_map_result_free(out)


class Handle:
    """A thread-safe handle on a :class:`Worker` (:meth:`Worker.handle`):
    any thread may call it, several at once. Its calls are run by the thread
    that drives the worker (``run``/``poll``), one at a time, so that thread
    must be serving; a call from inside one of the worker's own handlers
    raises (``IN_HANDLER``). After the worker is closed its calls raise
    ``WORKER_CLOSED``. Not usable in a forked child."""

    def __init__(self, worker_ptr):
        lib = load_library()
        out = ctypes.c_void_p()
        _check(lib.shmc_worker_handle(worker_ptr, ctypes.byref(out)), "worker_handle")
        self._ptr = out

    def close(self):
        if self._ptr:
            ptr, self._ptr = self._ptr, None
            load_library().shmc_handle_free(ptr)

    def __del__(self):
        self.close()

    def emit(self, slot, event, data=b""):
        """Emits ``event`` to worker ``slot``; fire and forget (sent by the
        worker's thread at its next poll)."""
        self._emit(TARGET_WORKER, slot, event, data)

    def emit_all(self, event, data=b""):
        self._emit(TARGET_ALL, 0, event, data)

    def emit_others(self, event, data=b""):
        self._emit(TARGET_OTHERS, 0, event, data)

    def _emit(self, kind, slot, event, data):
        _check(load_library().shmc_handle_emit(self._ptr, kind, slot, event.encode(), data, len(data)), "handle_emit")

    def broadcast(self, event, data=b""):
        """Every live worker, this one included, runs its handlers."""
        _check(load_library().shmc_handle_broadcast(self._ptr, event.encode(), data, len(data)), "handle_broadcast")

    def request(self, slot, event, data=b"", timeout=10.0):
        out = ctypes.c_void_p()
        _check(load_library().shmc_handle_request(self._ptr, slot, event.encode(), data, len(data), _ms(timeout), ctypes.byref(out)), "handle_request")
        return _take_bytes(out)

    def request_at(self, host, slot, event, data=b"", timeout=10.0):
        """:meth:`Worker.request_at` from any thread."""
        out = ctypes.c_void_p()
        _check(load_library().shmc_handle_request_at(self._ptr, host.encode(), slot, event.encode(), data, len(data), _ms(timeout), ctypes.byref(out)), "handle_request_at")
        return _take_bytes(out)

    def emit_at(self, host, slot, event, data=b""):
        """:meth:`Worker.emit_at` from any thread: fire and forget (sent by
        the worker's thread at its next poll; a missing bridge drops it)."""
        _check(load_library().shmc_handle_emit_at(self._ptr, host.encode(), slot, event.encode(), data, len(data)), "handle_emit_at")

    def map(self, event, data=b"", timeout=10.0, hosts=False):
        """One entry per live worker: (slot, bytes) or (slot, exception);
        with ``hosts``, (host, slot, ...) as :meth:`Worker.map`."""
        out = ctypes.c_void_p()
        _check(load_library().shmc_handle_map(self._ptr, event.encode(), data, len(data), _ms(timeout), ctypes.byref(out)), "handle_map")
        return _map_entries(out, hosts)

    def consume(self, event, data=b"", timeout=10.0):
        """(slot, delivery id, attempts), as :meth:`Worker.consume`."""
        c = _Consumed()
        _check(load_library().shmc_handle_consume(self._ptr, event.encode(), data, len(data), _ms(timeout), ctypes.byref(c)), "handle_consume")
        return (c.slot, c.delivery_id, c.attempts)

    def invoke(self, method, data=b"", timeout=10.0):
        out = ctypes.c_void_p()
        _check(load_library().shmc_handle_invoke(self._ptr, method.encode(), data, len(data), _ms(timeout), ctypes.byref(out)), "handle_invoke")
        return _take_bytes(out)

    def publish(self, topic, data, timeout=10.0):
        _check(load_library().shmc_handle_publish(self._ptr, topic.encode(), data, len(data), _ms(timeout)), "handle_publish")


class Message:
    """What a handler gets: the sender and the payload (copied)."""

    def __init__(self, m):
        self.sender_slot = m.sender_slot
        self.sender_generation = m.sender_generation
        self.event = ctypes.string_at(m.event, m.event_len).decode("utf-8") if m.event_len else ""
        self.data = ctypes.string_at(m.data, m.len) if m.len else b""
        self.delivery_id = m.delivery_id

    def json(self):
        return json.loads(self.data.decode("utf-8"))


class Worker:
    """One worker: its slot's messaging, locks and leader calls."""

    def __init__(self, ptr, segment=None):
        self._ptr = ptr
        self._segment = segment  # keeps a test segment alive
        self._callbacks = []  # ctypes callbacks must outlive their registration
        self._handle = None
        self._handle_lock = threading.Lock()
        self._runner = None  # the thread in run(), if any
        # Read once: a handler must not call back into the worker that runs it.
        ident = self.identity()
        # The lock table, for lock() while another thread drives the worker.
        from . import _evloop
        self._lock_table_lib = _evloop.lib()
        table = ctypes.c_void_p()
        ok = self._lock_table_lib.shmc_worker_locks(ptr, ctypes.byref(table)) == OK
        self._lock_table = table if ok else None
        self.slot = ident.slot
        self.generation = ident.generation
        self.index = ident.index
        self.instances = ident.instances

    @classmethod
    def from_env(cls):
        """Attaches a worker spawned by ``shmcluster run`` (or a Rust master)
        from ``SHMCLUSTER_FD`` and the rest of its environment."""
        lib = load_library()
        out = ctypes.c_void_p()
        _check(lib.shmc_worker_from_env(ctypes.byref(out)), "worker_from_env")
        return cls(out)

    @classmethod
    def _attach(cls, segment, slot):
        lib = load_library()
        out = ctypes.c_void_p()
        _check(lib.shmc_worker_attach(segment._ptr, slot, ctypes.byref(out)), "worker_attach")
        return cls(out, segment)

    def close(self):
        if self._ptr:
            ptr, self._ptr = self._ptr, None
            load_library().shmc_worker_free(ptr)
        if getattr(self, "_lock_table", None) is not None:
            table, self._lock_table = self._lock_table, None
            self._lock_table_lib.shmc_locks_free(table)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def handle(self):
        """This worker's thread-safe :class:`Handle`, for other threads (made
        once, shared)."""
        with self._handle_lock:
            if self._handle is None:
                self._handle = Handle(self._ptr)
            return self._handle

    # identity --------------------------------------------------------
    def identity(self):
        ident = _Identity()
        _check(load_library().shmc_identity_get(self._ptr, ctypes.byref(ident)), "identity")
        return ident

    def ready(self):
        _check(load_library().shmc_ready(self._ptr), "ready")

    def wait_all_ready(self, timeout=10.0):
        ok = ctypes.c_bool()
        _check(load_library().shmc_wait_all_ready(self._ptr, _ms(timeout), ctypes.byref(ok)), "wait_all_ready")
        return bool(ok.value)

    def should_stop(self):
        return bool(load_library().shmc_should_stop(self._ptr))

    def request_shutdown(self):
        _check(load_library().shmc_request_shutdown(self._ptr), "request_shutdown")

    def request_reload(self):
        _check(load_library().shmc_request_reload(self._ptr), "request_reload")

    # handlers --------------------------------------------------------
    def on(self, event, handler=None):
        """Registers ``handler(message) -> bytes | None`` for ``event``; usable
        as a decorator (``@worker.on("event")``). Its return value answers a
        request or map; an exception answers ``HandlerFailed``."""

        def register(fn):
            def trampoline(_userdata, message, reply):
                lib = load_library()
                try:
                    out = fn(Message(message.contents))
                    if out is None:
                        out = b""
                    elif isinstance(out, str):
                        out = out.encode("utf-8")
                    lib.shmc_reply_send(reply, out, len(out))
                except Exception as e:  # a handler's failure goes to the caller
                    lib.shmc_reply_fail(reply, str(e).encode("utf-8", "replace"))

            cb = _ASYNC(trampoline)
            self._callbacks.append(cb)
            hid = ctypes.c_uint64()
            _check(load_library().shmc_on_request(self._ptr, event.encode(), cb, None, ctypes.byref(hid)), "on")
            return fn

        return register(handler) if handler is not None else register

    def off(self, event):
        n = ctypes.c_size_t()
        _check(load_library().shmc_off(self._ptr, event.encode(), ctypes.byref(n)), "off")
        return n.value

    def take_listeners(self):
        """The listening sockets the master handed this worker, as
        ``(name, socket.socket)`` pairs (taken once; the caller owns them)."""
        lib = load_library()
        count = ctypes.c_size_t()
        _check(lib.shmc_listener_count(self._ptr, ctypes.byref(count)), "listener_count")
        out = []
        for i in range(count.value):
            buf = ctypes.create_string_buffer(256)
            n = ctypes.c_size_t()
            _check(lib.shmc_listener_name(self._ptr, i, buf, len(buf), ctypes.byref(n)), "listener_name")
            fd = ctypes.c_int32()
            _check(lib.shmc_listener_take(self._ptr, i, ctypes.byref(fd)), "listener_take")
            name = buf.raw[: min(n.value, len(buf))].decode("utf-8", "replace").rstrip("\0")
            out.append((name, socket.socket(fileno=fd.value)))
        return out

    def accept(self, sock, timeout=None):
        """Accepts a connection on the listening socket ``sock`` (from
        :meth:`take_listeners`): a new ``socket.socket``, or ``None`` once the
        master tells this worker to stop (a reload's drain, a shutdown,
        SIGTERM): finish the connections you have and exit. Raises
        :class:`TimedOut` after ``timeout`` seconds (``None``: no limit).
        Any thread, also while another runs :meth:`run`.

        It makes ``sock`` non-blocking (workers sharing it race for each
        connection). ``O_NONBLOCK`` is a flag of the open file description,
        which every worker given the listener shares: they all see it, so on
        a shared listener accept only through this (or handle
        ``BlockingIOError`` from ``sock.accept()``). Connections that failed
        before they were accepted (``ECONNABORTED``, ``EPROTO``, ...) are
        skipped, and running out of descriptors or memory (``EMFILE``,
        ``ENFILE``, ``ENOBUFS``, ``ENOMEM``) pauses 10-100 ms and tries again
        instead of raising. It does not beat the worker's heartbeat:
        :meth:`run` (or :meth:`poll`) does, so a hung messaging thread is
        still seen by the master's hang timeout."""
        fd = ctypes.c_int32()
        code = load_library().shmc_worker_accept(self._ptr, sock.fileno(), _ms(timeout), ctypes.byref(fd))
        if code == STOPPING:
            return None
        _check(code, "accept")
        return socket.socket(fileno=fd.value)

    def incoming(self, sock):
        """``for conn in worker.incoming(sock):`` connections until the
        worker is told to stop (see :meth:`accept`)."""
        while True:
            conn = self.accept(sock)
            if conn is None:
                return
            yield conn

    # sending -----------------------------------------------------------
    def emit(self, slot, event, data=b""):
        """Emits ``event`` to worker ``slot`` (every handler runs there)."""
        return self._emit(TARGET_WORKER, slot, event, data)

    def emit_all(self, event, data=b""):
        return self._emit(TARGET_ALL, 0, event, data)

    def emit_others(self, event, data=b""):
        return self._emit(TARGET_OTHERS, 0, event, data)

    # The calls below, made while another thread drives this worker (it is
    # in run(), or BUSY), go through the worker's Handle: that thread runs
    # them.

    def _elsewhere(self):
        runner = self._runner
        return runner is not None and runner != threading.get_ident()

    def _emit(self, kind, slot, event, data):
        """The number of workers it went to (None when it was queued
        through the handle, which sends it later)."""
        if self._elsewhere():
            self.handle()._emit(kind, slot, event, data)
            return None
        sent = ctypes.c_size_t()
        code = load_library().shmc_emit(self._ptr, kind, slot, event.encode(), data, len(data), ctypes.byref(sent))
        if code == BUSY:
            self.handle()._emit(kind, slot, event, data)
            return None
        _check(code, "emit")
        return sent.value

    def broadcast(self, event, data=b""):
        """Every live worker, this one included, runs its handlers."""
        return self._emit(TARGET_ALL, 0, event, data)

    def request(self, slot, event, data=b"", timeout=10.0):
        if self._elsewhere():
            return self.handle().request(slot, event, data, timeout)
        out = ctypes.c_void_p()
        code = load_library().shmc_request(self._ptr, slot, event.encode(), data, len(data), _ms(timeout), ctypes.byref(out))
        if code == BUSY:
            return self.handle().request(slot, event, data, timeout)
        _check(code, "request")
        return _take_bytes(out)

    def request_at(self, host, slot, event, data=b"", timeout=10.0):
        """Asks the worker in ``slot`` of another host of the cluster
        (``host``: its ``--host-id``; the master runs with ``--nats``) to run
        its first handler for ``event`` with ``data``, and returns its
        answer (bytes) within ``timeout`` seconds (``None``: no limit).

        Raises :class:`HostUnreachable` at once if this host has no bridge,
        ``host`` is not connected or no worker serves ``slot`` there; the
        other errors as :meth:`request` (:class:`NoHandler`,
        :class:`HandlerFailed`, :class:`TimedOut`, ...). A handler of this
        worker cannot call it (it would wait on itself): do it from the
        thread that polls, after the handler returned."""
        if self._elsewhere():
            return self.handle().request_at(host, slot, event, data, timeout)
        out = ctypes.c_void_p()
        code = load_library().shmc_request_at(self._ptr, host.encode(), slot, event.encode(), data, len(data), _ms(timeout), ctypes.byref(out))
        if code == BUSY:
            return self.handle().request_at(host, slot, event, data, timeout)
        _check(code, "request_at")
        return _take_bytes(out)

    def emit_at(self, host, slot, event, data=b""):
        """Emits ``event`` with ``data`` to the worker in ``slot`` of another
        host (``host``: its ``--host-id``): fire and forget, as :meth:`emit`.
        A host that is not connected, or no worker in ``slot`` there, drops
        it. Raises :class:`HostUnreachable` if this host has no bridge or
        ``host`` is no host name (1 to 64 bytes)."""
        if self._elsewhere():
            self.handle().emit_at(host, slot, event, data)
            return
        code = load_library().shmc_emit_at(self._ptr, host.encode(), slot, event.encode(), data, len(data))
        if code == BUSY:
            self.handle().emit_at(host, slot, event, data)
            return
        _check(code, "emit_at")

    def consume(self, event, data=b"", timeout=10.0):
        """Runs the task on exactly one live worker with a handler; returns
        (slot, delivery id, attempts)."""
        if self._elsewhere():
            return self.handle().consume(event, data, timeout)
        c = _Consumed()
        code = load_library().shmc_consume(self._ptr, event.encode(), data, len(data), _ms(timeout), ctypes.byref(c))
        if code == BUSY:
            return self.handle().consume(event, data, timeout)
        _check(code, "consume")
        return (c.slot, c.delivery_id, c.attempts)

    def map(self, event, data=b"", timeout=10.0, hosts=False):
        """One entry per live worker: (slot, bytes) or (slot, exception).
        With ``--nats`` a map also reaches the other hosts' workers (after
        this host's), whose slots repeat this host's: ``hosts=True`` gives
        (host, slot, bytes or exception), ``host`` "" for this host's."""
        if self._elsewhere():
            return self.handle().map(event, data, timeout, hosts)
        out = ctypes.c_void_p()
        code = load_library().shmc_map(self._ptr, event.encode(), data, len(data), _ms(timeout), ctypes.byref(out))
        if code == BUSY:
            return self.handle().map(event, data, timeout, hosts)
        _check(code, "map")
        return _map_entries(out, hosts)

    def emit_json(self, slot, event, value):
        return self.emit(slot, event, json.dumps(value).encode())

    def request_json(self, slot, event, value, timeout=10.0):
        return json.loads(self.request(slot, event, json.dumps(value).encode(), timeout) or b"null")

    # driving -------------------------------------------------------------
    def poll(self, timeout=0.05):
        n = ctypes.c_size_t()
        _check(load_library().shmc_poll(self._ptr, _ms(timeout), ctypes.byref(n)), "poll")
        return n.value

    def run(self, until=None):
        """Serves until told to stop (or ``until()`` is true): runs the
        handlers, and the calls other threads make meanwhile (through
        :meth:`handle`, which this worker's own methods use for them while
        it runs)."""
        self._runner = threading.get_ident()
        try:
            while not self.should_stop() and not (until and until()):
                n = ctypes.c_size_t()
                code = load_library().shmc_poll(self._ptr, _ms(0.05), ctypes.byref(n))
                if code == BUSY:
                    # Another thread made a call on the worker itself: it
                    # dispatches until that returns.
                    time.sleep(0.001)
                    continue
                _check(code, "poll")
        finally:
            self._runner = None

    # locks ---------------------------------------------------------------
    @contextmanager
    def synchronize(self, name="", timeout=None):
        """``with worker.synchronize("name") as lock:`` — a critical section
        across processes; ``lock.previous_owner_died`` says whether the last
        holder died inside its section."""
        lock = self.lock(name, timeout)
        try:
            yield lock
        finally:
            lock.unlock()

    def lock(self, name="", timeout=None):
        out = ctypes.c_void_p()
        code = load_library().shmc_lock_acquire(self._ptr, name.encode(), _ms(timeout), ctypes.byref(out))
        if code == BUSY and self._lock_table is not None:
            # Another thread drives the worker (run()): take it through
            # the lock table, which any thread may use.
            code = self._lock_table_lib.shmc_locks_acquire(self._lock_table, name.encode(), _ms(timeout),
                                                           ctypes.byref(out))
        _check(code, "lock")
        return Lock(out)

    # leader ------------------------------------------------------------
    def campaign(self, role=""):
        _check(load_library().shmc_campaign(self._ptr, role.encode()), "campaign")

    def invoke(self, method, data=b"", timeout=10.0):
        if self._elsewhere():
            return self.handle().invoke(method, data, timeout)
        out = ctypes.c_void_p()
        code = load_library().shmc_invoke(self._ptr, method.encode(), data, len(data), _ms(timeout), ctypes.byref(out))
        if code == BUSY:
            return self.handle().invoke(method, data, timeout)
        _check(code, "invoke")
        return _take_bytes(out)

    def publish(self, topic, data, timeout=10.0):
        if self._elsewhere():
            return self.handle().publish(topic, data, timeout)
        code = load_library().shmc_publish(self._ptr, topic.encode(), data, len(data), _ms(timeout))
        if code == BUSY:
            return self.handle().publish(topic, data, timeout)
        _check(code, "publish")
