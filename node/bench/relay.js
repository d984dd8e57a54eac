'use strict';
/**
 * The baselines of issue 16's benchmark: how fast Node's own cluster IPC
 * carries a request and a broadcast between workers, measured the way the
 * libraries shmcluster replaces do it. Plain Node 20, no dependencies, no
 * addon:
 *
 *     node node/bench/relay.js            # markdown table + JSON lines
 *     node node/bench/relay.js --json     # JSON lines only
 *     node node/bench/relay.js --serialization advanced --n 5000
 *
 * One run forks 4 workers with the `cluster` module; worker 2 drives every
 * phase, worker 3 answers its requests, worker 1 hosts the ipchannel-style
 * hub. Rows (p50 / p99 / mean of N timed operations after a warm-up, one in
 * flight at a time, each phase bounded in time, the whole run < 60 s):
 *
 *   process.send echo          worker 2 → master → worker 2 (the master
 *                              echoes): one pipe round trip, no relay.
 *   relay request              worker 2 → master → worker 3 → master →
 *                              worker 2: a request and its reply between two
 *                              workers, each leg relayed by the master.
 *   relay broadcast (last receipt)
 *                              worker 2 → master → all 4 workers (worker 2
 *                              included): from the send to the last worker's
 *                              receipt, each receipt stamped in the receiving
 *                              worker with process.hrtime.bigint().
 *   relay broadcast (all acks) the same broadcast, until every other
 *                              receiver's ack (again relayed by the master) is
 *                              back at worker 2 — what a caller can observe.
 *   uds relay request / broadcast (last receipt / all acks)
 *                              the same shapes over ipchannel's transport: a
 *                              Unix domain socket from every worker to a hub
 *                              in worker 1, length-framed JSON; the master
 *                              takes no part.
 *
 * What the libraries do, read from their published sources (think-cluster
 * 1.5.8, ipchannel 0.2.8 with open-channel 0.1.10 and bsp 1.x; nothing of
 * theirs is copied here):
 *
 * - think-cluster (`think.messenger`): a worker calls `process.send` with a
 *   plain object `{act: 'think-messenger', action, data, target}`. The
 *   master's single `cluster.on('message')` handler picks the target workers
 *   (`'all'`, or `'one'` for consume) and calls `worker.send(message)` with the
 *   same object for each; the worker's `process.on('message')` emits `action`
 *   locally. `map` adds a second relayed hop back (`mapReturn`) that the master
 *   collects before answering the caller. think-cluster forks with
 *   `cluster.fork(env)` and never sets `serialization`, so every hop is Node's
 *   default 'json' IPC: JSON.stringify + newline over the fork's socketpair,
 *   parsed again in the master and re-stringified to each receiver. It has no
 *   worker-to-worker request/reply; the closest is `map`, which is the
 *   "relay request" shape above with the master in the middle of both legs.
 * - ipchannel (SFN's `channel.to(id).send`, `emit`, `to('all')`): not the
 *   cluster pipe. open-channel picks a "manager" process with
 *   manager-process: among the node processes running the same script, the
 *   first child of their common parent — in a cluster the first worker,
 *   skipping the master on purpose. The manager listens on a Unix domain
 *   socket under os.tmpdir(); every process, the manager included, connects
 *   to it as a client (writes are queued until connected). Each message is
 *   `[receiver, event, senderId, ...data]`, encoded by bsp: a small header
 *   (type, length) then the payload, objects as JSON. The server decodes,
 *   and writes a re-encoded `[sender, event, ...data]` to the receiver's
 *   socket — or to every client for `'all'`, the sender included.
 * - PM2's cluster mode: a worker's `process.send({type: 'process:msg', ...})`
 *   reaches the PM2 daemon (the cluster master) over the same 'json' IPC;
 *   reaching another worker goes through `pm2.sendDataToProcessId`, an RPC to
 *   the daemon over its own socket which then `send`s to the target. That is
 *   at least the hops of "relay request", so the rows here are a lower bound
 *   for PM2.
 *
 * How this file mimics them: the "relay" rows use exactly think-cluster's
 * path — plain objects tagged `act: 'think-messenger'` through
 * `process.send`, one master `cluster.on('message')` handler that forwards
 * the received object with `worker.send`, default 'json' serialization
 * (`--serialization advanced` measures the V8-serializer channel instead).
 * The "uds relay" rows use ipchannel's path — a UDS hub in the first worker,
 * one client socket per worker (the hub's own included), `[receiver, event,
 * sender, data]` arrays as JSON behind a 4-byte length, re-encoded by the hub
 * per receiver; the hub is neither the requester nor the responder, so a
 * request crosses it twice like the master relay. The
 * payload of every message is a small object `{seq, text}` (~40 bytes of
 * JSON), one message in flight at a time.
 *
 * Clocks: process.hrtime.bigint() is libuv's uv_hrtime(), which on Linux is
 * clock_gettime(CLOCK_MONOTONIC) — one clock for every process on the
 * machine. The run checks it anyway before trusting cross-process stamps:
 * the master sends each worker a probe between two readings of its own
 * clock, and the worker's reading must fall between them every time. If it
 * does not, the "last receipt" rows are left out and only "all acks" rows
 * (measured on one clock) are printed.
 */

const cluster = require('node:cluster');
const net = require('node:net');
const os = require('node:os');
const path = require('node:path');
const fs = require('node:fs');

/** Number of workers forked (the broadcast fan-out is to 4). */
const WORKERS = 4;
/** The tag think-cluster puts on its messenger messages. */
const MESSENGER = 'think-messenger';
/** Tag of this benchmark's own control messages (never timed). */
const CONTROL = 'relay-bench';
/** Whole-run watchdog: workers are killed and the run fails past this. */
const RUN_DEADLINE_MS = 58_000;
/** How many probes per worker the clock check sends. */
const CLOCK_PROBES = 50;
/**
 * The worker that hosts the ipchannel-style hub: open-channel's "manager",
 * which is the first worker of a cluster, never the master.
 */
const HUB = 1;
/** The worker that drives every phase (sends, times, collects). */
const DRIVER = 2;
/** The worker that answers the driver's requests. */
const RESPONDER = 3;

/**
 * Parses the command line.
 * @returns {{n: number, warmup: number, budgetMs: number, json: boolean,
 *            serialization: 'json' | 'advanced'}}
 */
function parseArgs(argv) {
  const opts = { n: 20_000, warmup: 1_000, budgetMs: 8_000, json: false, serialization: 'json' };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    const next = () => {
      if (i + 1 >= argv.length) usage(`${a} needs a value`);
      return argv[++i];
    };
    if (a === '--json') opts.json = true;
    else if (a === '--n') opts.n = positive(a, next());
    else if (a === '--warmup') opts.warmup = positive(a, next(), true);
    else if (a === '--budget-ms') opts.budgetMs = positive(a, next());
    else if (a === '--serialization') {
      const s = next();
      if (s !== 'json' && s !== 'advanced') usage('--serialization is json or advanced');
      opts.serialization = s;
    } else usage(`unknown argument ${a}`);
  }
  // Five phases must fit in the watchdog with room for start and shutdown.
  if (opts.budgetMs * 5 > RUN_DEADLINE_MS - 8_000) usage('--budget-ms too large for a 60 s run');
  return opts;
}

function positive(name, text, zeroOk = false) {
  const v = Number(text);
  if (!Number.isInteger(v) || v < (zeroOk ? 0 : 1)) usage(`${name} wants an integer, got ${text}`);
  return v;
}

function usage(why) {
  process.stderr.write(
    `relay.js: ${why}\n` +
      'usage: node node/bench/relay.js [--json] [--n N] [--warmup N] ' +
      '[--budget-ms MS] [--serialization json|advanced]\n',
  );
  process.exit(2);
}

/** Nearest-rank percentile of an ascending-sorted Float64Array. */
function percentile(sorted, p) {
  if (sorted.length === 0) return NaN;
  const rank = Math.ceil(p * sorted.length);
  return sorted[Math.min(sorted.length, Math.max(1, rank)) - 1];
}

/** p50 / p99 / mean / n of samples in nanoseconds. */
function summarize(samples) {
  const sorted = Float64Array.from(samples).sort();
  let sum = 0;
  for (const s of sorted) sum += s;
  return {
    n: sorted.length,
    p50_ns: percentile(sorted, 0.5),
    p99_ns: percentile(sorted, 0.99),
    mean_ns: sorted.length ? Math.round(sum / sorted.length) : NaN,
  };
}

// ---------------------------------------------------------------------------
// ipchannel-style framing: a 4-byte little-endian length, then JSON.

/** Encodes one message as a length-prefixed JSON frame. */
function encodeFrame(value) {
  const body = Buffer.from(JSON.stringify(value));
  const frame = Buffer.allocUnsafe(4 + body.length);
  frame.writeUInt32LE(body.length, 0);
  body.copy(frame, 4);
  return frame;
}

/** Largest frame a peer may announce; a bigger length is a broken stream. */
const MAX_FRAME = 1 << 20;

/**
 * Splits a byte stream into frames; calls `onMessage` with each parsed value.
 * Returns the chunk handler for `socket.on('data')`.
 */
function frameReader(onMessage, onError) {
  let pending = Buffer.alloc(0);
  return (chunk) => {
    pending = pending.length ? Buffer.concat([pending, chunk]) : chunk;
    let at = 0;
    while (pending.length - at >= 4) {
      const len = pending.readUInt32LE(at);
      if (len > MAX_FRAME) return onError(new Error(`frame of ${len} bytes`));
      if (pending.length - at - 4 < len) break;
      let value;
      try {
        value = JSON.parse(pending.toString('utf8', at + 4, at + 4 + len));
      } catch (err) {
        return onError(err);
      }
      at += 4 + len;
      onMessage(value);
    }
    pending = at === pending.length ? Buffer.alloc(0) : pending.subarray(at);
  };
}

// ---------------------------------------------------------------------------
// Master: the relay, the clock check, the phases, the report.

function runMaster() {
  const opts = parseArgs(process.argv.slice(2));
  const started = Date.now();
  const sockPath = path.join(os.tmpdir(), `shmcluster-relay-bench-${process.pid}.sock`);
  /** @type {Map<number, import('node:cluster').Worker>} worker id → worker */
  const workers = new Map();
  /** One-shot waiters for control replies, by kind. */
  const waiting = new Map();
  let finished = false;

  const watchdog = setTimeout(() => fail(new Error(`run exceeded ${RUN_DEADLINE_MS} ms`)), RUN_DEADLINE_MS);

  function fail(err) {
    if (finished) return;
    finished = true;
    process.stderr.write(`relay.js: ${err.stack || err}\n`);
    for (const w of workers.values()) w.process.kill('SIGKILL');
    cleanupSocket();
    process.exitCode = 1;
    // Give the kills a moment to be reaped, then leave regardless.
    setTimeout(() => process.exit(1), 500).unref();
  }

  function cleanupSocket() {
    try {
      fs.unlinkSync(sockPath);
    } catch {
      // Already gone.
    }
  }

  function expect(kind, timeoutMs = 10_000) {
    return new Promise((resolve, reject) => {
      const t = setTimeout(() => reject(new Error(`no ${kind} within ${timeoutMs} ms`)), timeoutMs);
      waiting.set(kind, (msg) => {
        clearTimeout(t);
        resolve(msg);
      });
    });
  }

  function settle(kind, msg) {
    const w = waiting.get(kind);
    if (w) {
      waiting.delete(kind);
      w(msg);
    }
  }

  // think-cluster-style relay: one handler, forwards the received object.
  cluster.on('message', (worker, msg) => {
    if (!msg || typeof msg !== 'object') return;
    if (msg.act === MESSENGER) {
      if (msg.target === 'all') {
        for (const w of workers.values()) w.send(msg);
      } else {
        const w = workers.get(msg.target);
        if (w) w.send(msg);
      }
    } else if (msg.act === 'echo') {
      worker.send(msg);
    } else if (msg.act === CONTROL) {
      settle(`${msg.kind}-${msg.id}`, msg);
    }
  });

  cluster.setupPrimary({ serialization: opts.serialization });

  (async () => {
    cleanupSocket();
    // One at a time: worker HUB must listen before the others connect.
    for (let id = 1; id <= WORKERS; id++) {
      const readyP = expect(`ready-${id}`);
      const w = cluster.fork({ RELAY_BENCH_ID: String(id), RELAY_BENCH_SOCK: sockPath });
      workers.set(id, w);
      w.on('exit', (code, signal) => {
        workers.delete(id);
        if (!finished) fail(new Error(`worker ${id} exited early (${code ?? signal})`));
      });
      await readyP;
    }

    const clocksComparable = await checkClocks();

    const rows = [];
    const phases = [
      { phase: 'echo', rows: [['echo', 'process.send echo (worker↔master)']] },
      {
        phase: 'relay-request',
        rows: [['relay_request', 'relay request (worker→master→worker→master→worker)']],
      },
      {
        phase: 'relay-broadcast',
        rows: [
          ['relay_broadcast_last', 'relay broadcast to 4 (last receipt)'],
          ['relay_broadcast_acks', 'relay broadcast to 4 (all acks back)'],
        ],
      },
      { phase: 'uds-request', rows: [['uds_request', 'uds relay request (ipchannel-style)']] },
      {
        phase: 'uds-broadcast',
        rows: [
          ['uds_broadcast_last', 'uds relay broadcast to 4 (last receipt)'],
          ['uds_broadcast_acks', 'uds relay broadcast to 4 (all acks back)'],
        ],
      },
    ];
    for (const p of phases) {
      const resultP = expect(`result-${DRIVER}`, opts.budgetMs + 10_000);
      workers.get(DRIVER).send({
        act: CONTROL,
        kind: 'run',
        phase: p.phase,
        n: opts.n,
        warmup: opts.warmup,
        budgetMs: opts.budgetMs,
      });
      const result = await resultP;
      if (result.error) throw new Error(`phase ${p.phase}: ${result.error}`);
      result.series.forEach((samples, i) => {
        const [key, name] = p.rows[i];
        if (key.endsWith('_last') && !clocksComparable) return;
        rows.push({ key, row: name, ...summarize(samples) });
      });
    }

    report(rows, opts, clocksComparable, Date.now() - started);
    await shutdown();
  })().catch(fail);

  /**
   * Probes each worker's process.hrtime.bigint() between two master readings.
   * @returns {Promise<boolean>} whether every probe fell inside its window
   */
  async function checkClocks() {
    let ok = true;
    for (const [id, w] of workers) {
      for (let i = 0; i < CLOCK_PROBES; i++) {
        const replyP = expect(`clock-${id}`);
        const before = process.hrtime.bigint();
        w.send({ act: CONTROL, kind: 'clock' });
        const reply = await replyP;
        const after = process.hrtime.bigint();
        const theirs = BigInt(reply.now);
        if (theirs < before || theirs > after) ok = false;
      }
    }
    if (!ok) {
      process.stderr.write(
        'relay.js: process.hrtime.bigint() is not comparable across processes here; ' +
          'reporting only the all-acks broadcast rows\n',
      );
    }
    return ok;
  }

  function report(rows, opts, clocksComparable, elapsedMs) {
    const cpus = os.cpus();
    const machine = `${cpus.length} × ${cpus[0] ? cpus[0].model.trim() : 'unknown cpu'}, ${os.type()} ${os.release()}`;
    const common = {
      bench: 'relay',
      node: process.version,
      serialization: opts.serialization,
      workers: WORKERS,
      clocks_comparable: clocksComparable,
    };
    if (!opts.json) {
      const us = (ns) => (ns / 1000).toFixed(1);
      const lines = [
        `Node ${process.version}, cluster IPC serialization '${opts.serialization}', ` +
          `${WORKERS} workers; ${machine}; ${(elapsedMs / 1000).toFixed(1)} s`,
        '',
        '| row | n | p50 µs | p99 µs | mean µs |',
        '|---|---:|---:|---:|---:|',
        ...rows.map((r) => `| ${r.row} | ${r.n} | ${us(r.p50_ns)} | ${us(r.p99_ns)} | ${us(r.mean_ns)} |`),
        '',
      ];
      process.stdout.write(lines.join('\n') + '\n');
    }
    for (const r of rows) process.stdout.write(JSON.stringify({ ...common, ...r }) + '\n');
  }

  async function shutdown() {
    finished = true;
    const exits = [...workers.values()].map(
      (w) => new Promise((resolve) => (w.isDead() ? resolve() : w.once('exit', resolve))),
    );
    for (const w of workers.values()) w.send({ act: CONTROL, kind: 'exit' });
    const killer = setTimeout(() => {
      for (const w of workers.values()) w.process.kill('SIGKILL');
    }, 3_000);
    await Promise.all(exits);
    clearTimeout(killer);
    clearTimeout(watchdog);
    cleanupSocket();
  }
}

// ---------------------------------------------------------------------------
// Worker: answers requests and broadcasts; DRIVER also drives the phases,
// HUB also hosts the ipchannel-style hub.

function runWorker() {
  const id = Number(process.env.RELAY_BENCH_ID);
  const text = 'hello from the relay bench';

  /** The one outstanding timed operation (DRIVER only). */
  let pending = null;

  // ipchannel-style client socket; the hub worker connects to itself too.
  let sock = null;
  const sendUds = (receiver, event, data) => sock.write(encodeFrame([receiver, event, id, data]));
  function connectUds() {
    sock = net.createConnection(process.env.RELAY_BENCH_SOCK);
    sock.on('connect', () => sock.write(encodeFrame([0, 'hello', id])));
    sock.on('error', (err) => {
      process.stderr.write(`relay.js worker ${id}: socket: ${err.message}\n`);
      process.exit(1);
    });
    sock.on(
      'data',
      frameReader(onUds, (err) => {
        process.stderr.write(`relay.js worker ${id}: bad frame: ${err.message}\n`);
        process.exit(1);
      }),
    );
  }

  function onUds([sender, event, data]) {
    if (event === 'welcome') process.send({ act: CONTROL, kind: 'ready', id });
    else if (event === 'req') sendUds(sender, 'rep', data);
    else if (event === 'rep') pending && pending.onReply(data);
    else if (event === 'bcast') {
      const at = process.hrtime.bigint();
      if (sender === id) pending && pending.onAck(id, at);
      else sendUds(sender, 'ack', { from: id, at: String(at) });
    } else if (event === 'ack') pending && pending.onAck(data.from, BigInt(data.at));
  }

  /**
   * The hub, as open-channel's manager runs it: clients say hello with their
   * id and are welcomed; each [receiver, event, sender, data] frame is
   * re-encoded as [sender, event, data] and written to the receiver, or to
   * every client (the sender included) for 'all'.
   */
  function startHub(listening) {
    /** @type {Map<number, net.Socket>} worker id → its socket */
    const clients = new Map();
    const server = net.createServer((socket) => {
      let from = 0;
      socket.on(
        'data',
        frameReader(
          (msg) => {
            if (!Array.isArray(msg)) return;
            const [receiver, event, sender, data] = msg;
            if (event === 'hello') {
              from = sender;
              clients.set(from, socket);
              socket.write(encodeFrame([0, 'welcome', from]));
            } else if (receiver === 'all') {
              for (const s of clients.values()) s.write(encodeFrame([sender, event, data]));
            } else {
              const s = clients.get(receiver);
              if (s) s.write(encodeFrame([sender, event, data]));
            }
          },
          (err) => {
            process.stderr.write(`relay.js hub: bad frame from worker ${from}: ${err.message}\n`);
            socket.destroy();
          },
        ),
      );
      socket.on('error', () => {});
      socket.on('close', () => {
        if (clients.get(from) === socket) clients.delete(from);
      });
    });
    server.on('error', (err) => {
      process.stderr.write(`relay.js hub: ${err.message}\n`);
      process.exit(1);
    });
    server.listen(process.env.RELAY_BENCH_SOCK, listening);
    return server;
  }

  process.on('message', (msg) => {
    if (!msg || typeof msg !== 'object') return;
    if (msg.act === MESSENGER) {
      // think.messenger style: the action names what to do.
      if (msg.action === 'req') {
        process.send({ act: MESSENGER, action: 'rep', target: msg.from, from: id, data: msg.data });
      } else if (msg.action === 'rep') {
        pending && pending.onReply(msg.data);
      } else if (msg.action === 'bcast') {
        const at = process.hrtime.bigint();
        if (msg.from === id) pending && pending.onAck(id, at);
        else {
          process.send({
            act: MESSENGER,
            action: 'ack',
            target: msg.from,
            from: id,
            data: { from: id, at: String(at) },
          });
        }
      } else if (msg.action === 'ack') {
        pending && pending.onAck(msg.data.from, BigInt(msg.data.at));
      }
    } else if (msg.act === 'echo') {
      pending && pending.onReply(msg.data);
    } else if (msg.act === CONTROL) {
      if (msg.kind === 'clock') {
        process.send({ act: CONTROL, kind: 'clock', id, now: String(process.hrtime.bigint()) });
      } else if (msg.kind === 'run') {
        drive(msg).then(
          (series) => process.send({ act: CONTROL, kind: 'result', id, series }),
          (err) => process.send({ act: CONTROL, kind: 'result', id, error: String(err.stack || err) }),
        );
      } else if (msg.kind === 'exit') {
        // Leave now: the hub's peers may still be connected to it.
        process.exit(0);
      }
    }
  });

  /** A request whose reply resolves with the round-trip time in ns. */
  function roundTrip(send, seq) {
    return new Promise((resolve, reject) => {
      const t0 = process.hrtime.bigint();
      pending = {
        onReply(data) {
          const t1 = process.hrtime.bigint();
          pending = null;
          if (!data || data.seq !== seq) reject(new Error(`reply ${data && data.seq} for ${seq}`));
          else resolve([Number(t1 - t0)]);
        },
        onAck() {},
      };
      send({ seq, text });
    });
  }

  /**
   * A broadcast to every worker; resolves with [ns until the last receipt
   * (cross-process stamps), ns until every ack is back here].
   */
  function fanOut(send, seq) {
    return new Promise((resolve) => {
      const t0 = process.hrtime.bigint();
      let acks = 0;
      let last = t0;
      pending = {
        onReply() {},
        onAck(_from, at) {
          if (at > last) last = at;
          if (++acks === WORKERS) {
            const t1 = process.hrtime.bigint();
            pending = null;
            resolve([Number(last - t0), Number(t1 - t0)]);
          }
        },
      };
      send({ seq, text });
    });
  }

  const ops = {
    echo: (seq) => roundTrip((data) => process.send({ act: 'echo', data }), seq),
    'relay-request': (seq) =>
      roundTrip(
        (data) => process.send({ act: MESSENGER, action: 'req', target: RESPONDER, from: id, data }),
        seq,
      ),
    'relay-broadcast': (seq) =>
      fanOut((data) => process.send({ act: MESSENGER, action: 'bcast', target: 'all', from: id, data }), seq),
    'uds-request': (seq) => roundTrip((data) => sendUds(RESPONDER, 'req', data), seq),
    'uds-broadcast': (seq) => fanOut((data) => sendUds('all', 'bcast', data), seq),
  };

  /** Runs one phase: warm-up, then up to n timed operations within budget. */
  async function drive({ phase, n, warmup, budgetMs }) {
    const op = ops[phase];
    if (!op) throw new Error(`unknown phase ${phase}`);
    const deadline = process.hrtime.bigint() + BigInt(budgetMs) * 1_000_000n;
    let seq = 0;
    for (let i = 0; i < warmup && process.hrtime.bigint() < deadline; i++) await op(++seq);
    const series = [];
    for (let i = 0; i < n && process.hrtime.bigint() < deadline; i++) {
      const sample = await op(++seq);
      sample.forEach((v, k) => (series[k] ||= []).push(v));
    }
    return series;
  }

  // The master gone (or done): nothing left to answer for.
  process.on('disconnect', () => process.exit(0));
  // Ready once the hub has welcomed this worker's socket.
  if (id === HUB) startHub(connectUds);
  else connectUds();
}

if (cluster.isPrimary) runMaster();
else runWorker();
