"""ctypes prototypes of the C ABI's event-loop driver and lock tables
(ffi/src/polled.rs, ffi/src/lock.rs, and the non-blocking leader calls of
ffi/src/leader.rs), for shmcluster.aio and the lock
table Worker.lock uses while another thread drives the worker."""

import ctypes
from typing import Any

from . import _ASYNC, _HANDLER, _REINSTALL, ABI_VERSION_MISMATCH, LibraryMismatch, load_library


class _Consumed(ctypes.Structure):
    _fields_ = [
        ("slot", ctypes.c_uint32), ("generation", ctypes.c_uint32),
        ("delivery_id", ctypes.c_uint64), ("attempts", ctypes.c_uint32),
    ]


class _CallEnd(ctypes.Structure):
    """shmc_call_end."""

    _fields_ = [
        ("ticket", ctypes.c_uint64), ("kind", ctypes.c_uint32), ("status", ctypes.c_uint32),
        ("data", ctypes.c_void_p), ("len", ctypes.c_size_t), ("consumed", _Consumed),
    ]


_prototyped = False


def lib() -> Any:
    """The library with these functions' prototypes set (once)."""
    global _prototyped
    library = load_library()
    if not _prototyped:
        _prototype(library)
        _prototyped = True
    return library


def _prototype(library: Any) -> None:
    """Sets these functions' prototypes on ``library``; LibraryMismatch if
    one is missing (a library older than this binding, of the same ABI
    version: load_library checks only the functions it prototypes)."""
    P, U32, U64, SZ = ctypes.c_void_p, ctypes.c_uint32, ctypes.c_uint64, ctypes.c_size_t
    sig = {
        "shmc_wake_fd": ([P, ctypes.POINTER(ctypes.c_int32)], U32),
        "shmc_start_request": ([P, U32, ctypes.c_char_p, ctypes.c_char_p, SZ, U64, ctypes.POINTER(U64)], U32),
        "shmc_start_map": ([P, ctypes.c_char_p, ctypes.c_char_p, SZ, U64, ctypes.POINTER(U64)], U32),
        "shmc_start_consume": ([P, ctypes.c_char_p, ctypes.c_char_p, SZ, U64, ctypes.POINTER(U64)], U32),
        "shmc_turn": ([P, ctypes.POINTER(U32)], U32),
        "shmc_unpark": ([P], U32),
        "shmc_next_due": ([P, ctypes.POINTER(U64)], U32),
        "shmc_take_finished": ([P, ctypes.POINTER(P)], U32),
        "shmc_finished_len": ([P], SZ),
        "shmc_finished_get": ([P, SZ, ctypes.POINTER(_CallEnd)], U32),
        "shmc_finished_take_map": ([P, SZ, ctypes.POINTER(P)], U32),
        "shmc_finished_free": ([P], None),
        "shmc_worker_locks": ([P, ctypes.POINTER(P)], U32),
        "shmc_locks_acquire": ([P, ctypes.c_char_p, U64, ctypes.POINTER(P)], U32),
        "shmc_locks_free": ([P], None),
        "shmc_lock_previous_owner_died": ([P], ctypes.c_bool),
        "shmc_lock_fencing_token": ([P], U64),
        "shmc_unlock": ([P], U32),
        "shmc_reply_send": ([P, ctypes.c_char_p, SZ], U32),
        "shmc_reply_fail": ([P, ctypes.c_char_p], U32),
        "shmc_reply_free": ([P], None),
        "shmc_on_request": ([P, ctypes.c_char_p, _ASYNC, P, ctypes.POINTER(U64)], U32),
        "shmc_on_invoke_async": ([P, ctypes.c_char_p, _ASYNC, P, ctypes.POINTER(U64)], U32),
        "shmc_start_invoke": ([P, ctypes.c_char_p, ctypes.c_char_p, SZ, U64, ctypes.c_bool,
                               ctypes.POINTER(U64)], U32),
        "shmc_start_publish": ([P, ctypes.c_char_p, ctypes.c_char_p, SZ, U64, ctypes.POINTER(U64)], U32),
        "shmc_subscribe_polled": ([P, ctypes.c_char_p, _HANDLER, P, ctypes.POINTER(ctypes.c_bool)], U32),
        "shmc_emit_timeout": ([P, U32, U32, ctypes.c_char_p, ctypes.c_char_p, SZ, U64, ctypes.POINTER(SZ)], U32),
    }
    missing = [name for name in sig if not hasattr(library, name)]
    if missing:
        raise LibraryMismatch(
            ABI_VERSION_MISMATCH,
            f"the libshmcluster loaded lacks {', '.join(missing)} (a build older than this binding): "
            + _REINSTALL,
        )
    for name, (args, res) in sig.items():
        fn = getattr(library, name)
        fn.argtypes, fn.restype = args, res
