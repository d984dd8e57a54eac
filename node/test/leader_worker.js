'use strict';
// A worker of the leader test cluster (test/leader.test.js starts
// `shmcluster run -w 3 -- node test/leader_worker.js`). Every worker
// serves the invoke handlers (only the leader's run) and subscribes to
// `cfg`; the worker of index 0 drives the scenarios, printing one
// `RESULT <json>` line each. Its last scenario asks the master for a
// reload; the replacement of index 0 reports itself and prints `DONE`.
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');
const { Worker } = require('..');

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const w = Worker.fromEnv();
const m = w.messenger();
// Keyed by the master (every worker's parent): written before the reload.
const mark = path.join(os.tmpdir(), `shmc-node-leader-${process.ppid}`);
const driver = w.index === 0;

const changes = [];
const got = [];
const errors = [];
m.onError((e) => errors.push(`${e.code}: ${e.message}`));
m.onLeaderChange((c) => changes.push(c));
m.on('pid', () => process.pid);
let subscribed = false;
m.on('state', () => ({ slot: w.slot, isLeader: m.isLeader, leader: m.leader(), changes, got, errors, subscribed }));
m.on('publishFrom', ({ topic, value }) => m.publish(topic, value, { timeout: 5000 }));
// How many `hang` invokes this worker's handler holds.
let hanging = 0;
m.on('hanging', () => hanging);

function serveInvokes() {
  m.onInvoke('whoLeads', (args, ctx) => ({ slot: w.slot, isLeader: m.isLeader, args, from: ctx.sender }));
  m.onInvoke('later', async (x) => {
    await sleep(20);
    return x * 2;
  });
  m.onInvoke('fail', () => {
    throw new Error(`invoke kaboom from ${w.slot}`);
  });
  m.onInvoke('rawRev', (b) => Buffer.from(b).reverse(), { raw: true });
  // Never answers: the leader is killed with it in hand.
  m.onInvoke('hang', () => {
    hanging++;
    return new Promise(() => {});
  });
}

w.on('stop', () => {
  w.close();
  process.exit(0);
});

const result = (name, value) => console.log(`RESULT ${JSON.stringify({ name, value })}`);
const caught = async (p) => {
  try {
    return { ok: true, value: await p };
  } catch (e) {
    return { ok: false, code: e.code, message: e.message };
  }
};

async function waitFor(what, cond, ms = 10000) {
  const until = Date.now() + ms;
  for (;;) {
    const v = await cond();
    if (v) return v;
    if (Date.now() > until) throw new Error(`timed out waiting for ${what}`);
    await sleep(10);
  }
}

// Every worker's `state`, once `cond` holds of all of them (or the last
// one read, for the checks in leader.test.js to name what is missing).
async function statesWhen(cond, ms = 10000) {
  const until = Date.now() + ms;
  for (;;) {
    const states = await m.map('state', null, { timeout: 2000 });
    const all = states.length === w.instances && states.every((e) => e.ok && cond(e.value, e.slot));
    if (all || Date.now() > until) return states;
    await sleep(20);
  }
}

async function drive() {
  // Every instance up and subscribed (their `ready` comes after).
  for (let i = 0; ; i++) {
    const all = await m.map('pid', null, { timeout: 1000 });
    if (all.length === w.instances && all.every((e) => e.ok)) break;
    if (i > 200) throw new Error(`cluster not up: ${JSON.stringify(all)}`);
    await sleep(50);
  }
  // The others campaigned at start; this worker only once one leads, so
  // that the leader is another worker (killed below).
  const first = await waitFor('a leader', () => m.leader());
  serveInvokes();
  const sawFirst = (st) => st.changes.some((c) => c.term === first.term);
  result('leaders', { first, states: await statesWhen(sawFirst) });

  result('invoke', await caught(m.invoke('whoLeads', { x: 1 }, { timeout: 5000 })));
  result('invokeAsync', await caught(m.invoke('later', 21, { timeout: 5000 })));
  result('invokeFail', await caught(m.invoke('fail', null, { timeout: 5000 })));
  result('invokeRaw', await caught(m.invoke('rawRev', Buffer.from([1, 2, 3]), { timeout: 5000, raw: true }).then((b) => [...b])));
  result('invokeNoMethod', await caught(m.invoke('nobody', null, { timeout: 2000 })));

  // Publish from here and from worker 1, then a late subscriber here.
  result('publish1', await caught(m.publish('cfg', { v: 1 }, { timeout: 5000 })));
  result('publish2', await caught(m.request(1, 'publishFrom', { topic: 'cfg', value: { v: 2 } }, { timeout: 5000 })));
  const gotBoth = (st, slot) => slot === w.slot || st.got.length >= 2;
  await statesWhen(gotBoth);
  const late = [];
  const late2 = [];
  await m.subscribe('cfg', (v, ctx) => late.push({ v, sender: ctx.sender }), { timeout: 5000 });
  await waitFor('the last value for a late subscriber', () => late.length > 0, 5000).catch(() => null);
  // A second subscriber in this worker: the last value it got, at once.
  await m.subscribe('cfg', (v) => late2.push(v), { timeout: 5000 });
  await waitFor('the last value for a second subscriber', () => late2.length > 0, 5000).catch(() => null);
  // Nothing more may come (no value twice): a moment for a duplicate.
  await sleep(50);
  result('pubsub', { states: await statesWhen(gotBoth), late: late.slice(), late2: late2.slice() });

  // The leader SIGKILLed with an invoke in hand.
  const old = m.leader();
  const pid = await m.request(old.slot, 'pid', null, { timeout: 2000 });
  const hang = caught(m.invoke('hang', null, { timeout: 10000 }));
  // Killed with the call in hand, not before it arrived.
  for (let i = 0; (await m.request(old.slot, 'hanging', null, { timeout: 2000 })) === 0; i++) {
    if (i > 500) throw new Error('the leader never got the hang invoke');
    await sleep(10);
  }
  process.kill(pid, 'SIGKILL');
  const killedAt = Date.now();
  const hung = await hang;
  const hungMs = Date.now() - killedAt;
  const next = await waitFor('a new leader', () => {
    const l = m.leader();
    return l && l.term > old.term ? l : null;
  });
  const electedMs = Date.now() - killedAt;
  await waitFor('the change seen here', () => changes.some((c) => c.term === next.term), 5000).catch(() => null);
  const after = await caught(m.invoke('whoLeads', { x: 2 }, { timeout: 5000 }));
  const idempotent = await caught(m.invoke('later', 5, { timeout: 5000, idempotent: true }));
  // The new leader was told every subscription (the killed worker's
  // respawn subscribes afresh): each worker tells it in the turn that
  // reports the change, and the respawn before it says ready.
  const sawNext = (st, slot) => st.changes.some((c) => c.term === next.term) && (slot === w.slot || st.subscribed);
  await statesWhen(sawNext);
  result('publish3', await caught(m.publish('cfg', { v: 3 }, { timeout: 5000 })));
  const gotV3 = (st, slot) => slot === w.slot || (st.got.length > 0 && st.got.at(-1).v === 3);
  await statesWhen(gotV3);
  await waitFor('v3 for the late subscriber', () => late.length > 0 && late.at(-1).v.v === 3, 5000).catch(() => null);
  result('failover', {
    old,
    pid,
    hung,
    hungMs,
    next,
    electedMs,
    changes,
    after,
    idempotent,
    leaderNow: m.leader(),
    states: await statesWhen(gotV3),
    late: late.slice(),
  });

  // A reload asked by a worker: the master replaces every worker.
  fs.writeFileSync(mark, JSON.stringify({ pid: process.pid, slot: w.slot, generation: w.generation }));
  console.log('RELOADING');
  w.requestReload();
}

async function main() {
  if (!driver) {
    serveInvokes();
    await m.subscribe('cfg', (v) => got.push(v), { timeout: 30000 });
    subscribed = true;
  }
  w.ready();
  if (!driver) return;
  if (fs.existsSync(mark)) {
    // The replacement of index 0 after the reload.
    const before = JSON.parse(fs.readFileSync(mark, 'utf8'));
    fs.rmSync(mark, { force: true });
    result('reloaded', { before, now: { pid: process.pid, slot: w.slot, generation: w.generation } });
    console.log('DONE');
    return;
  }
  await drive();
}

main().catch((e) => {
  console.log(`FAILED ${e && e.stack}`);
});
