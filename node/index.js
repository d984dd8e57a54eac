'use strict';
// shmcluster for Node.js: the messenger of a `shmcluster run` worker on the
// JS thread, woken by libuv (see src/lib.rs for the driver, src/uv.rs for
// the wake). Payloads are JSON by default; a Buffer is sent as raw bytes,
// and a handler or call given `{ raw: true }` gets raw bytes back.

const path = require('node:path');
const { EventEmitter } = require('node:events');

const { Native } = require(path.join(__dirname, 'shmcluster.node'));

/** Default timeout of request, map and consume, in milliseconds. */
const DEFAULT_TIMEOUT = 10000;
/**
 * The safety net: the driver turns at least this often (the heartbeat, a
 * stop request, leader terms), as the Rust async driver does. It never
 * keeps the process alive (unref'd).
 */
const SAFETY_NET_MS = 50;

/** An error of shmcluster: `code` is the C ABI's result name. */
class ShmclusterError extends Error {
  constructor(code, message) {
    super(message);
    this.name = 'ShmclusterError';
    this.code = code;
  }
}

// The addon's errors carry `CODE\u0001text` (src/lib.rs, `err`).
function fromNative(e) {
  if (e && typeof e.message === 'string') {
    const i = e.message.indexOf('\u0001');
    if (i >= 0) return new ShmclusterError(e.message.slice(0, i), e.message.slice(i + 1));
  }
  return e;
}

function nat(fn) {
  try {
    return fn();
  } catch (e) {
    throw fromNative(e);
  }
}

// A payload for the addon: the bytes of a Buffer (or Uint8Array), else
// the JSON text of the value (the addon takes the string's UTF-8 bytes: no
// Buffer made here).
function encode(value) {
  if (Buffer.isBuffer(value)) return value;
  if (value instanceof Uint8Array) return Buffer.from(value.buffer, value.byteOffset, value.byteLength);
  let s;
  try {
    s = JSON.stringify(value === undefined ? null : value);
  } catch (e) {
    throw new ShmclusterError('INVALID_ARGUMENT', `cannot encode the value as JSON: ${e.message}`);
  }
  return s === undefined ? 'null' : s;
}

// A payload from the addon: JSON text (a string, when it is UTF-8 and no
// raw handler wants it) or a Buffer.
function decode(data) {
  if (data.length === 0) return undefined;
  return JSON.parse(typeof data === 'string' ? data : data.toString('utf8'));
}

// A payload for a raw handler (a string only if the handler came after
// the payload was taken).
function bytesOf(data) {
  return typeof data === 'string' ? Buffer.from(data, 'utf8') : data;
}

/** Room for the numbers of one turn's records (the rest waits for the next turn). */
const REC_NUMBERS = 4096;

/** Native turns one `_turn` makes in a row while handlers answer at once. */
const ROUNDS_PER_TURN = 4;

// Records of the addon's turn (src/lib.rs, `mod tag`).
const T_ANSWER = 1;
const T_CALL = 2;
const T_EVENT = 3;
const T_SETTLED = 4;
const T_INCOMING = 5;
const T_LEADER = 6;
const T_CORRUPT = 7;
const T_MORE = 8;
const T_DUE = 9;

function errorText(e) {
  if (e instanceof Error) return e.message;
  return String(e);
}

function checkSlot(slot) {
  if (!Number.isInteger(slot)) throw new ShmclusterError('INVALID_ARGUMENT', `${String(slot)} is not a worker slot`);
  if (slot < 0 || slot > 0xffffffff) throw new ShmclusterError('NO_SUCH_WORKER', `no worker slot ${slot}`);
}

function timeoutOf(opts) {
  const t = opts && opts.timeout !== undefined ? opts.timeout : DEFAULT_TIMEOUT;
  if (typeof t !== 'number' || !(t >= 0)) throw new ShmclusterError('INVALID_ARGUMENT', 'timeout must be a number of milliseconds >= 0');
  return t;
}

/** `opts.spin` (a number for both, or `{ request, answer }`) as [request, answer]. */
function spinOf(spin, current) {
  const check = (v) => {
    if (!Number.isInteger(v) || v < 0 || v > 1000) {
      throw new ShmclusterError('INVALID_ARGUMENT', 'a spin is an integer number of microseconds, 0 to 1000');
    }
    return v;
  };
  if (typeof spin === 'number') return [check(spin), check(spin)];
  if (spin && typeof spin === 'object') {
    return [
      spin.request === undefined ? current[0] : check(spin.request),
      spin.answer === undefined ? current[1] : check(spin.answer),
    ];
  }
  throw new ShmclusterError('INVALID_ARGUMENT', 'spin is a number of microseconds or { request, answer }');
}

/** ipchannel-style sender to one slot or to 'all'. */
class To {
  constructor(m, target) {
    this._m = m;
    this._target = target;
  }
  /** The `message` event. */
  send(data) {
    return this.emit('message', data);
  }
  emit(event, data) {
    return this._m._emit(this._target, event, data);
  }
}

/** The messenger of one worker, driven by the JS thread. */
class Messenger {
  constructor(worker) {
    this._w = worker;
    this._n = worker._n;
    this._handlers = new Map();
    this._pending = new Map();
    this._names = [];
    // The numbers of a turn's records (src/lib.rs, `Native::turn`).
    this._rec = new Float64Array(REC_NUMBERS);
    this._inTurn = false;
    this._again = false;
    this._scheduled = false;
    this._closed = false;
    this._due = null;
    this._dueAt = Infinity;
    this._errorListeners = [];
    this._maxPayload = this._n.maxPayload;
    this._referenced = true;
    // Leader and followers (cluster-client): invoke handlers by method,
    // subscribers and the last value seen per topic, leader-change
    // listeners, subscribes waiting for a leader to be told.
    this._invokers = new Map();
    this._topics = new Map();
    this._changeListeners = [];
    this._watching = false;
    this._awaitingLeader = new Set();
    /** How an idle loop is woken: `'eventfd'` (libuv polls the slot's eventfd) or `'thread'` (a waiter thread). */
    this.wake = nat(() => this._n.startWake(() => this._turn()));
    this._net = setInterval(() => this._turn(), SAFETY_NET_MS);
    this._net.unref();
    this._schedule();
  }

  /** Microseconds a turn polls before it parks, after a request or an answer (`opts.spin`). */
  get spin() {
    const [request, answer] = this._n.spin;
    return { request, answer };
  }

  /** The payload limit in bytes (a longer payload is `TOO_LARGE`). */
  get maxPayload() {
    return this._maxPayload;
  }

  /** Registers `fn` for `event`. `opts.raw`: get the payload as a Buffer. */
  on(event, fn, opts) {
    if (typeof fn !== 'function') throw new ShmclusterError('INVALID_ARGUMENT', 'handler must be a function');
    this._open();
    let list = this._handlers.get(event);
    if (!list) {
      nat(() => this._n.listen(String(event)));
      list = [];
      this._handlers.set(event, list);
    }
    const raw = !!(opts && opts.raw);
    if (raw && !list.some((h) => h.raw)) nat(() => this._n.setRaw(String(event), true));
    list.push({ fn, raw });
    this._schedule();
    return this;
  }

  /** Removes `fn` (or every handler) for `event`. */
  off(event, fn) {
    const list = this._handlers.get(event);
    if (!list) return this;
    const rest = fn ? list.filter((h) => h.fn !== fn) : [];
    if (rest.length === 0) {
      this._handlers.delete(event);
      if (!this._closed) nat(() => this._n.unlisten(String(event)));
    } else {
      this._handlers.set(event, rest);
    }
    if (!this._closed && list.some((h) => h.raw) && !rest.some((h) => h.raw)) {
      nat(() => this._n.setRaw(String(event), false));
    }
    this._schedule();
    return this;
  }

  /** Errors no caller can be told of (an undecodable event, a corrupt lane). */
  onError(fn) {
    this._errorListeners.push(fn);
    return this;
  }

  /** `event` to every live worker, this one included. Returns how many. */
  broadcast(event, data) {
    return this._emit('all', event, data);
  }

  /** `event` to the worker in `slot`. */
  emit(slot, event, data) {
    checkSlot(slot);
    return this._emit(slot, event, data);
  }

  /** ipchannel style: `to(1).send(x)`, `to('all').emit(e, x)`. */
  to(target) {
    if (target !== 'all') checkSlot(target);
    return new To(this, target);
  }

  request(slot, event, data, opts) {
    return this._call(opts, (t) => {
      checkSlot(slot);
      return this._n.startRequest(slot, String(event), encode(data), t, !!(opts && opts.raw));
    });
  }

  map(event, data, opts) {
    return this._call(opts, (t) => this._n.startMap(String(event), encode(data), t));
  }

  consume(event, data, opts) {
    return this._call(opts, (t) => this._n.startConsume(String(event), encode(data), t));
  }

  // ------------------------------------------------ leader and followers

  /**
   * Joins the election for `role` (the default role `''` if none): a
   * thread of the addon waits for the role's lock (a process-shared
   * robust mutex) and holds it while this worker leads. When the leader
   * dies, the kernel hands the lock to a waiting candidate at once.
   */
  campaign(role) {
    this._open();
    nat(() => this._n.campaign(role === undefined ? undefined : String(role)));
    this._watchLeader();
    return this;
  }

  /** Whether this worker leads the default role now. */
  get isLeader() {
    return !this._closed && this._n.isLeader();
  }

  /** Whether this worker leads `role` now. */
  isLeaderFor(role) {
    return !this._closed && this._n.isLeader(String(role));
  }

  /** The leader of `role` (the default role if none) now: `{ slot, term }`, or `null` between a death and the next election. */
  leader(role) {
    if (this._closed) return null;
    return this._n.leader(role === undefined ? undefined : String(role)) || null;
  }

  /** `fn({ slot, term, isMe })` runs for each new leader of the default role this worker sees. */
  onLeaderChange(fn) {
    if (typeof fn !== 'function') throw new ShmclusterError('INVALID_ARGUMENT', 'listener must be a function');
    this._open();
    this._changeListeners.push(fn);
    this._watchLeader();
    return this;
  }

  /** Removes a leader-change listener. */
  offLeaderChange(fn) {
    this._changeListeners = this._changeListeners.filter((f) => f !== fn);
    return this;
  }

  /**
   * Registers the leader's handler for `method` (campaigns for the default
   * role): every worker may register it, only the leader's runs. Its value
   * (or its promise's) answers the invoke; a throw answers `HANDLER_FAILED`.
   */
  onInvoke(method, fn, opts) {
    if (typeof fn !== 'function') throw new ShmclusterError('INVALID_ARGUMENT', 'handler must be a function');
    this._open();
    method = String(method);
    if (!this._invokers.has(method)) nat(() => this._n.listenInvoke(method));
    this._invokers.set(method, { fn, raw: !!(opts && opts.raw) });
    this._watchLeader();
    this._schedule();
    return this;
  }

  /** Removes the handler of `method`: invokes of it then fail `HANDLER_FAILED` here. */
  offInvoke(method) {
    this._invokers.delete(String(method));
    return this;
  }

  /**
   * Runs the leader's handler for `method` and resolves with its value.
   * Waits for a leader until the timeout (`NO_LEADER`); `LEADER_DIED` if
   * the leader dies with the call in hand, unless `opts.idempotent` (then
   * it goes to the next leader).
   */
  invoke(method, args, opts) {
    return this._call(opts, (t) =>
      this._n.startInvoke(String(method), encode(args), t, !!(opts && opts.idempotent), !!(opts && opts.raw)),
    );
  }

  /**
   * Publishes `value` on `topic` through the leader, which keeps it as the
   * topic's last value and sends it to every subscriber. Resolves once the
   * leader has it: `NO_LEADER` (none before the timeout), `LEADER_DIED`.
   */
  publish(topic, value, opts) {
    return this._call(opts, (t) => this._n.startPublish(String(topic), encode(value), t)).then(() => undefined);
  }

  /**
   * Subscribes `fn(value, ctx)` to `topic`: it runs for every value
   * published, and at once with the topic's last value if there is one.
   * Every new leader is told this worker's subscriptions. Resolves once a
   * leader has been told; rejects `NO_LEADER` if none is elected before
   * `opts.timeout` (the subscription stays: the first leader is told).
   */
  subscribe(topic, fn, opts) {
    return new Promise((resolve, reject) => {
      let told;
      try {
        if (typeof fn !== 'function') throw new ShmclusterError('INVALID_ARGUMENT', 'subscriber must be a function');
        this._open();
        const t = timeoutOf(opts);
        topic = String(topic);
        let entry = this._topics.get(topic);
        const sub = { fn, raw: !!(opts && opts.raw) };
        if (!entry) {
          this._watchLeader();
          told = nat(() => this._n.subscribe(topic));
          entry = { subs: [], last: undefined, told };
          this._topics.set(topic, entry);
        } else {
          told = entry.told;
          // Already subscribed: the last value this worker got, at once.
          if (entry.last !== undefined) {
            const last = entry.last;
            setImmediate(() => this._deliver(topic, sub, last.data, last.ctx));
          }
        }
        entry.subs.push(sub);
        if (told) {
          resolve();
        } else {
          const waiter = { topic, resolve, reject, timer: null };
          waiter.timer = setTimeout(() => {
            this._awaitingLeader.delete(waiter);
            reject(new ShmclusterError('NO_LEADER', `no leader elected within ${t} ms (the subscription stays)`));
          }, t);
          this._awaitingLeader.add(waiter);
        }
        this._schedule();
      } catch (e) {
        reject(fromNative(e));
      }
    });
  }

  /** Stops calling `fn` (or every subscriber) for `topic`'s values (the leader still sends them). */
  unsubscribe(topic, fn) {
    const entry = this._topics.get(String(topic));
    if (entry) entry.subs = fn ? entry.subs.filter((s) => s.fn !== fn) : [];
    return this;
  }

  /** The wake keeps the process alive (the default). */
  ref() {
    this._referenced = true;
    if (!this._closed) this._n.setRef(true);
    return this;
  }

  /** An idle messenger does not keep the process alive. */
  unref() {
    this._referenced = false;
    if (!this._closed) this._n.setRef(false);
    return this;
  }

  /** Stops the wake; calls in flight fail with `WORKER_CLOSED`. */
  close() {
    if (this._closed) return;
    this._closed = true;
    clearInterval(this._net);
    if (this._due) clearTimeout(this._due);
    this._n.close();
    const err = new ShmclusterError('WORKER_CLOSED', 'the messenger is closed');
    for (const p of this._pending.values()) p.reject(err);
    this._pending.clear();
    for (const w of this._awaitingLeader) {
      clearTimeout(w.timer);
      w.reject(err);
    }
    this._awaitingLeader.clear();
  }

  // ----------------------------------------------------------------- inside

  _open() {
    if (this._closed) throw new ShmclusterError('WORKER_CLOSED', 'the messenger is closed');
  }

  _emit(target, event, data) {
    this._open();
    const n = nat(() => this._n.emit(target, String(event), encode(data)));
    this._schedule();
    return n;
  }

  _call(opts, start) {
    return new Promise((resolve, reject) => {
      let ticket;
      try {
        this._open();
        const t = timeoutOf(opts);
        ticket = nat(() => start(t));
      } catch (e) {
        reject(e);
        return;
      }
      this._pending.set(ticket, { resolve, reject, raw: !!(opts && opts.raw) });
      this._schedule();
    });
  }

  _schedule() {
    if (this._scheduled || this._closed) return;
    this._scheduled = true;
    setImmediate(() => this._turn());
  }

  _error(e) {
    if (this._errorListeners.length === 0) {
      process.emitWarning(`shmcluster: ${errorText(e)}`);
      return;
    }
    for (const fn of this._errorListeners) {
      try {
        fn(e);
      } catch (_) {
        // An error listener that throws has nowhere else to go.
      }
    }
  }

  // Turns the addon and hands JS what it brought. When handlers answered
  // at once (their answers are sent already), it turns again at once, to
  // catch the same caller's next call, up to ROUNDS_PER_TURN times; then
  // the next turn waits for the event loop (setImmediate).
  _turn() {
    this._scheduled = false;
    if (this._closed) return;
    // Never inside itself: `_rec` is being read.
    if (this._inTurn) {
      this._schedule();
      return;
    }
    for (let round = 1; !this._closed; round++) {
      let vals;
      try {
        vals = this._n.turn(this._rec);
      } catch (e) {
        this._error(fromNative(e));
        return;
      }
      if (vals === null) break;
      this._again = false;
      this._inTurn = true;
      try {
        this._apply(vals);
      } finally {
        this._inTurn = false;
      }
      if (!this._again || this._scheduled) break;
      if (round >= ROUNDS_PER_TURN) {
        this._schedule();
        break;
      }
    }
    if (this._w._checkStop) this._w._checkStop();
  }

  // The records of one turn (src/lib.rs, `mod tag`), in order: their
  // numbers in `_rec`, their values in `vals` (one value alone, or an
  // array of them).
  _apply(vals) {
    const rec = this._rec;
    const n = rec[0] + 1;
    const many = Array.isArray(vals);
    let v = 0;
    const val = () => (many ? vals[v++] : vals);
    let i = 1;
    while (i < n) {
      switch (rec[i]) {
        case T_ANSWER:
          this._answered(rec[i + 1], val());
          i += 2;
          break;
        case T_CALL:
          this._called(rec[i + 1], rec[i + 2], rec[i + 3], val());
          i += 4;
          break;
        case T_EVENT:
          this._evented(rec[i + 1], rec[i + 2], val());
          i += 3;
          break;
        case T_SETTLED:
          this._settle(val());
          i += 1;
          break;
        case T_INCOMING:
          this._incoming(val());
          i += 1;
          break;
        case T_LEADER:
          this._leaderChanged(val());
          i += 1;
          break;
        case T_CORRUPT:
          this._error(new ShmclusterError('CORRUPT', val()));
          i += 1;
          break;
        case T_MORE:
          this._schedule();
          i += 1;
          break;
        case T_DUE:
          this._arm(rec[i + 1] < 0 ? null : rec[i + 1]);
          i += 2;
          break;
        default:
          // Unknown to this index.js: nothing after it can be read.
          this._error(new ShmclusterError('UNKNOWN', `unknown turn record ${rec[i]}`));
          return;
      }
    }
  }

  _name(id) {
    let name = this._names[id];
    if (name === undefined) {
      name = this._n.eventName(id);
      this._names[id] = name;
    }
    return name;
  }

  // Calls in flight must be looked at by `dueMs` (deadlines, deaths).
  _arm(dueMs) {
    if (dueMs === undefined || dueMs === null) {
      if (this._due) {
        clearTimeout(this._due);
        this._due = null;
        this._dueAt = Infinity;
      }
      return;
    }
    const at = Date.now() + dueMs;
    if (this._due && this._dueAt <= at) return;
    if (this._due) clearTimeout(this._due);
    this._dueAt = at;
    // Ref'd: a call in flight keeps the process alive until it ends.
    this._due = setTimeout(() => {
      this._due = null;
      this._dueAt = Infinity;
      this._turn();
    }, Math.max(0, Math.ceil(dueMs)));
  }

  // A request's (an invoke's) answer.
  _answered(ticket, data) {
    const p = this._pending.get(ticket);
    if (!p) return;
    this._pending.delete(ticket);
    let v;
    try {
      v = p.raw ? bytesOf(data) : decode(data);
    } catch (e) {
      p.reject(new ShmclusterError('DECODE', `the answer is not JSON: ${e.message}`));
      return;
    }
    p.resolve(v);
  }

  _settle(s) {
    const p = this._pending.get(s.ticket);
    if (!p) return;
    this._pending.delete(s.ticket);
    if (!s.ok) {
      p.reject(new ShmclusterError(s.code, s.message));
      return;
    }
    if (s.kind === 'answer') {
      let v;
      try {
        v = p.raw ? s.value : decode(s.value);
      } catch (e) {
        p.reject(new ShmclusterError('DECODE', `the answer is not JSON: ${e.message}`));
        return;
      }
      p.resolve(v);
    } else if (s.kind === 'map') {
      p.resolve(
        s.entries.map((e) => {
          if (!e.ok) return { slot: e.slot, ok: false, error: { code: e.code, message: e.message } };
          try {
            return { slot: e.slot, ok: true, value: p.raw ? e.value : decode(e.value) };
          } catch (err) {
            return { slot: e.slot, ok: false, error: { code: 'DECODE', message: `the answer is not JSON: ${err.message}` } };
          }
        }),
      );
    } else {
      p.resolve({ slot: s.slot, deliveryId: s.deliveryId, attempts: s.attempts });
    }
  }

  // Answers a call (the addon sends it at once; too large a value
  // answers HANDLER_FAILED there). Inside a turn, that turn turns again;
  // else the next one is scheduled.
  _answer(replyId, value, error) {
    if (this._closed) return;
    try {
      if (error === undefined) {
        let res;
        try {
          res = encode(value);
        } catch (e) {
          error = errorText(e);
        }
        if (error === undefined) this._n.reply(replyId, res);
      }
      if (error !== undefined) this._n.replyError(replyId, error);
    } catch (e) {
      this._error(fromNative(e));
    }
    if (this._inTurn) this._again = true;
    else this._schedule();
  }

  _watchLeader() {
    if (this._watching) return;
    nat(() => this._n.watchLeader());
    this._watching = true;
  }

  // A new leader: the turn that saw it told it every subscription.
  _leaderChanged(c) {
    for (const e of this._topics.values()) e.told = true;
    for (const w of this._awaitingLeader) {
      clearTimeout(w.timer);
      w.resolve();
    }
    this._awaitingLeader.clear();
    const change = { slot: c.slot, term: c.term, isMe: c.isMe };
    for (const fn of this._changeListeners.slice()) {
      try {
        const r = fn(change);
        if (r && typeof r.then === 'function') r.then(undefined, (e) => this._error(e));
      } catch (e) {
        this._error(e);
      }
    }
  }

  _deliver(topic, sub, data, ctx) {
    let v;
    try {
      v = sub.raw ? data : decode(data);
    } catch (e) {
      this._error(new ShmclusterError('DECODE', `topic ${topic} from slot ${ctx.sender}: value is not JSON: ${e.message}`));
      return;
    }
    try {
      const r = sub.fn(v, ctx);
      if (r && typeof r.then === 'function') r.then(undefined, (e) => this._error(e));
    } catch (e) {
      this._error(e);
    }
  }

  _topic(inc) {
    const entry = this._topics.get(inc.event);
    if (!entry) return;
    const ctx = { sender: inc.sender, event: inc.event, kind: 'topic', deliveryId: '0' };
    entry.last = { data: inc.data, ctx };
    for (const sub of entry.subs.slice()) this._deliver(inc.event, sub, inc.data, ctx);
  }

  _invoked(inc) {
    const h = this._invokers.get(inc.event);
    if (!h) {
      this._answer(inc.replyId, undefined, `no invoke handler for ${inc.event}`);
      return;
    }
    const ctx = { sender: inc.sender, event: inc.event, kind: 'invoke', deliveryId: '0' };
    this._run(h, inc.data, inc.replyId, ctx);
  }

  // Runs a call's handler and answers with its value (or promise's).
  _run(h, data, replyId, ctx) {
    let v;
    try {
      v = h.raw ? bytesOf(data) : decode(data);
    } catch (e) {
      this._answer(replyId, undefined, `payload is not JSON: ${e.message}`);
      return;
    }
    let r;
    try {
      r = h.fn(v, ctx);
    } catch (e) {
      this._answer(replyId, undefined, errorText(e));
      return;
    }
    if (r && typeof r.then === 'function') {
      r.then(
        (value) => this._answer(replyId, value),
        (e) => this._answer(replyId, undefined, errorText(e)),
      );
    } else {
      this._answer(replyId, r);
    }
  }

  // A request's (a map's) call for event id `id` (a CALL record).
  _called(id, sender, replyId, data) {
    const event = this._name(id);
    this._callIn(event, { sender, event, kind: 'request', deliveryId: '0' }, replyId, data);
  }

  // An event (an EVENT record).
  _evented(id, sender, data) {
    const event = this._name(id);
    this._eventIn(event, { sender, event, kind: 'event', deliveryId: '0' }, data);
  }

  _incoming(inc) {
    if (inc.kind === 'topic') return this._topic(inc);
    if (inc.kind === 'invoke') return this._invoked(inc);
    const ctx = { sender: inc.sender, event: inc.event, kind: inc.kind, deliveryId: inc.deliveryId };
    if (inc.replyId !== null && inc.replyId !== undefined) this._callIn(inc.event, ctx, inc.replyId, inc.data);
    else this._eventIn(inc.event, ctx, inc.data);
  }

  // A call: the first handler answers.
  _callIn(event, ctx, replyId, data) {
    const list = this._handlers.get(event);
    if (!list || list.length === 0) {
      this._answer(replyId, undefined, `no handler for ${event}`);
      return;
    }
    this._run(list[0], data, replyId, ctx);
  }

  _eventIn(event, ctx, data) {
    const list = this._handlers.get(event);
    if (!list || list.length === 0) return;
    for (const h of list.slice()) {
      let v;
      try {
        v = h.raw ? bytesOf(data) : decode(data);
      } catch (e) {
        this._error(new ShmclusterError('DECODE', `event ${event} from slot ${ctx.sender}: payload is not JSON: ${e.message}`));
        continue;
      }
      try {
        const r = h.fn(v, ctx);
        if (r && typeof r.then === 'function') r.then(undefined, (e) => this._error(e));
      } catch (e) {
        this._error(e);
      }
    }
  }
}

/** A worker of a shmcluster cluster. Emits `stop` when asked to stop. */
class Worker extends EventEmitter {
  /**
   * The worker a `shmcluster run` master spawned this process as.
   * `opts.spin`: how long (µs) a turn polls before it parks, after this
   * worker started a request (`request`, default 50) or answered a call
   * (`answer`, default 20): `{ request, answer }`, or one number for both
   * (0: never spin). `NODE_SHMCLUSTER_SPIN=request[,answer]` sets the
   * defaults. See src/lib.rs, `Spin`.
   */
  static fromEnv(opts) {
    return new Worker(nat(() => Native.fromEnv()), opts);
  }

  /** A cluster of one in this process (no master): the same API. */
  static standalone(opts) {
    return new Worker(nat(() => Native.standalone()), opts);
  }

  constructor(n, opts) {
    super();
    this._n = n;
    this._m = null;
    this._stopped = false;
    this._closed = false;
    if (opts && opts.spin !== undefined) {
      try {
        const [request, answer] = spinOf(opts.spin, n.spin);
        n.setSpin(request, answer);
      } catch (e) {
        n.close();
        throw e;
      }
    }
  }

  get slot() {
    return this._n.slot;
  }

  get instances() {
    return this._n.instances;
  }

  /** This worker's instance number (`0..instances`), kept across respawns and reloads. */
  get index() {
    return this._n.index;
  }

  /** This worker's generation in its slot: a respawn or a reload makes a new one. */
  get generation() {
    return this._n.generation;
  }

  /**
   * Asks the master for a rolling reload of every worker (this one
   * included), as `SIGHUP` to the master does; nothing without a master.
   */
  requestReload() {
    if (this._closed) throw new ShmclusterError('WORKER_CLOSED', 'the worker is closed');
    nat(() => this._n.requestReload());
  }

  /**
   * Asks the master for a graceful shutdown of the whole cluster (every
   * worker gets `stop`, this one included), as `SIGTERM` to the master or
   * `shmcluster stop` does.
   */
  requestShutdown() {
    if (this._closed) throw new ShmclusterError('WORKER_CLOSED', 'the worker is closed');
    nat(() => this._n.requestShutdown());
    if (this._m) this._m._schedule();
  }

  /** Tells the master this worker is ready to serve. */
  ready() {
    nat(() => this._n.ready());
    if (this._m) this._m._schedule();
  }

  /** Whether the master asked this worker to stop (drain, shutdown). */
  shouldStop() {
    return !this._closed && this._n.shouldStop();
  }

  /** The worker's messenger (one per worker). */
  messenger() {
    if (this._closed) throw new ShmclusterError('WORKER_CLOSED', 'the worker is closed');
    if (!this._m) this._m = new Messenger(this);
    return this._m;
  }

  /**
   * cluster-synchronize: runs `fn(section)` holding the process-shared
   * robust mutex `name` (the global lock without a name), across awaits.
   * A thread of the addon takes the lock and holds it until `fn`'s promise
   * settles (a pthread mutex belongs to the thread that locked it).
   * `section.ownerDied`: the previous holder died inside its section;
   * `section.fencingToken`: larger than every earlier holder's.
   * `opts.timeout` (ms): give up with `LOCK_TIMEOUT`. A `close()` ends a
   * section still waiting for its lock with `WORKER_CLOSED` (its `fn` never
   * runs); a running one keeps the lock until its promise settles.
   */
  async synchronize(name, fn, opts) {
    if (typeof name === 'function') {
      opts = fn;
      fn = name;
      name = '';
    }
    if (typeof fn !== 'function') throw new ShmclusterError('INVALID_ARGUMENT', 'section must be a function');
    if (this._closed) throw new ShmclusterError('WORKER_CLOSED', 'the worker is closed');
    const t = opts && opts.timeout !== undefined ? opts.timeout : null;
    let held;
    try {
      held = await this._n.lockAcquire(String(name), t);
    } catch (e) {
      throw fromNative(e);
    }
    try {
      // Closed while the lock came: the section does not run.
      if (this._closed) throw new ShmclusterError('WORKER_CLOSED', 'the worker closed while the section waited for its lock');
      return await fn({ name: String(name), ownerDied: held.ownerDied, fencingToken: held.fencingToken });
    } finally {
      // Even after a close: the lock stays held until the section ends.
      this._n.lockRelease(held.id);
    }
  }

  ref() {
    if (this._m) this._m.ref();
    return this;
  }

  unref() {
    if (this._m) this._m.unref();
    return this;
  }

  close() {
    if (this._closed) return;
    if (this._m) this._m.close();
    else this._n.close();
    this._closed = true;
  }

  _checkStop() {
    if (!this._stopped && this.shouldStop()) {
      this._stopped = true;
      this.emit('stop');
    }
  }
}

module.exports = { Worker, Messenger, ShmclusterError, DEFAULT_TIMEOUT };
Object.assign(module.exports, require('./listen.js')); // listeners and drain (listen.js)
