"""shmcluster for asyncio: a worker driven by the event loop's own thread.

:class:`AsyncWorker` wraps a :class:`shmcluster.Worker` and drives it from
the loop, through the C ABI's polled driver (``shmc_start_*``,
``shmc_turn``, ``shmc_take_finished``; ffi/src/polled.rs): the slot's wake
eventfd is registered with ``loop.add_reader``, so a message or an answer
wakes the loop like any socket, and nothing blocks it:

- ``await aw.request(slot, event, data)``, ``await aw.map(event, data)``,
  ``await aw.consume(event, data)`` start the call and return at once; the
  loop resolves the future when its end comes;
- ``await aw.invoke(method, data)`` and ``await aw.publish(topic, data)``
  go through the leader without blocking (waiting for an election on the
  loop); ``await aw.subscribe(topic, fn)`` and ``aw.on_invoke(method)``
  (only the leader's runs) never wait for a leader; ``aw.emit`` /
  ``aw.broadcast`` send at once, and wait on the loop only for room in a
  full lane, ``timeout`` (0.1 s) at the most;
- handlers (``aw.on(event, fn)``) run on the loop's thread, as loop
  callbacks of their own (so they may call this AsyncWorker); ``fn`` may be
  a coroutine function: the call is answered when it finishes, an
  exception answers ``HandlerFailed``;
- ``async with aw.synchronize(name):`` holds a cross-process lock across
  awaits: a lock belongs to a thread, so each section has a thread of its
  own that takes the lock, waits for the section to end, and releases it.

Under ``shmcluster run``, :meth:`AsyncWorker.from_env` attaches and keeps
the Python signal handlers a server installed (uvicorn's, gunicorn's), so
``SIGTERM`` still starts the server's graceful shutdown; the master's stop
request is also :meth:`AsyncWorker.should_stop` / :meth:`AsyncWorker.stopped`.
"""

from __future__ import annotations

import asyncio
import ctypes
import inspect
import os
import signal
import threading
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Awaitable, Callable, Dict, List, Optional, Set, Tuple, Union

from . import _evloop
from ._evloop import _CallEnd
from . import (
    BUSY,
    LOCK_TIMEOUT,
    OK,
    TARGET_ALL,
    TARGET_OTHERS,
    TARGET_WORKER,
    WORKER_CLOSED,
    Leader,
    LeaderChange,
    Message,
    ShmclusterError,
    Worker,
    WAIT_FOREVER,
    _ASYNC,
    _CLASSES,
    _HANDLER,
    _check,
    _map_entries,
    _ms,
)

__all__ = ["AsyncWorker", "Section", "DEFAULT_MAX_IN_FLIGHT", "DEFAULT_EMIT_TIMEOUT"]

# shmc_turn_kind and shmc_end_kind (ffi/src/polled.rs; the numbers are fixed).
_TURN_BUSY, _TURN_PARKED, _TURN_IDLE = 0, 1, 2
_END_ANSWER, _END_MAP, _END_CONSUMED = 0, 1, 2

# Turns per loop callback before other callbacks get the thread (a flood
# of messages must not starve the loop's sockets and timers).
_TURNS_PER_CALLBACK = 64
# Without an eventfd (shmc_turn says IDLE): how often the loop looks.
_IDLE_PERIOD = 0.002
# How long a section's thread waits for its lock between looks at whether
# the section was cancelled.
_LOCK_SLICE_MS = 100

# Calls one AsyncWorker has started and not yet seen end; the next ones
# wait for a place on the loop. A start sends at once, and when the lane to
# its target is full it waits there (running this worker's handlers) until
# the target reads: a wait on the loop's thread, and with two AsyncWorkers
# on one loop a stall until the call's deadline (the reader is this
# thread). 512 small calls stay well inside a lane (64 KiB by default).
DEFAULT_MAX_IN_FLIGHT = 512

# How long emit/broadcast wait for room in a full lane (seconds) before
# TimedOut: the only wait they can make on the loop's thread (dispatching
# this worker's own messages meanwhile). A lane holds 64 KiB by default, so
# a lane is full only when its reader is stalled or flooded.
DEFAULT_EMIT_TIMEOUT = 0.1

Payload = Union[bytes, bytearray, memoryview, str, None]
Handler = Callable[[Message], Union[Payload, Awaitable[Payload]]]
Listener = Callable[[Message], Union[None, Awaitable[None]]]
ChangeListener = Callable[[LeaderChange], Union[None, Awaitable[None]]]
MapEntries = List[Tuple[int, Union[bytes, ShmclusterError]]]


def _lib() -> Any:
    return _evloop.lib()


def _bytes(out: Payload) -> bytes:
    if out is None:
        return b""
    if isinstance(out, str):
        return out.encode("utf-8")
    return bytes(out)


def _error(status: int, what: str, text: bytes) -> ShmclusterError:
    cls = _CLASSES.get(status, ShmclusterError)
    return cls(status, f"{what}: {text.decode('utf-8', 'replace')}")


def _inherited_listeners() -> set:
    """The (device, inode) of each socket the master handed this process
    (``LISTEN_FDS`` descriptors from 3), to recognise their duplicates."""
    out: Set[Tuple[int, int]] = set()
    try:
        n = int(os.environ.get("LISTEN_FDS", "0"))
    except ValueError:
        return out
    for fd in range(3, 3 + n):
        try:
            st = os.fstat(fd)
        except OSError:
            continue
        out.add((st.st_dev, st.st_ino))
    return out


class Section:
    """What ``async with aw.synchronize(name) as section`` gives: whether
    the previous holder died inside its section, and this acquisition's
    fencing token."""

    def __init__(self, previous_owner_died: bool, fencing_token: int) -> None:
        self.previous_owner_died = previous_owner_died
        self.fencing_token = fencing_token


class AsyncWorker:
    """A :class:`shmcluster.Worker` driven by an asyncio loop (its thread
    only: every method but :meth:`should_stop` must be called on it)."""

    def __init__(self, worker: Worker, loop: Optional[asyncio.AbstractEventLoop] = None,
                 max_in_flight: int = DEFAULT_MAX_IN_FLIGHT) -> None:
        self.worker = worker
        self.loop = loop or asyncio.get_running_loop()
        # Calls started and not yet ended; more wait here, on the loop (see
        # DEFAULT_MAX_IN_FLIGHT).
        self._in_flight = asyncio.Semaphore(max_in_flight)
        self._lib = _lib()
        self._ptr = worker._ptr
        self._calls: Dict[int, Tuple[asyncio.Future, str]] = {}
        self._callbacks: List[Any] = []  # ctypes callbacks outlive their registration
        self._tasks: set = set()  # coroutine handlers running
        self._locks: Optional[ctypes.c_void_p] = None
        # Section threads alive (they use the lock table: it is freed when
        # the last one ends after close), under _locks_mutex; and the
        # waiting sections' (cancel, acquired) pairs, which close() ends.
        self._lock_users = 0
        self._locks_mutex = threading.Lock()
        self._waiting: Dict[int, Tuple[threading.Event, "asyncio.Future[Any]"]] = {}
        self._parked = False
        self._scheduled = False
        self._timer: Optional[asyncio.TimerHandle] = None
        self._closed = False
        self._listeners: set = set()
        # The Python handlers of SIGTERM and SIGINT before from_env (a
        # server's: call one to start its own shutdown after a drain).
        self.saved_signal_handlers: Dict[int, Any] = {}
        fd = ctypes.c_int32(-1)
        _check(self._lib.shmc_wake_fd(self._ptr, ctypes.byref(fd)), "wake_fd")
        self._fd = fd.value if fd.value >= 0 else None
        if self._fd is not None:
            self.loop.add_reader(self._fd, self._on_wake)
        # Closing the Worker first closes this (it frees the handle we use).
        worker._before_close.append(self.close)
        self._schedule()

    @classmethod
    def from_env(cls, keep_python_signals: bool = True,
                 max_in_flight: int = DEFAULT_MAX_IN_FLIGHT) -> "AsyncWorker":
        """Attaches the worker ``shmcluster run`` spawned this process as,
        driven by the running loop. The library turns ``SIGTERM``/``SIGINT``
        into a stop request; with ``keep_python_signals`` a handler Python
        code installed before (a server's graceful shutdown) is put back,
        so the signal reaches it as before. ``max_in_flight``: see
        :data:`DEFAULT_MAX_IN_FLIGHT`."""
        saved: Dict[int, Any] = {int(s): signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
        listeners = _inherited_listeners()
        worker = Worker.from_env()
        if keep_python_signals and threading.current_thread() is threading.main_thread():
            for s, h in saved.items():
                if callable(h) or h == signal.SIG_IGN:
                    signal.signal(s, h)
        aw = cls(worker, max_in_flight=max_in_flight)
        aw.saved_signal_handlers = saved
        aw._listeners = listeners
        return aw

    def stop_accepting(self) -> int:
        """Stops this loop accepting on the listeners the master handed the
        process (``LISTEN_FDS``; a server such as ``uvicorn --fd 3`` accepts
        on a duplicate of one): their readers are removed from the loop,
        the sockets stay open, and the connections waiting in the shared
        backlog go to the other workers. Returns how many readers it
        removed. The first step of a drain that loses no request: stop
        accepting, answer what comes on the open connections with
        ``Connection: close``, then let the server shut down."""
        removed = 0
        if not self._listeners:
            return 0
        for name in os.listdir("/proc/self/fd"):
            fd = int(name)
            try:
                st = os.fstat(fd)
            except OSError:
                continue
            if (st.st_dev, st.st_ino) in self._listeners and self.loop.remove_reader(fd):
                removed += 1
        return removed

    # identity and lifecycle ---------------------------------------------
    @property
    def slot(self) -> int:
        return self.worker.slot

    @property
    def index(self) -> int:
        return self.worker.index

    def ready(self) -> None:
        """Tells the master this worker serves (a rolling reload waits for it)."""
        self.worker.ready()

    def should_stop(self) -> bool:
        """Whether the master (or a signal) asked this worker to stop."""
        return self.worker.should_stop()

    async def stopped(self, period: float = 0.05) -> None:
        """Returns when this worker is told to stop (checked every ``period``)."""
        while not self.should_stop():
            await asyncio.sleep(period)

    def close(self) -> None:
        """Stops driving the worker: calls still waiting fail with
        ``WorkerClosed``. The :class:`Worker` itself stays open (close it
        after, if this program owns it)."""
        if self._closed:
            return
        self._closed = True
        if self.close in self.worker._before_close:
            self.worker._before_close.remove(self.close)
        if self._fd is not None:
            self.loop.remove_reader(self._fd)
        if self._timer is not None:
            self._timer.cancel()
        for fut, what in self._calls.values():
            if not fut.done():
                fut.set_exception(_error(WORKER_CLOSED, what, b"the worker was closed"))
            # A call waiting for a place in flight takes it, sees the
            # AsyncWorker closed, fails and passes the place on.
            self._in_flight.release()
        self._calls.clear()
        # Sections waiting for their lock end now; a held one keeps its
        # lock until its block ends. The lock table goes with the last
        # section thread (one may be inside shmc_locks_acquire).
        for cancelled, acquired in self._waiting.values():
            cancelled.set()
            if not acquired.done():
                acquired.set_exception(_error(WORKER_CLOSED, "synchronize", b"the worker was closed"))
        self._waiting.clear()
        self._free_locks_if_unused()

    def _free_locks_if_unused(self) -> None:
        """Frees the lock table once closed and no section thread uses it."""
        with self._locks_mutex:
            table = self._locks if self._closed and self._lock_users == 0 else None
            if table is not None:
                self._locks = None
        if table is not None:
            self._lib.shmc_locks_free(table)

    async def __aenter__(self) -> "AsyncWorker":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self.close()

    # driving ---------------------------------------------------------------
    def _on_wake(self) -> None:
        assert self._fd is not None  # registered only with an eventfd
        try:
            os.read(self._fd, 8)  # the eventfd's count: clears it
        except BlockingIOError:
            pass
        self._turn()

    def _schedule(self) -> None:
        if not self._scheduled and not self._closed:
            self._scheduled = True
            self.loop.call_soon(self._turn)

    def _turn(self) -> None:
        self._scheduled = False
        if self._closed:
            return
        try:
            self._turn_now()
        except ShmclusterError as e:
            if e.code != BUSY:
                raise
            # A blocking call on the Worker from another thread (each of
            # unpark, turn, take_finished, next_due may meet it): it
            # dispatches meanwhile. Come back shortly, in the same state.
            self._come_back(_IDLE_PERIOD)

    def _come_back(self, delay: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self.loop.call_later(delay, self._turn)

    def _turn_now(self) -> None:
        lib = self._lib
        if self._parked:
            _check(lib.shmc_unpark(self._ptr), "unpark")
            self._parked = False
        kind = ctypes.c_uint32(_TURN_BUSY)
        for _ in range(_TURNS_PER_CALLBACK):
            code = lib.shmc_turn(self._ptr, ctypes.byref(kind))
            if code == BUSY:
                _check(code, "turn")  # see _turn
            if code != OK:
                # A corrupt lane is poisoned and reported once; the others
                # keep being served.
                self.loop.call_exception_handler({"message": "shmcluster turn failed",
                                                  "exception": _error(code, "turn", b"")})
                kind.value = _TURN_BUSY
                break
            if kind.value != _TURN_BUSY:
                break
        self._settle()
        if kind.value == _TURN_BUSY:
            self._schedule()
        elif kind.value == _TURN_PARKED:
            self._parked = True
        due = ctypes.c_uint64()
        _check(lib.shmc_next_due(self._ptr, ctypes.byref(due)), "next_due")
        delay = None if due.value == WAIT_FOREVER else due.value / 1000.0
        if kind.value == _TURN_IDLE:
            delay = _IDLE_PERIOD if delay is None else min(delay, _IDLE_PERIOD)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if delay is not None:
            self._timer = self.loop.call_later(delay, self._turn)

    def _settle(self) -> None:
        lib = self._lib
        out = ctypes.c_void_p()
        _check(lib.shmc_take_finished(self._ptr, ctypes.byref(out)), "take_finished")
        try:
            for i in range(lib.shmc_finished_len(out)):
                end = _CallEnd()
                _check(lib.shmc_finished_get(out, i, ctypes.byref(end)), "finished_get")
                fut, what = self._calls.pop(end.ticket, (None, ""))
                if fut is not None:
                    self._in_flight.release()
                if end.kind == _END_MAP:
                    m = ctypes.c_void_p()
                    _check(lib.shmc_finished_take_map(out, i, ctypes.byref(m)), "finished_take_map")
                    value: Any = _map_entries(m)  # frees it
                elif end.status != OK:
                    text = ctypes.string_at(end.data, end.len) if end.len else b""
                    value = _error(end.status, what, text)
                elif end.kind == _END_CONSUMED:
                    c = end.consumed
                    value = (c.slot, c.delivery_id, c.attempts)
                else:
                    value = ctypes.string_at(end.data, end.len) if end.len else b""
                if fut is None or fut.done():
                    continue  # cancelled by its caller
                if isinstance(value, ShmclusterError):
                    fut.set_exception(value)
                else:
                    fut.set_result(value)
        finally:
            lib.shmc_finished_free(out)

    async def _call(self, what: str, start: Callable[[Any], int]) -> Any:
        """Starts a call (``start(ticket_pointer)`` returns the start's
        code) once fewer than ``max_in_flight`` are, and awaits its end."""
        self._live()
        await self._in_flight.acquire()
        try:
            self._live()
            t = ctypes.c_uint64()
            _check(start(ctypes.byref(t)), what)
        except BaseException:
            self._in_flight.release()
            raise
        fut = self.loop.create_future()
        self._calls[t.value] = (fut, what)
        self._schedule()
        return await fut

    def _live(self) -> None:
        if self._closed:
            raise _error(WORKER_CLOSED, "call", b"the AsyncWorker is closed")

    # calls ---------------------------------------------------------------
    async def request(self, slot: int, event: str, data: Payload = b"", timeout: Optional[float] = 10.0) -> bytes:
        """Asks worker ``slot``'s first handler for ``event``; its answer."""
        body, name, ms = _bytes(data), event.encode(), _ms(timeout)
        return await self._call("request", lambda t: self._lib.shmc_start_request(
            self._ptr, slot, name, body, len(body), ms, t))

    async def map(self, event: str, data: Payload = b"", timeout: Optional[float] = 10.0) -> MapEntries:
        """Every live worker (this one included) runs its first handler for
        ``event``: one entry per worker, ``(slot, bytes)`` or
        ``(slot, exception)``, in slot order."""
        body, name, ms = _bytes(data), event.encode(), _ms(timeout)
        return await self._call("map", lambda t: self._lib.shmc_start_map(self._ptr, name, body, len(body), ms, t))

    async def consume(self, event: str, data: Payload = b"", timeout: Optional[float] = 10.0) -> Tuple[int, int, int]:
        """Runs ``event`` on exactly one live worker with a handler (at least
        once); ``(slot, delivery_id, attempts)``."""
        body, name, ms = _bytes(data), event.encode(), _ms(timeout)
        return await self._call("consume", lambda t: self._lib.shmc_start_consume(
            self._ptr, name, body, len(body), ms, t))

    # handlers --------------------------------------------------------------
    def _replying(self, fn: Handler) -> Any:
        """The C trampoline (an ``shmc_async_handler_fn``) that runs
        ``fn(message)`` on the loop's thread and answers its reply with
        what it returns, or when the awaitable it returns finishes."""
        lib = self._lib

        def fail(reply: int, e: BaseException) -> None:
            text = str(e) or type(e).__name__
            lib.shmc_reply_fail(reply, text.encode("utf-8", "replace"))

        def send(reply: int, out: Payload) -> None:
            try:
                body = _bytes(out)
            except Exception as e:
                fail(reply, e)
                return
            lib.shmc_reply_send(reply, body, len(body))

        def trampoline(_userdata: Any, message: Any, reply: int) -> None:
            # Inside shmc_turn the worker is busy: a handler that used it
            # (aw.emit, aw.subscribe) would get BUSY. It runs next on the
            # loop, with its copy of the message, and answers then.
            try:
                m = Message(message.contents)
            except Exception as e:  # an event name that is not UTF-8
                fail(reply, e)
                return
            self.loop.call_soon(run, m, reply)

        def run(m: Message, reply: int) -> None:
            try:
                out = fn(m)
            except Exception as e:  # the handler's failure goes to the caller
                fail(reply, e)
                return
            if not inspect.isawaitable(out):
                send(reply, out)
                return
            task = asyncio.ensure_future(out, loop=self.loop)
            self._tasks.add(task)

            def done(t: "asyncio.Future[Any]") -> None:
                self._tasks.discard(t)
                if t.cancelled():
                    lib.shmc_reply_fail(reply, b"handler cancelled")
                    return
                error = t.exception()
                if error is not None:
                    fail(reply, error)
                else:
                    send(reply, t.result())

            task.add_done_callback(done)

        cb = _ASYNC(trampoline)
        self._callbacks.append(cb)
        return cb

    def _run_listener(self, what: str, fn: Callable[..., Any], *args: Any) -> None:
        """Runs a listener whose result nobody awaits (a subscriber, a
        leader-change callback): a coroutine becomes a task; an exception
        goes to the loop's exception handler. It runs next on the loop, out
        of the turn that got it, so that it may use this worker."""
        self.loop.call_soon(self._run_listener_now, what, fn, *args)

    def _run_listener_now(self, what: str, fn: Callable[..., Any], *args: Any) -> None:
        try:
            out = fn(*args)
        except Exception as e:
            self.loop.call_exception_handler({"message": f"shmcluster {what} failed", "exception": e})
            return
        if not inspect.isawaitable(out):
            return
        task = asyncio.ensure_future(out, loop=self.loop)
        self._tasks.add(task)

        def done(t: "asyncio.Future[Any]") -> None:
            self._tasks.discard(t)
            if not t.cancelled() and t.exception() is not None:
                self.loop.call_exception_handler({"message": f"shmcluster {what} failed",
                                                  "exception": t.exception()})

        task.add_done_callback(done)

    def on(self, event: str, handler: Optional[Handler] = None) -> Any:
        """Registers ``handler(message)`` for ``event`` (also as a decorator).
        It runs on the loop's thread; it may return bytes/str/None or an
        awaitable of them (a coroutine function): the call is answered when
        it finishes. An exception answers ``HandlerFailed`` with its text."""

        def register(fn: Handler) -> Handler:
            cb = self._replying(fn)
            hid = ctypes.c_uint64()
            _check(self._lib.shmc_on_request(self._ptr, event.encode(), cb, None, ctypes.byref(hid)), "on")
            return fn

        return register(handler) if handler is not None else register

    # sending without an answer ------------------------------------------------
    def _emit(self, kind: int, slot: int, event: str, data: Payload, timeout: float) -> int:
        self._live()
        body, sent = _bytes(data), ctypes.c_size_t()
        code = self._lib.shmc_emit_timeout(self._ptr, kind, slot, event.encode(), body, len(body),
                                           _ms(timeout), ctypes.byref(sent))
        _check(code, "emit")
        self._schedule()  # a copy to this worker runs at its next turn
        return sent.value

    def emit(self, slot: int, event: str, data: Payload = b"", timeout: float = DEFAULT_EMIT_TIMEOUT) -> int:
        """Sends ``event`` to worker ``slot`` (every handler for it runs
        there; nothing answers); returns 1. It returns at once unless the
        lane to ``slot`` is full (its reader stalled): then it waits for
        room ``timeout`` seconds at the most, on the loop's thread, running
        this worker's own handlers meanwhile, and raises ``TimedOut``
        (nothing sent). ``WorkerDied``: a full lane to a slot nobody
        serves; ``NoSuchWorker``-like errors as :meth:`Worker.emit`."""
        return self._emit(TARGET_WORKER, slot, event, data, timeout)

    def broadcast(self, event: str, data: Payload = b"", timeout: float = DEFAULT_EMIT_TIMEOUT) -> int:
        """Sends ``event`` to every live worker, this one included (its own
        copy runs at its next turn); returns how many. A full lane waits as
        in :meth:`emit`, ``timeout`` seconds at the most per lane; on
        ``TimedOut`` the workers before the full lane (slot order) got it,
        the ones after did not."""
        return self._emit(TARGET_ALL, 0, event, data, timeout)

    def emit_others(self, event: str, data: Payload = b"", timeout: float = DEFAULT_EMIT_TIMEOUT) -> int:
        """:meth:`broadcast` to every live worker but this one."""
        return self._emit(TARGET_OTHERS, 0, event, data, timeout)

    # leader --------------------------------------------------------------------
    def campaign(self, role: str = "") -> None:
        """Enters this worker in the election for ``role`` ("": the default
        role, the one invoke and publish use). Harmless twice; it does not
        wait (a thread of the library waits on the role's lock)."""
        self.worker.campaign(role)

    def is_leader(self, role: str = "") -> bool:
        """Whether this worker leads ``role`` now."""
        return self.worker.is_leader(role)

    def leader(self, role: str = "") -> Optional[Leader]:
        """The leader of ``role`` now (slot, term), ``None`` if none is
        elected."""
        return self.worker.leader(role)

    def on_leader_change(self, fn: ChangeListener) -> ChangeListener:
        """Runs ``fn(change)`` (a :class:`shmcluster.LeaderChange`: slot,
        term, is_me) on the loop's thread whenever the default role gets a
        new leader, the first time for the leader of the moment. ``fn`` may
        be a coroutine function (it runs as a task). Watching does not
        campaign. An exception goes to the loop's exception handler. Usable
        as a decorator."""
        self._live()
        self.worker.on_leader_change(lambda change: self._run_listener("leader-change callback", fn, change))
        self._schedule()
        return fn

    def on_invoke(self, method: str, handler: Optional[Handler] = None) -> Any:
        """Registers the leader's ``handler(message)`` for ``method`` (also
        as a decorator): every worker registers it, only the leader's runs
        (a worker that does not lead answers "not the leader" and the
        caller asks the leader again). Sync or coroutine, answered as in
        :meth:`on`. Campaigns for the default role if the worker has not."""

        def register(fn: Handler) -> Handler:
            self._live()
            cb = self._replying(fn)
            hid = ctypes.c_uint64()
            _check(self._lib.shmc_on_invoke_async(self._ptr, method.encode(), cb, None, ctypes.byref(hid)),
                   "on_invoke")
            self._schedule()
            return fn

        return register(handler) if handler is not None else register

    async def invoke(self, method: str, data: Payload = b"", timeout: Optional[float] = 10.0,
                     idempotent: bool = False) -> bytes:
        """Runs the leader's handler for ``method``; its answer. Waits for a
        leader until ``timeout`` (``NoLeader``). ``LeaderDied``: the leader
        died with the call in hand (it may or may not have run); with
        ``idempotent`` (a method safe to run twice) the call goes to the
        next leader instead. ``NoHandler``, ``HandlerFailed``,
        ``TimedOut``."""
        body, name, ms = _bytes(data), method.encode(), _ms(timeout)
        return await self._call("invoke", lambda t: self._lib.shmc_start_invoke(
            self._ptr, name, body, len(body), ms, bool(idempotent), t))

    async def publish(self, topic: str, data: Payload = b"", timeout: Optional[float] = 10.0) -> None:
        """Publishes ``data`` on ``topic`` through the leader, which keeps it
        as the topic's last value and sends it to every subscriber; returns
        when the leader has it. ``NoLeader`` (none by ``timeout``),
        ``LeaderDied``, ``TimedOut``."""
        body, name, ms = _bytes(data), topic.encode(), _ms(timeout)
        await self._call("publish", lambda t: self._lib.shmc_start_publish(
            self._ptr, name, body, len(body), ms, t))

    async def subscribe(self, topic: str, handler: Listener) -> bool:
        """Subscribes ``handler(message)`` to ``topic`` (``message.data``:
        the value): it runs on the loop's thread for every value published,
        and soon with the topic's last value if it has one. It may be a
        coroutine function (each value is a task). Never waits for a
        leader: returns whether one was told now; if not, the turn that
        first sees a leader tells it, as every later leader is told this
        worker's subscriptions. Subscribing twice adds a second handler."""
        self._live()

        def trampoline(_userdata: Any, message: Any, _response: Any) -> None:
            self._run_listener(f"subscriber of {topic!r}", handler, Message(message.contents))

        cb = _HANDLER(trampoline)
        self._callbacks.append(cb)
        told = ctypes.c_bool(False)
        _check(self._lib.shmc_subscribe_polled(self._ptr, topic.encode(), cb, None, ctypes.byref(told)),
               "subscribe")
        self._schedule()
        return bool(told.value)

    # locks -------------------------------------------------------------------
    @asynccontextmanager
    async def synchronize(self, name: str = "", timeout: Optional[float] = None) -> AsyncIterator[Section]:
        """``async with aw.synchronize("name") as section:`` — a critical
        section across processes, held across awaits (by a thread of its
        own, which takes the lock and releases it when the block ends; the
        loop never waits for the lock). ``LockError`` (``LOCK_TIMEOUT``)
        after ``timeout`` seconds (None: no limit)."""
        self._live()
        lib = self._lib
        if self._locks is None:
            out = ctypes.c_void_p()
            _check(lib.shmc_worker_locks(self._ptr, ctypes.byref(out)), "worker_locks")
            self._locks = out
        locks, loop = self._locks, self.loop
        acquired: "asyncio.Future[Section]" = loop.create_future()
        released: "asyncio.Future[None]" = loop.create_future()
        release = threading.Event()
        cancelled = threading.Event()
        deadline = None if timeout is None else loop.time() + timeout
        encoded = name.encode()

        def resolve(fut: "asyncio.Future[Any]", value: Any, error: Optional[BaseException] = None) -> None:
            if not fut.done():
                if error is not None:
                    fut.set_exception(error)
                else:
                    fut.set_result(value)

        def post(fut: "asyncio.Future[Any]", value: Any, error: Optional[BaseException] = None) -> None:
            try:
                loop.call_soon_threadsafe(resolve, fut, value, error)
            except RuntimeError:
                pass  # the loop is closed: nobody waits

        def section_thread() -> None:
            try:
                hold()
            finally:
                with self._locks_mutex:
                    self._lock_users -= 1
                self._free_locks_if_unused()

        def hold() -> None:
            held = ctypes.c_void_p()
            while True:
                if cancelled.is_set():
                    post(released, None)
                    return
                left = _LOCK_SLICE_MS
                if deadline is not None:
                    left = max(0, min(left, int((deadline - loop.time()) * 1000)))
                code = lib.shmc_locks_acquire(locks, encoded, left, ctypes.byref(held))
                if code == OK:
                    break
                if code == LOCK_TIMEOUT and (deadline is None or loop.time() < deadline):
                    continue
                try:
                    _check(code, "synchronize")
                except ShmclusterError as e:
                    post(acquired, None, e)
                post(released, None)
                return
            try:
                if not cancelled.is_set():
                    post(acquired, Section(bool(lib.shmc_lock_previous_owner_died(held)),
                                           int(lib.shmc_lock_fencing_token(held))))
                    release.wait()
            finally:
                lib.shmc_unlock(held)
                post(released, None)

        with self._locks_mutex:
            self._lock_users += 1
        try:
            threading.Thread(target=section_thread, name=f"shmcluster-lock-{name}", daemon=True).start()
        except BaseException:
            with self._locks_mutex:
                self._lock_users -= 1
            raise
        key = id(acquired)
        self._waiting[key] = (cancelled, acquired)
        try:
            section = await acquired
        except BaseException:
            cancelled.set()
            release.set()
            raise
        finally:
            self._waiting.pop(key, None)
        try:
            yield section
        finally:
            release.set()
            # The lock is free once its thread has released it (a section
            # that follows in this task then takes it without a wait).
            await asyncio.shield(released)
