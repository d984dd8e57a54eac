'use strict';
// What the cluster tests share: the `shmcluster` command this checkout
// built, and a `shmcluster run -w N -- node <script>` whose slot-0 driver
// prints `RESULT {name, value}` lines, then `DONE` (or `FAILED ...`). The
// master runs in its own process group, so stopping it reaps everything.
const assert = require('node:assert/strict');
const { spawn } = require('node:child_process');
const fs = require('node:fs');
const path = require('node:path');
const readline = require('node:readline');

const root = path.resolve(__dirname, '..', '..');
const bin = ['debug', 'release']
  .map((p) => path.join(process.env.CARGO_TARGET_DIR || path.join(root, 'target'), p, 'shmcluster'))
  .find((p) => fs.existsSync(p));

/**
 * Starts the cluster and resolves once its driver printed `DONE` (rejects
 * on `FAILED`, an early exit of the master, or no `DONE` in `timeoutMs`).
 * `onOutput(text)` sees all output so far after each piece of it.
 */
async function runCluster(cluster, script, { workers = 3, timeoutMs = 60000, onOutput = () => {} } = {}) {
  assert.ok(bin, 'build the command first: cargo build -p shmcluster');
  const master = spawn(bin, ['run', '-w', String(workers), '--', process.execPath, script], {
    cwd: root,
    detached: true, // its own process group, for the reaping in stop()
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  cluster.master = master;
  master.stderr.on('data', (d) => {
    cluster.output += d;
    onOutput(cluster.output);
  });
  const lines = readline.createInterface({ input: master.stdout });
  await new Promise((resolve, reject) => {
    const watchdog = setTimeout(() => reject(new Error(`no DONE in ${timeoutMs / 1000} s:\n${cluster.output}`)), timeoutMs);
    lines.on('line', (line) => {
      cluster.output += `${line}\n`;
      onOutput(cluster.output);
      if (line.startsWith('RESULT ')) {
        const r = JSON.parse(line.slice(7));
        cluster.results.set(r.name, r.value);
      } else if (line === 'DONE') {
        clearTimeout(watchdog);
        resolve();
      } else if (line.startsWith('FAILED')) {
        clearTimeout(watchdog);
        reject(new Error(cluster.output));
      }
    });
    master.once('exit', (code, sig) => {
      clearTimeout(watchdog);
      reject(new Error(`master exited (${code ?? sig}) early:\n${cluster.output}`));
    });
  });
}

/** A cluster test's state: `start` in `before`, `stop` in `after`, `result(name)` in tests. */
class Cluster {
  constructor() {
    this.master = null;
    this.results = new Map();
    this.output = '';
  }

  start(script, opts) {
    return runCluster(this, script, opts);
  }

  /** SIGTERM, SIGKILL to the whole group after 5 s; then nothing of it may be left. */
  async stop() {
    const master = this.master;
    if (!master) return;
    if (master.exitCode === null && master.signalCode === null) {
      await new Promise((resolve) => {
        const kill = setTimeout(() => {
          try {
            process.kill(-master.pid, 'SIGKILL');
          } catch (_) {}
        }, 5000);
        master.once('exit', () => {
          clearTimeout(kill);
          resolve();
        });
        master.kill('SIGTERM');
      });
    }
    try {
      process.kill(-master.pid, 0);
      process.kill(-master.pid, 'SIGKILL');
      assert.fail('a process of the cluster outlived its master');
    } catch (e) {
      if (e.code !== 'ESRCH') throw e;
    }
  }

  result(name) {
    assert.ok(this.results.has(name), `no result ${name}:\n${this.output}`);
    return this.results.get(name);
  }
}

module.exports = { root, bin, Cluster };
