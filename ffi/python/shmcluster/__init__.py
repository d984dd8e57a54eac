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

The library: ``pip install`` bundles ``libshmcluster.so`` in this package
(and puts the ``shmcluster`` command on the PATH); ``SHMCLUSTER_LIB``
overrides it, and a source checkout falls back on cargo's target directory.
A library that cannot be found or does not match this binding raises
:class:`LibraryNotFound` / :class:`LibraryMismatch` (both
:class:`LibraryError`), saying what to do.
"""

from __future__ import annotations

import ctypes
import json
import os
import socket
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, List, NamedTuple, Optional, Tuple, TypeVar, Union, overload

__all__ = [
    "Segment", "Worker", "Handle", "Lock", "Message", "Identity", "Leader", "LeaderChange", "Event",
    "Events", "ShmclusterError", "NoHandler", "HandlerFailed",
    "WorkerDied", "TimedOut", "LockError", "WorkerClosed", "NoLeader", "LeaderDied", "HostUnreachable",
    "LibraryError", "LibraryNotFound", "LibraryMismatch",
    "WAIT_FOREVER",
    "ABI_VERSION", "load_library", "RESULT_NAMES", "RESULT_TEXTS",
]

ABI_VERSION = 1
WAIT_FOREVER = 2**64 - 1

#: What a handler may return: the answer's bytes (``str`` is sent as UTF-8;
#: ``None`` as no bytes).
Answer = Union[bytes, bytearray, str, None]
#: A handler: gets the :class:`Message`, returns its :data:`Answer`.
Handler = Callable[["Message"], Answer]
_F = TypeVar("_F", bound=Callable[..., Any])

# Result codes: every SHMC_RESULT_* of the C header as a module constant
# (OK, NO_HANDLER, ...), RESULT_NAMES and RESULT_TEXTS. _codes.py is
# generated from the library's one definition (ffi/src/result.rs) and
# checked against it by ffi/tests/python_codes.rs: the numbers cannot drift.
from ._codes import *  # noqa: E402,F401,F403
from ._codes import NAMES as RESULT_NAMES, TEXTS as RESULT_TEXTS  # noqa: E402

TARGET_WORKER, TARGET_ALL, TARGET_OTHERS = 0, 1, 2


class ShmclusterError(Exception):
    """A call into libshmcluster failed: ``code`` is the shmc_result (``None``
    for a :class:`LibraryNotFound`, which no call returned)."""

    code: Optional[int]

    def __init__(self, code: Optional[int], message: str) -> None:
        super().__init__(message if code is None else f"{message} (shmc_result {code})")
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


class LibraryError(ShmclusterError):
    """libshmcluster cannot be used: not found, not loadable, or not the
    library this binding was written for. The message says what to do."""


class LibraryNotFound(LibraryError):
    """No libshmcluster.so where this package looks (``SHMCLUSTER_LIB``, the
    copy bundled by ``pip install``, a source checkout's ``target/``), or
    the file there cannot be loaded."""


class LibraryMismatch(LibraryError):
    """The library loaded is not the one this binding was written for: a
    different ABI version, or a function missing (an older build).
    ``code`` is ``ABI_VERSION_MISMATCH``."""


_CLASSES = {
    NO_HANDLER: NoHandler, HANDLER_FAILED: HandlerFailed, WORKER_DIED: WorkerDied,
    TIMED_OUT: TimedOut, NO_LEADER: NoLeader, LEADER_DIED: LeaderDied,
    WORKER_CLOSED: WorkerClosed, HOST_UNREACHABLE: HostUnreachable,
}


_HERE = os.path.dirname(os.path.abspath(__file__))
#: Where ``pip install`` puts the library: inside this package.
BUNDLED_LIBRARY = os.path.join(_HERE, "libshmcluster.so")

_REINSTALL = (
    "reinstall the package (pip install --force-reinstall <checkout>/ffi/python), "
    "or set SHMCLUSTER_LIB to a libshmcluster.so built from the same checkout "
    "(cargo build --release -p shmcluster-ffi)"
)


def _find_library() -> str:
    """The path of the library to load: ``SHMCLUSTER_LIB``, the bundled
    copy, (a source checkout, not installed) cargo's target directory, or
    the dynamic loader's search path."""
    env = os.environ.get("SHMCLUSTER_LIB")
    if env:
        if not os.path.exists(env):
            raise LibraryNotFound(
                None,
                f"SHMCLUSTER_LIB is {env!r}, which does not exist: unset it to use the library "
                f"bundled with this package, or point it to a libshmcluster.so "
                f"(cargo build --release -p shmcluster-ffi)",
            )
        return env
    if os.path.exists(BUNDLED_LIBRARY):
        return BUNDLED_LIBRARY
    # A source checkout (ffi/python/shmcluster): the workspace's target/.
    root = os.path.abspath(os.path.join(_HERE, "..", "..", ".."))
    checkout = os.path.exists(os.path.join(root, "ffi", "Cargo.toml"))
    looked = [BUNDLED_LIBRARY]
    found = []
    for profile in ("release", "debug"):
        for target in (os.environ.get("CARGO_TARGET_DIR"), os.path.join(root, "target") if checkout else None):
            if target:
                path = os.path.join(target, profile, "libshmcluster.so")
                looked.append(path)
                if os.path.exists(path):
                    found.append(path)
    if found:
        # The newest build: a release library left from an earlier build
        # must not shadow the debug one just built (or the reverse).
        return max(found, key=lambda p: os.stat(p).st_mtime_ns)
    # Last, the dynamic loader's search path (a system-wide install).
    try:
        ctypes.CDLL("libshmcluster.so")
        return "libshmcluster.so"
    except OSError:
        pass
    raise LibraryNotFound(
        None,
        "libshmcluster.so not found (looked at " + ", ".join(looked)
        + " and the dynamic loader's search path): " + _REINSTALL,
    )


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


class _LeaderChange(ctypes.Structure):
    _fields_ = [("slot", ctypes.c_uint32), ("term", ctypes.c_uint64), ("is_me", ctypes.c_bool)]


class _Event(ctypes.Structure):
    _fields_ = [
        ("seq", ctypes.c_uint64), ("kind", ctypes.c_uint32), ("reason", ctypes.c_uint32),
        ("value", ctypes.c_int32), ("slot", ctypes.c_uint32), ("index", ctypes.c_uint32),
        ("pid", ctypes.c_uint32), ("generation", ctypes.c_uint32),
    ]


_HANDLER = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.POINTER(_Message), ctypes.c_void_p)
# shmc_handler_fn with a shmc_response (shmc_on_invoke, shmc_subscribe).
_SYNC = _HANDLER
_LEADER_CHANGE = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.POINTER(_LeaderChange))
_SECTION = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.POINTER(_Section))
_ASYNC = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.POINTER(_Message), ctypes.c_void_p)

_lib: Optional[ctypes.CDLL] = None
_lib_lock = threading.Lock()


def load_library(path: Optional[str] = None) -> ctypes.CDLL:
    """Loads libshmcluster once (``path``, else ``SHMCLUSTER_LIB``, else the
    copy ``pip install`` bundled in this package, else a source checkout's
    ``target/``) and checks that it is the library this binding speaks to:
    its ABI version and every function the binding calls.

    Raises :class:`LibraryNotFound` (no library there, or not loadable) or
    :class:`LibraryMismatch` (another ABI version, a function missing)."""
    global _lib
    if _lib is not None and path is None:
        return _lib
    with _lib_lock:
        if _lib is not None and path is None:
            return _lib
        lib = _open(path or _find_library())
        if path is None:
            _lib = lib
        return lib


def _open(path: str) -> ctypes.CDLL:
    try:
        lib = ctypes.CDLL(path)
    except OSError as e:
        raise LibraryNotFound(None, f"cannot load {path}: {e}: {_REINSTALL}") from e
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
        "shmc_is_leader": ([P, ctypes.c_char_p, ctypes.POINTER(ctypes.c_bool)], U32),
        "shmc_leader": ([P, ctypes.c_char_p, ctypes.POINTER(U32), ctypes.POINTER(U64)], U32),
        "shmc_on_invoke": ([P, ctypes.c_char_p, _SYNC, P, ctypes.POINTER(U64)], U32),
        "shmc_response_set": ([P, ctypes.c_char_p, SZ], U32),
        "shmc_response_fail": ([P, ctypes.c_char_p], U32),
        "shmc_on_leader_change": ([P, _LEADER_CHANGE, P], U32),
        "shmc_events_new": ([P, ctypes.POINTER(P)], U32),
        "shmc_events_next": ([P, U64, ctypes.POINTER(_Event)], U32),
        "shmc_events_missed": ([P, ctypes.POINTER(U64)], U32),
        "shmc_events_free": ([P], None),
        "shmc_event_format": ([ctypes.POINTER(_Event), ctypes.c_char_p, SZ, ctypes.POINTER(SZ)], U32),
        "shmc_event_kind_name": ([U32, ctypes.c_char_p, SZ, ctypes.POINTER(SZ)], U32),
        "shmc_exit_reason_name": ([U32, ctypes.c_char_p, SZ, ctypes.POINTER(SZ)], U32),
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
    try:
        version_fn = lib.shmc_abi_version
    except AttributeError as e:
        raise LibraryMismatch(ABI_VERSION_MISMATCH, f"{path} is no libshmcluster (no shmc_abi_version): {_REINSTALL}") from e
    version_fn.argtypes, version_fn.restype = [], U32
    version = version_fn()
    if version != ABI_VERSION:
        raise LibraryMismatch(
            ABI_VERSION_MISMATCH,
            f"{path} has ABI version {version}, this binding speaks version {ABI_VERSION}: {_REINSTALL}",
        )
    missing = [name for name in sig if not hasattr(lib, name)]
    if missing:
        raise LibraryMismatch(
            ABI_VERSION_MISMATCH,
            f"{path} lacks {', '.join(missing)} (a build older than this binding): {_REINSTALL}",
        )
    for name, s in sig.items():
        if s is not None:
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = s
    return lib


def _check(code: int, what: str) -> None:
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


def _ms(timeout: Optional[float]) -> int:
    return WAIT_FOREVER if timeout is None else max(0, int(timeout * 1000))


def _answer(out: Answer) -> bytes:
    """A handler's return value as the bytes sent back."""
    if out is None:
        return b""
    if isinstance(out, str):
        return out.encode("utf-8")
    return bytes(out)


def _take_bytes(ptr: ctypes.c_void_p) -> bytes:
    lib = load_library()
    try:
        n = lib.shmc_bytes_len(ptr)
        data = lib.shmc_bytes_data(ptr)
        return ctypes.string_at(data, n) if n else b""
    finally:
        lib.shmc_bytes_free(ptr)


class Segment:
    """A new shared-memory segment with ``workers`` slots (for tests and
    single-process programs; a cluster's master makes its own).
    ``with Segment(2) as seg:`` frees it at the end (its workers keep their
    own mapping)."""

    _ptr: Optional[ctypes.c_void_p] = None

    def __init__(self, workers: int) -> None:
        lib = load_library()
        out = ctypes.c_void_p()
        _check(lib.shmc_segment_create(workers, ctypes.byref(out)), "segment_create")
        self._ptr = out

    def worker(self, slot: int) -> Worker:
        """Attaches a :class:`Worker` to ``slot``."""
        return Worker._attach(self, slot)

    def close(self) -> None:
        """Frees the segment handle (idempotent)."""
        if self._ptr:
            load_library().shmc_segment_free(self._ptr)
            self._ptr = None

    def __enter__(self) -> Segment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()


class Lock:
    """A held lock (:meth:`Worker.lock`): a context manager; unlock on the
    thread that took it."""

    _ptr: Optional[ctypes.c_void_p] = None

    def __init__(self, ptr: ctypes.c_void_p) -> None:
        self._ptr = ptr
        lib = load_library()
        self.previous_owner_died = bool(lib.shmc_lock_previous_owner_died(ptr))
        self.fencing_token = int(lib.shmc_lock_fencing_token(ptr))

    def unlock(self) -> None:
        if self._ptr:
            ptr, self._ptr = self._ptr, None
            _check(load_library().shmc_unlock(ptr), "unlock")

    def __enter__(self) -> Lock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.unlock()


def _entry_host(lib: ctypes.CDLL, out: ctypes.c_void_p, i: int) -> str:
    """The name of the host map entry ``i`` came from ("" for this host)."""
    buf = ctypes.create_string_buffer(65)  # host names are 1 to 64 bytes
    n = ctypes.c_size_t()
    _check(lib.shmc_map_result_host(out, i, buf, len(buf), ctypes.byref(n)), "map_result_host")
    return buf.value.decode("utf-8", "replace")


def _map_entries(out: ctypes.c_void_p, hosts: bool = False) -> List[Any]:
    """Reads and frees a shmc_map_result: (slot, bytes) or (slot, exception);
    with ``hosts``, (host, slot, bytes or exception), ``host`` "" for this
    host's workers."""
    lib = load_library()
    try:
        entries = []
        for i in range(lib.shmc_map_result_len(out)):
            e = _MapEntry()
            _check(lib.shmc_map_result_get(out, i, ctypes.byref(e)), "map_result_get")
            body: Any = ctypes.string_at(e.data, e.len) if e.len else b""
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

    _ptr: Optional[ctypes.c_void_p] = None

    def __init__(self, worker_ptr: Optional[ctypes.c_void_p]) -> None:
        lib = load_library()
        out = ctypes.c_void_p()
        _check(lib.shmc_worker_handle(worker_ptr, ctypes.byref(out)), "worker_handle")
        self._ptr = out

    def close(self) -> None:
        if self._ptr:
            ptr, self._ptr = self._ptr, None
            load_library().shmc_handle_free(ptr)

    def __enter__(self) -> Handle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()

    def emit(self, slot: int, event: str, data: bytes = b"") -> None:
        """Emits ``event`` to worker ``slot``; fire and forget (sent by the
        worker's thread at its next poll)."""
        self._emit(TARGET_WORKER, slot, event, data)

    def emit_all(self, event: str, data: bytes = b"") -> None:
        self._emit(TARGET_ALL, 0, event, data)

    def emit_others(self, event: str, data: bytes = b"") -> None:
        self._emit(TARGET_OTHERS, 0, event, data)

    def _emit(self, kind: int, slot: int, event: str, data: bytes) -> None:
        _check(load_library().shmc_handle_emit(self._ptr, kind, slot, event.encode(), data, len(data)), "handle_emit")

    def broadcast(self, event: str, data: bytes = b"") -> None:
        """Every live worker, this one included, runs its handlers."""
        _check(load_library().shmc_handle_broadcast(self._ptr, event.encode(), data, len(data)), "handle_broadcast")

    def request(self, slot: int, event: str, data: bytes = b"", timeout: Optional[float] = 10.0) -> bytes:
        out = ctypes.c_void_p()
        _check(load_library().shmc_handle_request(self._ptr, slot, event.encode(), data, len(data), _ms(timeout), ctypes.byref(out)), "handle_request")
        return _take_bytes(out)

    def request_at(self, host: str, slot: int, event: str, data: bytes = b"", timeout: Optional[float] = 10.0) -> bytes:
        """:meth:`Worker.request_at` from any thread."""
        out = ctypes.c_void_p()
        _check(load_library().shmc_handle_request_at(self._ptr, host.encode(), slot, event.encode(), data, len(data), _ms(timeout), ctypes.byref(out)), "handle_request_at")
        return _take_bytes(out)

    def emit_at(self, host: str, slot: int, event: str, data: bytes = b"") -> None:
        """:meth:`Worker.emit_at` from any thread: fire and forget (sent by
        the worker's thread at its next poll; a missing bridge drops it)."""
        _check(load_library().shmc_handle_emit_at(self._ptr, host.encode(), slot, event.encode(), data, len(data)), "handle_emit_at")

    def map(self, event: str, data: bytes = b"", timeout: Optional[float] = 10.0, hosts: bool = False) -> List[Any]:
        """One entry per live worker: (slot, bytes) or (slot, exception);
        with ``hosts``, (host, slot, ...) as :meth:`Worker.map`."""
        out = ctypes.c_void_p()
        _check(load_library().shmc_handle_map(self._ptr, event.encode(), data, len(data), _ms(timeout), ctypes.byref(out)), "handle_map")
        return _map_entries(out, hosts)

    def consume(self, event: str, data: bytes = b"", timeout: Optional[float] = 10.0) -> Tuple[int, int, int]:
        """(slot, delivery id, attempts), as :meth:`Worker.consume`."""
        c = _Consumed()
        _check(load_library().shmc_handle_consume(self._ptr, event.encode(), data, len(data), _ms(timeout), ctypes.byref(c)), "handle_consume")
        return (c.slot, c.delivery_id, c.attempts)

    def invoke(self, method: str, data: bytes = b"", timeout: Optional[float] = 10.0) -> bytes:
        out = ctypes.c_void_p()
        _check(load_library().shmc_handle_invoke(self._ptr, method.encode(), data, len(data), _ms(timeout), ctypes.byref(out)), "handle_invoke")
        return _take_bytes(out)

    def publish(self, topic: str, data: bytes, timeout: Optional[float] = 10.0) -> None:
        _check(load_library().shmc_handle_publish(self._ptr, topic.encode(), data, len(data), _ms(timeout)), "handle_publish")


@dataclass(frozen=True)
class Identity:
    """Who a worker is (:meth:`Worker.identity`)."""

    slot: int
    generation: int
    index: int
    instances: int
    slots: int
    has_master: bool


class Leader(NamedTuple):
    """The leader of a role (:meth:`Worker.leader`)."""

    slot: int
    term: int


class LeaderChange(NamedTuple):
    """A new leader of the default role (:meth:`Worker.on_leader_change`)."""

    slot: int
    term: int
    is_me: bool


_NONE32 = 2**32 - 1


def _name(fn: Any, number: int) -> str:
    buf = ctypes.create_string_buffer(64)
    if fn(number, buf, len(buf), None) != OK:
        return str(number)
    return buf.value.decode("ascii")


@dataclass(frozen=True)
class Event:
    """One event of the cluster's life, as the master published it
    (:meth:`Worker.events`). ``kind`` is the ``SHMC_EVENT_KIND_`` name without
    its prefix: ``"SPAWNED"``, ``"ONLINE"``, ``"EXIT"``, ``"CRASH_LOOP"``,
    ``"RELOAD_STARTED"``, ``"RELOAD_FINISHED"``, ``"SHUTDOWN_STARTED"``,
    ``"LOCK_HELD_TOO_LONG"``, ``"START_FAILED"``, ``"UPGRADE_STARTED"``,
    ``"UPGRADE_FINISHED"`` (a kind this library does not know:
    ``"UNKNOWN"``); ``reason`` why an ``"EXIT"`` happened (``"EXITED"``,
    ``"SIGNALED"``, ``"HUNG"``, ``"RELOADED"``, ``"SHUTDOWN"``,
    ``"NOT_READY"``, ``"LOCK_HELD"``), else ``None``; ``value`` the exit
    code, signal, errno, lock entry or new master's pid it names
    (``RELOAD_FINISHED``: 1 if it succeeded; ``UPGRADE_FINISHED``: the new
    master's pid, negated if it did not take over, so ``value > 0`` means
    success for both). ``slot`` and ``index`` are
    ``None`` for cluster-wide events, ``pid`` and ``generation`` 0 if none.
    ``str(event)`` is the line an operator reads."""

    seq: int
    kind: str
    reason: Optional[str]
    value: int
    slot: Optional[int]
    index: Optional[int]
    pid: int
    generation: int
    text: str = ""

    def __str__(self) -> str:
        return self.text

    @classmethod
    def _of(cls, e: _Event) -> Event:
        lib = load_library()
        buf = ctypes.create_string_buffer(256)
        n = ctypes.c_size_t()
        lib.shmc_event_format(ctypes.byref(e), buf, len(buf), ctypes.byref(n))
        return cls(
            seq=e.seq, kind=_name(lib.shmc_event_kind_name, e.kind),
            reason=_name(lib.shmc_exit_reason_name, e.reason) if e.reason else None,
            value=e.value, slot=None if e.slot == _NONE32 else e.slot,
            index=None if e.index == _NONE32 else e.index, pid=e.pid, generation=e.generation,
            text=buf.value.decode("utf-8", "replace"),
        )


class Events:
    """A reader of the master's events from the moment it was made
    (:meth:`Worker.events`); a worker without a master reads none. Any
    thread, independent of the worker's. ``for event in events:`` waits for
    each next one; ``with worker.events() as events:`` frees it at the end."""

    _ptr: Optional[ctypes.c_void_p] = None

    def __init__(self, worker_ptr: Optional[ctypes.c_void_p]) -> None:
        out = ctypes.c_void_p()
        _check(load_library().shmc_events_new(worker_ptr, ctypes.byref(out)), "events_new")
        self._ptr = out

    def next(self, timeout: Optional[float] = None) -> Optional[Event]:
        """The next event, waiting up to ``timeout`` seconds (``None``: no
        limit; 0: only look); ``None`` if none came in time."""
        if not self._ptr:
            raise ShmclusterError(NULL_ARGUMENT, "events: the reader is closed")
        e = _Event()
        code = load_library().shmc_events_next(self._ptr, _ms(timeout), ctypes.byref(e))
        if code == TIMED_OUT:
            return None
        _check(code, "events_next")
        return Event._of(e)

    @property
    def missed(self) -> int:
        """Events overwritten before this reader got to them (the log keeps
        the last 256)."""
        n = ctypes.c_uint64()
        _check(load_library().shmc_events_missed(self._ptr, ctypes.byref(n)), "events_missed")
        return n.value

    def __iter__(self) -> Iterator[Event]:
        while True:
            e = self.next()
            if e is not None:
                yield e

    def close(self) -> None:
        if self._ptr:
            ptr, self._ptr = self._ptr, None
            load_library().shmc_events_free(ptr)

    def __enter__(self) -> Events:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()


class Message:
    """What a handler gets: the sender and the payload (copied)."""

    sender_slot: int
    sender_generation: int
    event: str
    data: bytes
    delivery_id: int

    def __init__(self, m: _Message) -> None:
        self.sender_slot = m.sender_slot
        self.sender_generation = m.sender_generation
        self.event = ctypes.string_at(m.event, m.event_len).decode("utf-8") if m.event_len else ""
        self.data = ctypes.string_at(m.data, m.len) if m.len else b""
        self.delivery_id = m.delivery_id

    def json(self) -> Any:
        return json.loads(self.data.decode("utf-8"))


class Worker:
    """One worker: its slot's messaging, locks and leader calls."""

    _ptr: Optional[ctypes.c_void_p] = None

    def __init__(self, ptr: ctypes.c_void_p, segment: Optional[Segment] = None) -> None:
        self._ptr = ptr
        self._segment = segment  # keeps a test segment alive
        self._callbacks: List[Any] = []  # ctypes callbacks must outlive their registration
        self._handle: Optional[Handle] = None
        self._handle_lock = threading.Lock()
        self._runner: Optional[int] = None  # the thread in run(), if any
        # Run by close() before the handle is freed: an AsyncWorker driving
        # this worker stops using it (it holds the same pointer).
        self._before_close: List[Callable[[], None]] = []
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
    def from_env(cls) -> Worker:
        """Attaches a worker spawned by ``shmcluster run`` (or a Rust master)
        from ``SHMCLUSTER_FD`` and the rest of its environment."""
        lib = load_library()
        out = ctypes.c_void_p()
        _check(lib.shmc_worker_from_env(ctypes.byref(out)), "worker_from_env")
        return cls(out)

    @classmethod
    def _attach(cls, segment: Segment, slot: int) -> Worker:
        lib = load_library()
        out = ctypes.c_void_p()
        _check(lib.shmc_worker_attach(segment._ptr, slot, ctypes.byref(out)), "worker_attach")
        return cls(out, segment)

    def close(self) -> None:
        if self._ptr:
            for stop in list(getattr(self, "_before_close", ())):
                stop()
            ptr, self._ptr = self._ptr, None
            load_library().shmc_worker_free(ptr)
        if getattr(self, "_lock_table", None) is not None:
            table, self._lock_table = self._lock_table, None
            self._lock_table_lib.shmc_locks_free(table)

    def __enter__(self) -> Worker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def handle(self) -> Handle:
        """This worker's thread-safe :class:`Handle`, for other threads (made
        once, shared)."""
        with self._handle_lock:
            if self._handle is None:
                self._handle = Handle(self._ptr)
            return self._handle

    # identity --------------------------------------------------------
    def identity(self) -> Identity:
        """This worker's slot, generation, instance number, the number of
        instances and slots, and whether a master runs it."""
        ident = _Identity()
        _check(load_library().shmc_identity_get(self._ptr, ctypes.byref(ident)), "identity")
        return Identity(ident.slot, ident.generation, ident.index, ident.instances, ident.slots, bool(ident.has_master))

    def events(self) -> Events:
        """A reader of the master's events from now on (workers spawned,
        online, exited, reloads, shutdown): see :class:`Events`. Any thread."""
        return Events(self._ptr)

    def ready(self) -> None:
        _check(load_library().shmc_ready(self._ptr), "ready")

    def wait_all_ready(self, timeout: Optional[float] = 10.0) -> bool:
        ok = ctypes.c_bool()
        _check(load_library().shmc_wait_all_ready(self._ptr, _ms(timeout), ctypes.byref(ok)), "wait_all_ready")
        return bool(ok.value)

    def should_stop(self) -> bool:
        return bool(load_library().shmc_should_stop(self._ptr))

    def request_shutdown(self) -> None:
        _check(load_library().shmc_request_shutdown(self._ptr), "request_shutdown")

    def request_reload(self) -> None:
        _check(load_library().shmc_request_reload(self._ptr), "request_reload")

    # handlers --------------------------------------------------------
    @overload
    def on(self, event: str) -> Callable[[_F], _F]: ...

    @overload
    def on(self, event: str, handler: _F) -> _F: ...

    def on(self, event: str, handler: Optional[_F] = None) -> Any:
        """Registers ``handler(message) -> bytes | None`` for ``event``; usable
        as a decorator (``@worker.on("event")``). Its return value answers a
        request or map; an exception answers ``HandlerFailed``."""

        def register(fn: _F) -> _F:
            def trampoline(_userdata: Any, message: Any, reply: Any) -> None:
                lib = load_library()
                try:
                    out = _answer(fn(Message(message.contents)))
                    lib.shmc_reply_send(reply, out, len(out))
                except Exception as e:  # a handler's failure goes to the caller
                    lib.shmc_reply_fail(reply, str(e).encode("utf-8", "replace"))

            cb = _ASYNC(trampoline)
            self._callbacks.append(cb)
            hid = ctypes.c_uint64()
            _check(load_library().shmc_on_request(self._ptr, event.encode(), cb, None, ctypes.byref(hid)), "on")
            return fn

        return register(handler) if handler is not None else register

    def off(self, event: str) -> int:
        n = ctypes.c_size_t()
        _check(load_library().shmc_off(self._ptr, event.encode(), ctypes.byref(n)), "off")
        return n.value

    def take_listeners(self) -> List[Tuple[str, socket.socket]]:
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

    def accept(self, sock: socket.socket, timeout: Optional[float] = None) -> Optional[socket.socket]:
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

    def incoming(self, sock: socket.socket) -> Iterator[socket.socket]:
        """``for conn in worker.incoming(sock):`` connections until the
        worker is told to stop (see :meth:`accept`)."""
        while True:
            conn = self.accept(sock)
            if conn is None:
                return
            yield conn

    # sending -----------------------------------------------------------
    def emit(self, slot: int, event: str, data: bytes = b"") -> Optional[int]:
        """Emits ``event`` to worker ``slot`` (every handler runs there)."""
        return self._emit(TARGET_WORKER, slot, event, data)

    def emit_all(self, event: str, data: bytes = b"") -> Optional[int]:
        return self._emit(TARGET_ALL, 0, event, data)

    def emit_others(self, event: str, data: bytes = b"") -> Optional[int]:
        return self._emit(TARGET_OTHERS, 0, event, data)

    # The calls below, made while another thread drives this worker (it is
    # in run(), or BUSY), go through the worker's Handle: that thread runs
    # them.

    def _elsewhere(self) -> bool:
        runner = self._runner
        return runner is not None and runner != threading.get_ident()

    def _emit(self, kind: int, slot: int, event: str, data: bytes) -> Optional[int]:
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

    def broadcast(self, event: str, data: bytes = b"") -> Optional[int]:
        """Every live worker, this one included, runs its handlers."""
        return self._emit(TARGET_ALL, 0, event, data)

    def request(self, slot: int, event: str, data: bytes = b"", timeout: Optional[float] = 10.0) -> bytes:
        if self._elsewhere():
            return self.handle().request(slot, event, data, timeout)
        out = ctypes.c_void_p()
        code = load_library().shmc_request(self._ptr, slot, event.encode(), data, len(data), _ms(timeout), ctypes.byref(out))
        if code == BUSY:
            return self.handle().request(slot, event, data, timeout)
        _check(code, "request")
        return _take_bytes(out)

    def request_at(self, host: str, slot: int, event: str, data: bytes = b"", timeout: Optional[float] = 10.0) -> bytes:
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

    def emit_at(self, host: str, slot: int, event: str, data: bytes = b"") -> None:
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

    def consume(self, event: str, data: bytes = b"", timeout: Optional[float] = 10.0) -> Tuple[int, int, int]:
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

    def map(self, event: str, data: bytes = b"", timeout: Optional[float] = 10.0, hosts: bool = False) -> List[Any]:
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

    def emit_json(self, slot: int, event: str, value: Any) -> Optional[int]:
        return self.emit(slot, event, json.dumps(value).encode())

    def request_json(self, slot: int, event: str, value: Any, timeout: Optional[float] = 10.0) -> Any:
        return json.loads(self.request(slot, event, json.dumps(value).encode(), timeout) or b"null")

    # driving -------------------------------------------------------------
    def poll(self, timeout: Optional[float] = 0.05) -> int:
        n = ctypes.c_size_t()
        _check(load_library().shmc_poll(self._ptr, _ms(timeout), ctypes.byref(n)), "poll")
        return n.value

    def run(self, until: Optional[Callable[[], bool]] = None) -> None:
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
    def synchronize(self, name: str = "", timeout: Optional[float] = None) -> Iterator[Lock]:
        """``with worker.synchronize("name") as lock:`` — a critical section
        across processes; ``lock.previous_owner_died`` says whether the last
        holder died inside its section."""
        lock = self.lock(name, timeout)
        try:
            yield lock
        finally:
            lock.unlock()

    def lock(self, name: str = "", timeout: Optional[float] = None) -> Lock:
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
    def campaign(self, role: str = "") -> None:
        """Enters this worker in the election for ``role`` ("": the default
        role, the one invoke and publish use). Campaigning twice is
        harmless."""
        _check(load_library().shmc_campaign(self._ptr, role.encode()), "campaign")

    def is_leader(self, role: str = "") -> bool:
        """Whether this worker leads ``role`` now."""
        out = ctypes.c_bool()
        _check(load_library().shmc_is_leader(self._ptr, role.encode(), ctypes.byref(out)), "is_leader")
        return bool(out.value)

    def leader(self, role: str = "") -> Optional[Leader]:
        """The leader of ``role`` now (slot, term), ``None`` if none is
        elected (the instant between a death and the next election)."""
        slot, term = ctypes.c_uint32(), ctypes.c_uint64()
        code = load_library().shmc_leader(self._ptr, role.encode(), ctypes.byref(slot), ctypes.byref(term))
        if code == NO_LEADER:
            return None
        _check(code, "leader")
        return Leader(slot.value, term.value)

    @overload
    def on_invoke(self, method: str) -> Callable[[_F], _F]: ...

    @overload
    def on_invoke(self, method: str, handler: _F) -> _F: ...

    def on_invoke(self, method: str, handler: Optional[_F] = None) -> Any:
        """Registers the leader's ``handler(message) -> bytes | str | None``
        for ``method`` (every worker registers it; only the leader's runs;
        this campaigns for the default role if the worker has not); usable
        as a decorator. An exception answers the caller of :meth:`invoke`
        with :class:`HandlerFailed` and its text."""

        def register(fn: _F) -> _F:
            def trampoline(_userdata: Any, message: Any, response: Any) -> None:
                lib = load_library()
                try:
                    out = _answer(fn(Message(message.contents)))
                    lib.shmc_response_set(response, out, len(out))
                except Exception as e:  # a handler's failure goes to the caller
                    lib.shmc_response_fail(response, str(e).encode("utf-8", "replace"))

            cb = _SYNC(trampoline)
            self._callbacks.append(cb)
            hid = ctypes.c_uint64()
            _check(load_library().shmc_on_invoke(self._ptr, method.encode(), cb, None, ctypes.byref(hid)), "on_invoke")
            return fn

        return register(handler) if handler is not None else register

    @overload
    def subscribe(self, topic: str, *, timeout: Optional[float] = 10.0) -> Callable[[_F], _F]: ...

    @overload
    def subscribe(self, topic: str, handler: _F, timeout: Optional[float] = 10.0) -> _F: ...

    def subscribe(self, topic: str, handler: Optional[_F] = None, timeout: Optional[float] = 10.0) -> Any:
        """Subscribes to ``topic`` through the leader (waiting up to
        ``timeout`` seconds for one: :class:`NoLeader`): ``handler(message)``
        runs on the thread that drives this worker for every value
        published to it (``message.data``), and soon with the last value if
        there is one; a new leader is told this worker's subscriptions. Its
        return value is ignored, and so is an exception (it is printed).
        Usable as a decorator."""

        def register(fn: _F) -> _F:
            def trampoline(_userdata: Any, message: Any, _response: Any) -> None:
                try:
                    fn(Message(message.contents))
                except Exception:  # nobody to answer: report, keep serving
                    import traceback

                    traceback.print_exc()

            cb = _SYNC(trampoline)
            self._callbacks.append(cb)
            _check(load_library().shmc_subscribe(self._ptr, topic.encode(), _ms(timeout), cb, None), "subscribe")
            return fn

        return register(handler) if handler is not None else register

    def on_leader_change(self, handler: Callable[[LeaderChange], Any]) -> Callable[[LeaderChange], Any]:
        """Runs ``handler(change)`` (a :class:`LeaderChange`: slot, term,
        is_me) whenever the default role gets a new leader, the first time
        for the leader of the moment; on the thread that drives this worker,
        while it dispatches. Watching does not campaign. An exception is
        printed. Usable as a decorator."""

        def trampoline(_userdata: Any, change: Any) -> None:
            c = change.contents
            try:
                handler(LeaderChange(c.slot, c.term, bool(c.is_me)))
            except Exception:
                import traceback

                traceback.print_exc()

        cb = _LEADER_CHANGE(trampoline)
        self._callbacks.append(cb)
        _check(load_library().shmc_on_leader_change(self._ptr, cb, None), "on_leader_change")
        return handler

    def invoke(self, method: str, data: bytes = b"", timeout: Optional[float] = 10.0) -> bytes:
        if self._elsewhere():
            return self.handle().invoke(method, data, timeout)
        out = ctypes.c_void_p()
        code = load_library().shmc_invoke(self._ptr, method.encode(), data, len(data), _ms(timeout), ctypes.byref(out))
        if code == BUSY:
            return self.handle().invoke(method, data, timeout)
        _check(code, "invoke")
        return _take_bytes(out)

    def publish(self, topic: str, data: bytes, timeout: Optional[float] = 10.0) -> None:
        if self._elsewhere():
            return self.handle().publish(topic, data, timeout)
        code = load_library().shmc_publish(self._ptr, topic.encode(), data, len(data), _ms(timeout))
        if code == BUSY:
            return self.handle().publish(topic, data, timeout)
        _check(code, "publish")
