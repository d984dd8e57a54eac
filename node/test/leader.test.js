'use strict';
// Leader and followers (cluster-client) and requestReload in a real
// cluster: `shmcluster run -w 3 -- node test/leader_worker.js`. The worker
// of index 0 drives the scenarios and prints their results; this file
// checks them, then stops the master and reaps every process. Standalone
// first: no leader is a typed error at the deadline, never a hang.
const { test, before, after } = require('node:test');
const assert = require('node:assert/strict');
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');

const { Worker } = require('..');
const { Cluster } = require('./harness');

const cluster = new Cluster();
let sawReload;
const reloadFinished = new Promise((resolve) => {
  sawReload = resolve;
});

before(() =>
  cluster.start(path.join(__dirname, 'leader_worker.js'), {
    timeoutMs: 90000,
    onOutput: (output) => {
      if (/reload finished: ok/.test(output)) sawReload(true);
    },
  }),
);

after(async () => {
  await cluster.stop();
  // leader_worker.js's reload mark, if the run ended before the
  // replacement removed it (a later master with this pid would find it).
  if (cluster.master) fs.rmSync(path.join(os.tmpdir(), `shmc-node-leader-${cluster.master.pid}`), { force: true });
});

const r = (name) => cluster.result(name);

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
  assert.ok(ok, `no "reload finished: ok" from the master:\n${cluster.output}`);
  assert.match(cluster.output, /reload started/);
});
