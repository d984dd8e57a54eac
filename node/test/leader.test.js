'use strict';
// Leader and followers (cluster-client) and requestReload in a real
// cluster: `shmcluster run -w 3 -- node test/leader_worker.js`. The worker
// of index 0 drives the scenarios and prints their results; this file
// checks them, then stops the master and reaps every process. Standalone
// first: no leader is a typed error at the deadline, never a hang.
const { test, before, after } = require('node:test');
const assert = require('node:assert/strict');
const { spawn } = require('node:child_process');
const fs = require('node:fs');
const path = require('node:path');
const readline = require('node:readline');

const { Worker } = require('..');

const root = path.resolve(__dirname, '..', '..');
const bin = ['debug', 'release']
  .map((p) => path.join(process.env.CARGO_TARGET_DIR || path.join(root, 'target'), p, 'shmcluster'))
  .find((p) => fs.existsSync(p));

let master;
const results = new Map();
let output = '';
let reloadFinished = null;

function stopMaster() {
  if (!master || master.exitCode !== null || master.signalCode !== null) return Promise.resolve();
  return new Promise((resolve) => {
    const kill = setTimeout(() => {
      // The whole process group: the master and any worker left.
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

before(async () => {
  assert.ok(bin, 'build the command first: cargo build -p shmcluster');
  master = spawn(bin, ['run', '-w', '3', '--', process.execPath, path.join(__dirname, 'leader_worker.js')], {
    cwd: root,
    detached: true, // its own process group, for the reaping above
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let sawReload;
  reloadFinished = new Promise((resolve) => {
    sawReload = resolve;
  });
  const check = () => {
    if (/reload finished: ok/.test(output)) sawReload(true);
  };
  master.stderr.on('data', (d) => {
    output += d;
    check();
  });
  const lines = readline.createInterface({ input: master.stdout });
  await new Promise((resolve, reject) => {
    const watchdog = setTimeout(() => reject(new Error(`no DONE in 90 s:\n${output}`)), 90000);
    lines.on('line', (line) => {
      output += `${line}\n`;
      check();
      if (line.startsWith('RESULT ')) {
        const r = JSON.parse(line.slice(7));
        results.set(r.name, r.value);
      } else if (line === 'DONE') {
        clearTimeout(watchdog);
        resolve();
      } else if (line.startsWith('FAILED')) {
        clearTimeout(watchdog);
        reject(new Error(output));
      }
    });
    master.once('exit', (code, sig) => {
      clearTimeout(watchdog);
      reject(new Error(`master exited (${code ?? sig}) early:\n${output}`));
    });
  });
});

after(async () => {
  await stopMaster();
  // leader_worker.js's reload mark, if the run ended before the
  // replacement removed it (a later master with this pid would find it).
  if (master) fs.rmSync(path.join(require('node:os').tmpdir(), `shmc-node-leader-${master.pid}`), { force: true });
  // Nothing of the cluster may outlive the test.
  try {
    process.kill(-master.pid, 0);
    process.kill(-master.pid, 'SIGKILL');
    assert.fail('a process of the cluster outlived its master');
  } catch (e) {
    if (e.code !== 'ESRCH') throw e;
  }
});

const r = (name) => {
  assert.ok(results.has(name), `no result ${name}:\n${output}`);
  return results.get(name);
};

test('standalone: no leader is NO_LEADER at the deadline; campaigning makes one', async () => {
  const w = Worker.standalone();
  const m = w.messenger();
  try {
    assert.equal(m.isLeader, false);
    assert.equal(m.leader(), null);
    const started = Date.now();
    await assert.rejects(m.invoke('x', 1, { timeout: 100 }), { code: 'NO_LEADER' });
    await assert.rejects(m.publish('t', 1, { timeout: 100 }), { code: 'NO_LEADER' });
    const got = [];
    await assert.rejects(
      m.subscribe('t', (v) => got.push(v), { timeout: 100 }),
      { code: 'NO_LEADER' },
    );
    assert.ok(Date.now() - started < 2000, 'no hang');
    await assert.rejects(m.invoke('x', Buffer.alloc(m.maxPayload + 1)), { code: 'TOO_LARGE' });
    await assert.rejects(m.invoke('x', 1, { timeout: -1 }), { code: 'INVALID_ARGUMENT' });
    // A leader at last: the change is seen, the subscription made before
    // is told to it, invoke and publish go through.
    const changes = [];
    m.onLeaderChange((c) => changes.push(c));
    m.onInvoke('add', async ([a, b]) => a + b);
    m.campaign();
    assert.equal(await m.invoke('add', [2, 3], { timeout: 5000 }), 5);
    assert.equal(m.isLeader, true);
    assert.equal(m.isLeaderFor(''), true);
    assert.equal(m.isLeaderFor('other'), false);
    assert.deepEqual(m.leader(), { slot: 0, term: changes[0].term });
    assert.deepEqual(changes, [{ slot: 0, term: changes[0].term, isMe: true }]);
    await m.publish('t', { a: 1 });
    for (let i = 0; i < 100 && got.length === 0; i++) await new Promise((res) => setTimeout(res, 10));
    assert.deepEqual(got, [{ a: 1 }]);
    await assert.rejects(m.invoke('nobody', null, { timeout: 2000 }), { code: 'NO_HANDLER' });
    // No master: nothing to reload, and no error.
    w.requestReload();
  } finally {
    w.close();
  }
  await assert.rejects(m.invoke('add', [1, 1]), { code: 'WORKER_CLOSED' });
});

test('exactly one leader, and every worker agrees on it', () => {
  const { first, states } = r('leaders');
  assert.equal(states.length, 3);
  const leading = states.filter((e) => e.ok && e.value.isLeader).map((e) => e.slot);
  assert.deepEqual(leading, [first.slot], JSON.stringify(states));
  assert.notEqual(first.slot, 0, 'the driver campaigns late');
  for (const e of states) {
    assert.ok(e.ok, JSON.stringify(e));
    assert.deepEqual(e.value.leader, first, `worker ${e.slot}`);
    // Each saw the change to this leader (the driver's listener is its first).
    assert.ok(e.value.changes.some((c) => c.slot === first.slot && c.term === first.term && c.isMe === (e.slot === first.slot)));
  }
});

test('invoke runs the leader handler only, sync, async, failing and raw', () => {
  const { first } = r('leaders');
  assert.deepEqual(r('invoke'), { ok: true, value: { slot: first.slot, isLeader: true, args: { x: 1 }, from: 0 } });
  assert.deepEqual(r('invokeAsync'), { ok: true, value: 42 });
  assert.deepEqual(r('invokeFail'), { ok: false, code: 'HANDLER_FAILED', message: `invoke kaboom from ${first.slot}` });
  assert.deepEqual(r('invokeRaw'), { ok: true, value: [3, 2, 1] });
  assert.equal(r('invokeNoMethod').code, 'NO_HANDLER');
});

test('publish reaches every subscriber; a late one gets the last value at once', () => {
  assert.deepEqual(r('publish1'), { ok: true });
  assert.deepEqual(r('publish2'), { ok: true, value: null });
  const { states, late, late2 } = r('pubsub');
  for (const e of states.filter((s) => s.slot !== 0)) {
    assert.deepEqual(e.value.got, [{ v: 1 }, { v: 2 }], `worker ${e.slot}`);
  }
  const { first } = r('leaders');
  assert.deepEqual(late, [{ v: { v: 2 }, sender: first.slot }]);
  assert.deepEqual(late2, [{ v: 2 }]);
});

test('the leader SIGKILLed: its invoke fails LEADER_DIED, a new leader is elected and serves', (t) => {
  const f = r('failover');
  t.diagnostic(`invoke failed ${f.hungMs} ms and a new leader was seen ${f.electedMs} ms after the SIGKILL`);
  assert.deepEqual(f.hung, { ok: false, code: 'LEADER_DIED', message: f.hung.message });
  assert.ok(f.next.term > f.old.term, JSON.stringify(f));
  // onLeaderChange fired on the driver for the new term.
  assert.ok(f.changes.some((c) => c.term === f.next.term && c.slot === f.next.slot), JSON.stringify(f.changes));
  // The new leader answers (whichever candidate the kernel handed the lock).
  assert.ok(f.after.ok, JSON.stringify(f.after));
  assert.equal(f.after.value.isLeader, true);
  assert.equal(f.after.value.slot, f.leaderNow.slot);
  assert.deepEqual(f.idempotent, { ok: true, value: 10 });
  // Every subscription was given to the new leader: v3 reaches everyone.
  assert.deepEqual(r('publish3'), { ok: true });
  for (const e of f.states.filter((s) => s.slot !== 0)) {
    assert.ok(e.ok, JSON.stringify(e));
    assert.deepEqual(e.value.got.at(-1), { v: 3 }, `worker ${e.slot}: ${JSON.stringify(e.value.got)}`);
  }
  assert.deepEqual(f.late.at(-1).v, { v: 3 });
  for (const e of f.states) assert.deepEqual(e.value.errors, [], `worker ${e.slot}`);
});

test('requestReload: the master reloads, index 0 comes back as a new process', async () => {
  const { before: old, now } = r('reloaded');
  assert.notEqual(now.pid, old.pid);
  assert.ok(now.slot !== old.slot || now.generation !== old.generation, JSON.stringify({ old, now }));
  let timer;
  const ok = await Promise.race([reloadFinished, new Promise((res) => (timer = setTimeout(() => res(false), 30000)))]);
  clearTimeout(timer);
  assert.ok(ok, `no "reload finished: ok" from the master:\n${output}`);
  assert.match(output, /reload started/);
});
