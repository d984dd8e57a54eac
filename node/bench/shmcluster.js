'use strict';
/**
 * The shmcluster rows of issue 16's benchmark: the same shapes as
 * relay.js (a request/reply between two Node workers, a broadcast to 4),
 * carried by the shmcluster messenger instead of Node's cluster IPC. Run
 * as every worker of a `shmcluster run` cluster (bench/run.js does that,
 * alternating with relay.js):
 *
 *     target/release/shmcluster run -w 4 -- node node/bench/shmcluster.js
 *
 * Slot 0 drives every phase, slot 1 answers its requests. The driver
 * prints one JSON line per row (keys as relay.js's, plus the CPU cost),
 * then `DONE`; the runner then stops the master. Rows:
 *
 *   shm_request         slot 0 → slot 1 → slot 0: `await m.request(1, ...)`,
 *                       one in flight at a time.
 *   shm_burst           256 requests started at once, awaited together
 *                       (alternating slots 1 and 2 with 3+ workers): the
 *                       `mean_ns` of the row is the burst's time per
 *                       request, `rate` the requests per second.
 *   shm_broadcast_last  `m.broadcast` to all 4 workers (the sender
 *                       included): from the send to the last receipt,
 *                       each receipt stamped in its receiver with
 *                       process.hrtime.bigint() (4 workers only).
 *   shm_broadcast_acks  the same until every receiver's ack (an `emit`
 *                       back) is in at the sender.
 *   shm_map             `await m.map(...)` over the 4 workers: a broadcast
 *                       whose answers come back to the caller.
 *   shm_self_request    a request of slot 0 to itself: what the addon, the
 *                       event loop and the promise cost with no wake.
 *   shm_request_out / shm_request_back
 *                       a request to slot 1 whose handler returns its
 *                       clock: send → handler, handler → answer resolved.
 *
 * The payload is relay.js's `{seq, text}` (about 40 bytes of JSON).
 * CPU: before and after the timed part of each phase the driver asks every
 * worker for `process.cpuUsage()` (user + system of the whole process);
 * `cpu_us_per_op` is the sum of the deltas over all workers divided by the
 * operations timed (`cpu_sys_us_per_op` its system part), `cpu_cores` the
 * sum divided by the wall time (how many cores the workers kept busy).
 * The workers' spins (src/lib.rs, `Spin`) come from NODE_SHMCLUSTER_SPIN
 * (`request[,answer]` µs), as inherited.
 */

const { Worker } = require('..');

const text = 'hello from the relay bench';
const BURST = 256;

function parseArgs(argv) {
  const opts = { n: 20_000, warmup: 1_000, budgetMs: 4_000 };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    const v = Number(argv[++i]);
    if (!Number.isInteger(v) || v < 0) fail(`${a} wants an integer`);
    if (a === '--n') opts.n = v;
    else if (a === '--warmup') opts.warmup = v;
    else if (a === '--budget-ms') opts.budgetMs = v;
    else fail(`unknown argument ${a}`);
  }
  return opts;
}

function fail(why) {
  console.log(`FAILED ${why}`);
  process.exit(1);
}

/** Nearest-rank percentile of an ascending-sorted Float64Array. */
function percentile(sorted, p) {
  if (sorted.length === 0) return NaN;
  const rank = Math.ceil(p * sorted.length);
  return sorted[Math.min(sorted.length, Math.max(1, rank)) - 1];
}

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

const opts = parseArgs(process.argv.slice(2));
const w = Worker.fromEnv();
const m = w.messenger();
const me = w.slot;
const now = () => process.hrtime.bigint();

/** The driver's one outstanding broadcast. */
let pending = null;

m.onError((e) => console.error(`slot ${me}: ${e.code}: ${e.message}`));
m.on('ping', () => me);
m.on('echo', (d) => d);
m.on('clock', () => String(now()));
m.on('cpu', () => process.cpuUsage());
m.on('bc', (d, ctx) => {
  const at = now();
  if (ctx.sender === me) pending && pending.onAck(me, at);
  else m.emit(ctx.sender, 'ack', { from: me, at: String(at) });
});
m.on('ack', (d) => pending && pending.onAck(d.from, BigInt(d.at)));
w.on('stop', () => {
  w.close();
  process.exit(0);
});
w.ready();

/** Sums of user and system µs over every worker. */
async function clusterCpu() {
  const all = await m.map('cpu', null, { timeout: 5000 });
  const total = { user: 0, system: 0 };
  for (const e of all) {
    if (!e.ok) throw new Error(`cpu of slot ${e.slot}: ${e.error.code}`);
    total.user += e.value.user;
    total.system += e.value.system;
  }
  return total;
}

/** Whether every worker's clock reading falls between two of ours. */
async function clocksComparable() {
  for (let s = 0; s < w.instances; s++) {
    for (let i = 0; i < 50; i++) {
      const before = now();
      const theirs = BigInt(await m.request(s, 'clock', null, { timeout: 2000 }));
      const after = now();
      if (theirs < before || theirs > after) return false;
    }
  }
  return true;
}

async function request(seq) {
  const t0 = now();
  const r = await m.request(1, 'echo', { seq, text }, { timeout: 5000 });
  const t1 = now();
  if (!r || r.seq !== seq) throw new Error(`reply ${r && r.seq} for ${seq}`);
  return [Number(t1 - t0)];
}

/** A request to this worker itself: the addon's and JS's own cost, no wake. */
async function selfRequest(seq) {
  const t0 = now();
  const r = await m.request(me, 'echo', { seq, text }, { timeout: 5000 });
  const t1 = now();
  if (!r || r.seq !== seq) throw new Error(`reply ${r && r.seq} for ${seq}`);
  return [Number(t1 - t0)];
}

/** A request whose handler stamps its clock: the two legs apart. */
async function stampedRequest() {
  const t0 = now();
  const at = BigInt(await m.request(1, 'clock', null, { timeout: 5000 }));
  const t1 = now();
  return [Number(at - t0), Number(t1 - at)];
}

async function burst(seq) {
  const targets = w.instances >= 3 ? [1, 2] : [1];
  const calls = new Array(BURST);
  const t0 = now();
  for (let i = 0; i < BURST; i++) {
    calls[i] = m.request(targets[i % targets.length], 'echo', { seq: seq + i, text }, { timeout: 10000 });
  }
  const replies = await Promise.all(calls);
  const t1 = now();
  replies.forEach((r, i) => {
    if (r.seq !== seq + i) throw new Error(`burst reply ${r.seq} for ${seq + i}`);
  });
  return [Number(t1 - t0) / BURST];
}

function broadcast(seq) {
  return new Promise((resolve) => {
    const t0 = now();
    let acks = 0;
    let last = t0;
    pending = {
      onAck(_from, at) {
        if (at > last) last = at;
        if (++acks === w.instances) {
          const t1 = now();
          pending = null;
          resolve([Number(last - t0), Number(t1 - t0)]);
        }
      },
    };
    m.broadcast('bc', { seq, text });
  });
}

async function map(seq) {
  const t0 = now();
  const all = await m.map('echo', { seq, text }, { timeout: 5000 });
  const t1 = now();
  if (all.length !== w.instances || !all.every((e) => e.ok && e.value.seq === seq)) {
    throw new Error(`map ${seq}: ${JSON.stringify(all)}`);
  }
  return [Number(t1 - t0)];
}

/** Warm-up, then up to n timed operations within the budget. */
async function phase(op, n, warmup) {
  const deadline = now() + BigInt(opts.budgetMs) * 1_000_000n;
  let seq = 0;
  for (let i = 0; i < warmup && now() < deadline; i++) {
    await op(seq);
    seq += BURST;
  }
  const series = [];
  const cpu0 = await clusterCpu();
  const t0 = now();
  for (let i = 0; i < n && now() < deadline; i++) {
    const sample = await op(seq);
    seq += BURST;
    sample.forEach((v, k) => (series[k] ||= []).push(v));
  }
  const wallUs = Number(now() - t0) / 1000;
  const cpu1 = await clusterCpu();
  const sys = cpu1.system - cpu0.system;
  return { series, cpu: cpu1.user - cpu0.user + sys, sys, wallUs };
}

async function drive() {
  for (let i = 0; ; i++) {
    const all = await m.map('ping', null, { timeout: 1000 });
    if (all.length === w.instances && all.every((e) => e.ok)) break;
    if (i > 200) throw new Error(`cluster not up: ${JSON.stringify(all)}`);
    await new Promise((r) => setTimeout(r, 50));
  }
  const common = {
    bench: 'shmcluster',
    node: process.version,
    workers: w.instances,
    spin_request_us: m.spin.request,
    spin_answer_us: m.spin.answer,
    clocks_comparable: await clocksComparable(),
  };
  const emit = (key, row, samples, p, ops, extra) =>
    console.log(
      JSON.stringify({
        ...common,
        key,
        row,
        ...summarize(samples),
        cpu_us_per_op: +(p.cpu / ops).toFixed(2),
        cpu_sys_us_per_op: +(p.sys / ops).toFixed(2),
        cpu_cores: +(p.cpu / p.wallUs).toFixed(3),
        ...extra,
      }),
    );

  let p = await phase(request, opts.n, opts.warmup);
  emit('shm_request', 'shmcluster request (worker→worker→worker)', p.series[0], p, p.series[0].length);

  // Where the time of a request goes (see the README's breakdown).
  p = await phase(selfRequest, opts.n, opts.warmup);
  emit('shm_self_request', 'shmcluster request to itself (no wake)', p.series[0], p, p.series[0].length);
  if (common.clocks_comparable) {
    p = await phase(stampedRequest, opts.n, opts.warmup);
    const ops = p.series[0].length;
    emit('shm_request_out', 'request leg: send → handler runs', p.series[0], p, ops);
    emit('shm_request_back', 'request leg: handler runs → answer resolved', p.series[1], p, ops);
  }

  const bursts = Math.max(1, Math.floor(opts.n / BURST));
  p = await phase(burst, bursts, Math.max(1, Math.floor(opts.warmup / BURST)));
  const perReq = summarize(p.series[0]);
  emit('shm_burst', `shmcluster burst of ${BURST} requests (per request)`, p.series[0], p, p.series[0].length * BURST, {
    rate: Math.round(1e9 / perReq.p50_ns),
  });

  if (w.instances >= 4) {
    p = await phase(broadcast, opts.n, opts.warmup);
    const ops = p.series[0].length;
    if (common.clocks_comparable) {
      emit('shm_broadcast_last', `shmcluster broadcast to ${w.instances} (last receipt)`, p.series[0], p, ops);
    }
    emit('shm_broadcast_acks', `shmcluster broadcast to ${w.instances} (all acks back)`, p.series[1], p, ops);
    p = await phase(map, opts.n, opts.warmup);
    emit('shm_map', `shmcluster map over ${w.instances} (all answers back)`, p.series[0], p, p.series[0].length);
  }
  console.log('DONE');
}

if (me === 0) {
  drive().catch((e) => fail(e && e.stack));
}
