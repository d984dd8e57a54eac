// Types of the shmcluster Node.js package (hand-written; see index.js).
/// <reference types="node" />
import { EventEmitter } from 'node:events';

/** Default timeout of request, map and consume, in milliseconds. */
export declare const DEFAULT_TIMEOUT: number;

/**
 * The codes of `ShmclusterError` (the C ABI's result names, ffi/src/result.rs),
 * plus `DECODE` for an answer that is not JSON.
 */
export type ErrorCode =
  | 'NO_SUCH_WORKER'
  | 'NO_HANDLER'
  | 'HANDLER_FAILED'
  | 'WORKER_DIED'
  | 'TIMED_OUT'
  | 'TOO_LARGE'
  | 'EVENT_NAME'
  | 'DECODE'
  | 'CORRUPT'
  | 'IN_HANDLER'
  | 'HOST_UNREACHABLE'
  | 'NO_LEADER'
  | 'LEADER_DIED'
  | 'INVALID_ARGUMENT'
  | 'WORKER_CLOSED'
  | 'ENVIRONMENT'
  | 'IO'
  | 'LOCK_NAME_TOO_LONG'
  | 'LOCK_TABLE_FULL'
  | 'LOCK_WOULD_DEADLOCK'
  | 'LOCK_TIMEOUT'
  | 'LOCK_UNRECOVERABLE'
  | 'GLIBC'
  | 'UNKNOWN';

/** Every error of this package: an `Error` with a `code`. */
export declare class ShmclusterError extends Error {
  constructor(code: ErrorCode, message: string);
  readonly code: ErrorCode;
}

/** What a handler learns about the message it runs for. */
export interface Context {
  /** The sender's slot. */
  sender: number;
  event: string;
  /** `event` for emit/send/broadcast, `request` for request and map, `consume`. */
  kind: 'event' | 'request' | 'consume';
  /** A consume's delivery id (the same on a redelivery; decimal), else `"0"`. */
  deliveryId: string;
}

/**
 * A handler: its value (or its promise's) answers a request, map or consume;
 * a throw (or rejection) answers `HANDLER_FAILED` with its message. The
 * payload is the decoded JSON value, or a `Buffer` with `{ raw: true }`.
 */
export type Handler = (data: any, ctx: Context) => unknown;

export interface HandlerOptions {
  /** Give the handler the payload's raw bytes. */
  raw?: boolean;
}

export interface CallOptions {
  /** Milliseconds (default `DEFAULT_TIMEOUT`). */
  timeout?: number;
  /** Resolve with the answer's raw bytes (a `Buffer`) instead of JSON. */
  raw?: boolean;
}

/** One worker's entry of a map. */
export type MapEntry<T = any> =
  | { slot: number; ok: true; value: T }
  | { slot: number; ok: false; error: { code: ErrorCode; message: string } };

/** How a consume ended: the worker that ran it. */
export interface Consumed {
  slot: number;
  /** Decimal (ids use all 64 bits). */
  deliveryId: string;
  attempts: number;
}

/** A role's leader: its slot and term (larger than every earlier leader's of the role). */
export interface LeaderInfo {
  slot: number;
  /** Exact below 2^53. */
  term: number;
}

/** A new leader of the default role, as `onLeaderChange` listeners get it. */
export interface LeaderChange extends LeaderInfo {
  /** The new leader is this worker. */
  isMe: boolean;
}

export interface InvokeOptions extends CallOptions {
  /**
   * The method is safe to run twice: if the leader dies with the call in
   * hand it goes to the next leader instead of rejecting `LEADER_DIED`.
   */
  idempotent?: boolean;
}

export interface SubscribeOptions {
  /** Milliseconds to wait for a leader to be told (default `DEFAULT_TIMEOUT`). */
  timeout?: number;
  /** Give the subscriber the values' raw bytes (a `Buffer`). */
  raw?: boolean;
}

/** What a subscriber learns about a value: `sender` is the leader that sent it. */
export interface TopicContext {
  sender: number;
  /** The topic. */
  event: string;
  kind: 'topic';
  deliveryId: '0';
}

/** What an invoke handler learns: `sender` is the invoking worker's slot. */
export interface InvokeContext {
  sender: number;
  /** The method. */
  event: string;
  kind: 'invoke';
  deliveryId: '0';
}

/** ipchannel-style sender: `m.to(1).send(x)`, `m.to('all').emit(event, x)`. */
export interface To {
  /** The `message` event. Returns how many workers it was sent to. */
  send(data: unknown): number;
  emit(event: string, data: unknown): number;
}

/** The messenger of a worker, driven by the JS thread. */
export declare class Messenger {
  private constructor();
  /** The payload limit in bytes. */
  readonly maxPayload: number;
  /** Microseconds a turn polls before it parks, after a request started or a call answered. */
  readonly spin: { request: number; answer: number };
  /** How an idle loop is woken: libuv polling the slot's eventfd, or the fallback waiter thread. */
  readonly wake: 'eventfd' | 'thread';
  on(event: string, fn: Handler, opts?: HandlerOptions): this;
  off(event: string, fn?: Handler): this;
  /** Errors no caller can be told of (an event that is not JSON, a corrupt lane). */
  onError(fn: (err: Error) => void): this;
  /** `event` to every live worker, this one included. Returns how many. */
  broadcast(event: string, data?: unknown): number;
  /** `event` to the worker in `slot`. */
  emit(slot: number, event: string, data?: unknown): number;
  to(target: number | 'all'): To;
  request<T = any>(slot: number, event: string, data?: unknown, opts?: CallOptions): Promise<T>;
  /** One entry per worker live at the start, in slot order; never past the timeout. */
  map<T = any>(event: string, data?: unknown, opts?: CallOptions): Promise<MapEntry<T>[]>;
  /** Runs on exactly one worker with a handler (at least once if it dies). */
  consume(event: string, data?: unknown, opts?: CallOptions): Promise<Consumed>;
  /**
   * Joins the election for `role` (the default role `''` if none): a thread
   * of the addon holds the role's robust mutex while this worker leads.
   */
  campaign(role?: string): this;
  /** Whether this worker leads the default role now. */
  readonly isLeader: boolean;
  /** Whether this worker leads `role` now. */
  isLeaderFor(role: string): boolean;
  /** The leader of `role` (default role) now, or `null` between a death and the next election. */
  leader(role?: string): LeaderInfo | null;
  /** `fn` runs for each new leader of the default role this worker sees. */
  onLeaderChange(fn: (change: LeaderChange) => unknown): this;
  offLeaderChange(fn: (change: LeaderChange) => unknown): this;
  /**
   * The leader's handler for `method` (campaigns for the default role):
   * only the leader's runs. Its value (or promise's) answers the invoke.
   */
  onInvoke(method: string, fn: (args: any, ctx: InvokeContext) => unknown, opts?: HandlerOptions): this;
  offInvoke(method: string): this;
  /**
   * Runs the leader's handler for `method`. Rejects `NO_LEADER` (none
   * before the timeout), `LEADER_DIED` (unless `idempotent`), and as `request`.
   */
  invoke<T = any>(method: string, args?: unknown, opts?: InvokeOptions): Promise<T>;
  /** Publishes `value` on `topic` through the leader (`NO_LEADER`, `LEADER_DIED`). */
  publish(topic: string, value?: unknown, opts?: { timeout?: number }): Promise<void>;
  /**
   * `fn` runs for every value published on `topic`, and at once with its
   * last value. Resolves once a leader has been told; rejects `NO_LEADER`
   * after the timeout (the subscription stays).
   */
  subscribe(topic: string, fn: (value: any, ctx: TopicContext) => unknown, opts?: SubscribeOptions): Promise<void>;
  /** Stops calling `fn` (or every subscriber of `topic`). */
  unsubscribe(topic: string, fn?: (value: any, ctx: TopicContext) => unknown): this;
  ref(): this;
  /** An idle messenger no longer keeps the process alive. */
  unref(): this;
  /** Calls in flight fail with `WORKER_CLOSED`. */
  close(): void;
}

/** What a `synchronize` section knows about its acquisition. */
export interface Section {
  /** The lock's name (`''` for the global lock). */
  name: string;
  /** The previous holder died inside its section: check the data it guards. */
  ownerDied: boolean;
  /** Larger than every earlier acquisition's of the same lock. */
  fencingToken: number;
}

/** Options of `Worker.fromEnv` and `Worker.standalone`. */
export interface WorkerOptions {
  /**
   * How long (µs, 0 to 1000) a turn polls the lanes on the JS thread before
   * it parks: after this worker started a request (`request`, default 50:
   * it catches its answer without a wake) and after it answered a call
   * (`answer`, default 20: it catches the caller's next call). One number
   * sets both; 0 never spins. `NODE_SHMCLUSTER_SPIN=request[,answer]` sets
   * the defaults.
   */
  spin?: number | { request?: number; answer?: number };
}

/** A worker of a shmcluster cluster. Emits `stop` when the master asks it to stop. */
export declare class Worker extends EventEmitter {
  private constructor();
  /** The worker a `shmcluster run` master spawned this process as. */
  static fromEnv(opts?: WorkerOptions): Worker;
  /** A cluster of one in this process (no master): the same API. */
  static standalone(opts?: WorkerOptions): Worker;
  readonly slot: number;
  readonly instances: number;
  /** This worker's instance number (`0..instances`), kept across respawns and reloads. */
  readonly index: number;
  /** This worker's generation in its slot: a respawn or a reload makes a new one. */
  readonly generation: number;
  /** Asks the master for a rolling reload of every worker, this one included (nothing without a master). */
  requestReload(): void;
  /** Asks the master for a graceful shutdown of the whole cluster: every worker, this one included, gets `stop`. */
  requestShutdown(): void;
  /** Tells the master this worker is ready. */
  ready(): void;
  shouldStop(): boolean;
  /** The worker's messenger (one per worker). */
  messenger(): Messenger;
  /**
   * Runs `fn` holding the process-shared robust mutex `name` (the global
   * one without a name) across awaits; rejects with `LOCK_TIMEOUT` after
   * `opts.timeout` ms without it. Never nest sections of one lock.
   */
  synchronize<R>(fn: (section: Section) => R | Promise<R>, opts?: { timeout?: number }): Promise<R>;
  synchronize<R>(name: string, fn: (section: Section) => R | Promise<R>, opts?: { timeout?: number }): Promise<R>;
  ref(): this;
  unref(): this;
  close(): void;
  on(event: 'stop', listener: () => void): this;
  on(event: string | symbol, listener: (...args: any[]) => void): this;
}

// ---------------------------------------------------------------- listen.js

/** A listening socket the master handed this process (`LISTEN_FDS`). */
export interface ListenFd {
  /** Its descriptor (3, 4, ...): yours once taken; whatever listens on it closes it. */
  fd: number;
  /** Its `LISTEN_FDNAMES` name (`listen0`, ... by default). */
  name: string;
}
/** The inherited listeners in `LISTEN_FDS` order (`[]` if none); taken once, later calls return the same list. */
export declare function listenFds(): ListenFd[];
/** `{ fd }` of listener `which` (its index, default 0, or its name) for `server.listen(listener(), cb)`; throws `ENVIRONMENT` if there is none. */
export declare function listener(which?: number | string): { fd: number };
export interface DrainOptions {
  /** How long a draining server leaves idle keep-alive connections open, in ms (default 5000). */
  idleTimeout?: number;
  /** `drainOnStop`: exit the process (code 0) once drained (default true). */
  exit?: boolean;
}
/** Prepares `server` for a drain (call before it listens); the returned function starts it and resolves once every connection has ended. */
export declare function drainer(server: import('node:net').Server, opts?: DrainOptions): () => Promise<void>;
/** On the worker's `stop`: stop accepting, answer with `Connection: close`, close idle connections after `idleTimeout`, then close the worker and exit 0. */
export declare function drainOnStop(worker: Worker, server: import('node:net').Server, opts?: DrainOptions): () => Promise<void>;
/** The default `idleTimeout` (ms). */
export declare const DRAIN_IDLE_TIMEOUT: number;
