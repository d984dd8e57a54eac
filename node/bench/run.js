'use strict';
/**
 * Issue 16's benchmark side by side: Node's cluster IPC relays
 * (relay.js) and shmcluster (shmcluster.js under `shmcluster run`), run
 * alternately in rounds on the same machine, so that a noisy host weighs on
 * every row alike. Prints the median and range over the rounds of each
 * row's p50 and p99, the ratios relay / shmcluster, the spin sweep with the
 * CPU it costs, then (with --json) every run's JSON lines.
 *
 *     cd node && npm run bench                 # builds, then this
 *     node bench/run.js --rounds 5 --spins 0,20,50,50/20 --workers 2,4
 *
 * A spin item `N` runs the workers with NODE_SHMCLUSTER_SPIN=N,N (request
 * and answer spin N µs), `R/A` with R,A; `--headline` picks the one the
 * side-by-side table shows (default 50/20, the addon's default).
 *
 * Every child runs under a watchdog and is reaped (a `shmcluster run`
 * master in its own process group, killed whole if it overstays).
 */

const { spawn } = require('node:child_process');
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');
const readline = require('node:readline');

const here = __dirname;
const root = path.resolve(here, '..', '..');
const RUN_TIMEOUT_MS = 90_000;

function parseArgs(argv) {
  const opts = {
    rounds: 3,
    n: 5000,
    warmup: 500,
    budgetMs: 4000,
    spins: ['0', '5', '20', '50', '100', '50/0', '50/10', '50/20'],
    workers: [2, 4],
    headline: '50/20',
    json: false,
  };
  const list = (v) => v.split(',').map((x) => int(x));
  const int = (v) => {
    const n = Number(v);
    if (!Number.isInteger(n) || n < 0) usage(`not an integer: ${v}`);
    return n;
  };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    const next = () => (i + 1 < argv.length ? argv[++i] : usage(`${a} needs a value`));
    if (a === '--json') opts.json = true;
    else if (a === '--rounds') opts.rounds = int(next());
    else if (a === '--n') opts.n = int(next());
    else if (a === '--warmup') opts.warmup = int(next());
    else if (a === '--budget-ms') opts.budgetMs = int(next());
    else if (a === '--spins') opts.spins = next().split(',');
    else if (a === '--workers') opts.workers = list(next());
    else if (a === '--headline') opts.headline = next();
    else usage(`unknown argument ${a}`);
  }
  if (opts.rounds < 1) usage('--rounds must be >= 1');
  if (!opts.spins.includes(opts.headline)) opts.spins.push(opts.headline);
  return opts;
}

function usage(why) {
  process.stderr.write(
    `run.js: ${why}\nusage: node bench/run.js [--rounds R] [--n N] [--warmup N] [--budget-ms MS] ` +
      '[--spins 0,5,50/20,...] [--workers 2,4] [--headline SPIN] [--json]\n',
  );
  process.exit(2);
}

function shmclusterBin() {
  const target = process.env.CARGO_TARGET_DIR || path.join(root, 'target');
  const bin = ['release', 'debug'].map((p) => path.join(target, p, 'shmcluster')).find((p) => fs.existsSync(p));
  if (!bin) {
    process.stderr.write('run.js: build the command first: cargo build --release -p shmcluster\n');
    process.exit(2);
  }
  return bin;
}

/**
 * Runs one child in its own process group; resolves with its JSON lines.
 * `done`: the line after which the child is told to stop (SIGTERM).
 */
function runChild(cmd, args, env, done) {
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, {
      cwd: root,
      env: { ...process.env, ...env },
      detached: true,
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    const rows = [];
    let log = '';
    let failed = null;
    const killGroup = (sig) => {
      try {
        process.kill(-child.pid, sig);
      } catch (_) {
        // Already gone.
      }
    };
    const watchdog = setTimeout(() => {
      failed = new Error(`${path.basename(args[args.length - 1] || cmd)} overran ${RUN_TIMEOUT_MS} ms`);
      killGroup('SIGKILL');
    }, RUN_TIMEOUT_MS);
    child.stderr.on('data', (d) => {
      log += d;
    });
    readline.createInterface({ input: child.stdout }).on('line', (line) => {
      if (line.startsWith('{')) rows.push(JSON.parse(line));
      else if (done && line === done) child.kill('SIGTERM');
      else if (line.startsWith('FAILED')) {
        failed = new Error(line);
        child.kill('SIGTERM');
      }
    });
    child.on('exit', (code, sig) => {
      clearTimeout(watchdog);
      // Whatever is left of the group (workers of a killed master).
      killGroup('SIGKILL');
      if (failed) reject(new Error(`${failed.message}\n${log}`));
      else if (!done && code !== 0) reject(new Error(`exited ${code ?? sig}\n${log}`));
      else resolve(rows);
    });
  });
}

/** A spin item, `N` (request and answer spin N µs) or `R/A`, as NODE_SHMCLUSTER_SPIN. */
function spinEnv(item) {
  const [r, a = r] = item.split('/');
  return `${r},${a}`;
}

const median = (xs) => {
  const s = [...xs].sort((a, b) => a - b);
  return s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2;
};
const us = (ns) => (ns / 1000).toFixed(1);
const range = (xs, f = us) => `${f(Math.min(...xs))}–${f(Math.max(...xs))}`;

async function main() {
  const opts = parseArgs(process.argv.slice(2));
  const bin = shmclusterBin();
  const started = Date.now();
  /** `${config}|${key}` → rows over the rounds */
  const all = new Map();
  const raw = [];
  const add = (config, rows, round) => {
    for (const r of rows) {
      raw.push({ round, ...r });
      const k = `${config}|${r.key}`;
      if (!all.has(k)) all.set(k, []);
      all.get(k).push(r);
    }
  };
  const configs = [];
  for (const w of opts.workers) for (const s of opts.spins) configs.push({ workers: w, spin: s });
  for (let round = 1; round <= opts.rounds; round++) {
    // The relay first in odd rounds, last in even ones; the shmcluster
    // configurations rotate.
    const shift = (round - 1) % configs.length;
    const order = [...configs.slice(shift), ...configs.slice(0, shift)];
    const relay = async () => {
      const args = [path.join(here, 'relay.js'), '--json', '--n', String(opts.n), '--warmup', String(opts.warmup)];
      args.push('--budget-ms', String(Math.min(opts.budgetMs, 8000)));
      add('relay', await runChild(process.execPath, args, {}, null), round);
    };
    if (round % 2 === 1) await relay();
    for (const c of order) {
      const args = ['run', '-w', String(c.workers), '--', process.execPath, path.join(here, 'shmcluster.js')];
      args.push('--n', String(opts.n), '--warmup', String(opts.warmup), '--budget-ms', String(opts.budgetMs));
      const rows = await runChild(bin, args, { NODE_SHMCLUSTER_SPIN: spinEnv(c.spin) }, 'DONE');
      add(`shm w${c.workers} s${c.spin}`, rows, round);
    }
    if (round % 2 === 0) await relay();
    process.stderr.write(`run.js: round ${round}/${opts.rounds} done (${((Date.now() - started) / 1000).toFixed(0)} s)\n`);
  }
  report(opts, all);
  if (opts.json) for (const r of raw) process.stdout.write(JSON.stringify(r) + '\n');
}

function report(opts, all) {
  const cpus = os.cpus();
  const get = (config, key) => all.get(`${config}|${key}`) || [];
  const cell = (rows, field) => (rows.length ? `${us(median(rows.map((r) => r[field])))} (${range(rows.map((r) => r[field]))})` : '–');
  const p50 = (rows) => median(rows.map((r) => r.p50_ns));
  const p99 = (rows) => median(rows.map((r) => r.p99_ns));
  const lines = [
    `${cpus.length} × ${cpus[0] ? cpus[0].model.trim() : '?'}, ${os.type()} ${os.release()}, Node ${process.version}; ` +
      `${opts.rounds} rounds, n ${opts.n} (warm-up ${opts.warmup}) per row per round; ` +
      'median over the rounds (range) in µs',
    '',
  ];
  const head = `shm w4 s${opts.headline}`;
  const pairs = [
    ['relay_request', 'shm_request', 'request/reply Node↔Node'],
    ['relay_broadcast_last', 'shm_broadcast_last', 'broadcast to 4, last receipt'],
    ['relay_broadcast_acks', 'shm_broadcast_acks', 'broadcast to 4, all acks back'],
    ['relay_broadcast_acks', 'shm_map', 'broadcast to 4 vs map over 4 (answers back)'],
  ];
  lines.push(
    `Side by side (relay: Node cluster IPC, think-cluster style; shmcluster: 4 workers, spin ${opts.headline} µs, request/answer):`,
    '',
    '| shape | relay p50 | relay p99 | shmcluster p50 | shmcluster p99 | ratio p50 | ratio p99 |',
    '|---|---:|---:|---:|---:|---:|---:|',
  );
  const echo = get('relay', 'echo');
  if (echo.length) {
    lines.push(`| process.send echo worker↔master (reference) | ${cell(echo, 'p50_ns')} | ${cell(echo, 'p99_ns')} | | | | |`);
  }
  for (const [rk, sk, name] of pairs) {
    const r = get('relay', rk);
    const s = get(head, sk);
    if (!r.length || !s.length) continue;
    lines.push(
      `| ${name} | ${cell(r, 'p50_ns')} | ${cell(r, 'p99_ns')} | ${cell(s, 'p50_ns')} | ${cell(s, 'p99_ns')} | ` +
        `${(p50(r) / p50(s)).toFixed(1)}× | ${(p99(r) / p99(s)).toFixed(1)}× |`,
    );
  }
  lines.push(
    '',
    'Spin sweep (NODE_SHMCLUSTER_SPIN µs; CPU: user+system of all workers per operation, and cores kept busy):',
    '',
    '| workers | spin µs (request/answer) | request p50 | request p99 | CPU µs/req (sys) | cores | burst req/s | broadcast last p50 / p99 | map p50 / p99 | CPU µs/map |',
    '|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|',
  );
  for (const w of opts.workers) {
    for (const s of [...new Set(opts.spins)]) {
      const c = `shm w${w} s${s}`;
      const req = get(c, 'shm_request');
      if (!req.length) continue;
      const b = get(c, 'shm_burst');
      const bl = get(c, 'shm_broadcast_last');
      const mp = get(c, 'shm_map');
      const m = (rows, f) => (rows.length ? median(rows.map((r) => r[f])) : NaN);
      const both = (rows) => (rows.length ? `${us(p50(rows))} / ${us(p99(rows))}` : '–');
      lines.push(
        `| ${w} | ${s.includes('/') ? s : `${s}/${s}`} | ${cell(req, 'p50_ns')} | ${cell(req, 'p99_ns')} | ` +
          `${m(req, 'cpu_us_per_op').toFixed(1)} (${m(req, 'cpu_sys_us_per_op').toFixed(1)}) | ` +
          `${m(req, 'cpu_cores').toFixed(2)} | ${b.length ? Math.round(m(b, 'rate')) : '–'} | ${both(bl)} | ${both(mp)} | ` +
          `${mp.length ? m(mp, 'cpu_us_per_op').toFixed(1) : '–'} |`,
      );
    }
  }
  process.stdout.write(lines.join('\n') + '\n\n');
}

main().catch((e) => {
  process.stderr.write(`run.js: ${e.stack || e}\n`);
  process.exit(1);
});
