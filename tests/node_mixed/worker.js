'use strict';
// The Node.js worker of tests/node_mixed.rs (instance 0, through
// tests/node_mixed/dispatch.sh), in a cluster with a Python worker
// (worker.py) and a Rust one (the test binary). It serves the handlers
// every language serves (who, square, doBroadcast, bc, bcCounts), drives
// the scenarios, and prints one `RESULT <json>` line each, then `DONE`
// (or `FAILED <stack>`). The test checks the results. Payloads are JSON
// (the package's default); the other languages write and read JSON text.
const { Worker } = require('../../node');

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const w = Worker.fromEnv();
const m = w.messenger();

const counts = {};
const langs = {};
const errors = [];
m.onError((e) => errors.push(`${e.code}: ${e.message}`));
m.on('who', () => ({ lang: 'node', slot: w.slot, wake: m.wake }));
m.on('square', (x) => ({ lang: 'node', v: x * x }));
m.on('doBroadcast', () => {
  m.broadcast('bc', { lang: 'node' });
  return null;
});
m.on('bc', (d, ctx) => {
  counts[ctx.sender] = (counts[ctx.sender] || 0) + 1;
  langs[ctx.sender] = d.lang;
});
m.on('bcCounts', () => ({ counts, langs }));

// Events the other languages send back, each resolving the next waiter.
const inbox = new Map();
function expect(event) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`no ${event} within 10 s`)), 10000);
    const list = inbox.get(event) || [];
    list.push((d, ctx) => {
      clearTimeout(timer);
      resolve({ d, sender: ctx.sender });
    });
    inbox.set(event, list);
  });
}
for (const event of ['report', 'held', 'released', 'holding']) {
  m.on(event, (d, ctx) => {
    const list = inbox.get(event) || [];
    const next = list.shift();
    if (next) next(d, ctx);
    else errors.push(`unexpected ${event} from ${ctx.sender}: ${JSON.stringify(d)}`);
  });
}

w.on('stop', () => {
  w.close();
  process.exit(0);
});
w.ready();

const result = (name, value) => console.log(`RESULT ${JSON.stringify({ name, value })}`);
const caught = async (p) => {
  try {
    return { ok: true, value: await p };
  } catch (e) {
    return { ok: false, code: e.code, message: e.message };
  }
};

// The slot of each language, once all three answer `who`.
async function languages() {
  for (let i = 0; ; i++) {
    const all = await m.map('who', null, { timeout: 1000 });
    const by = {};
    for (const e of all) if (e.ok) by[e.value.lang] = e.value.slot;
    if (all.length === 3 && all.every((e) => e.ok) && by.node !== undefined && by.python !== undefined && by.rust !== undefined) {
      return { by, all };
    }
    if (i > 300) throw new Error(`not every language up: ${JSON.stringify(all)}`);
    await sleep(50);
  }
}

async function drive() {
  const { by, all } = await languages();
  result('who', all);
  const { python: py, rust } = by;

  // Broadcast: each worker broadcasts once when asked; every worker counts
  // what it got per sender. Wait until complete, then a while more: any
  // duplicate would show.
  for (const s of [by.node, py, rust]) await m.request(s, 'doBroadcast', null, { timeout: 5000 });
  const complete = (entries) =>
    entries.length === 3 && entries.every((e) => e.ok && Object.values(e.value.counts).reduce((a, b) => a + b, 0) >= 3);
  for (let i = 0; i < 100 && !complete(await m.map('bcCounts', null, { timeout: 2000 })); i++) await sleep(50);
  await sleep(300);
  result('broadcast', await m.map('bcCounts', null, { timeout: 2000 }));

  // A map over all three languages.
  result('map', await m.map('square', 6, { timeout: 2000 }));

  // Requests Node -> Python, Node -> Rust, and back: each asked (by an
  // event) to request `square` of this worker and report the answer.
  result('requestPython', await caught(m.request(py, 'square', 7, { timeout: 5000 })));
  result('requestRust', await caught(m.request(rust, 'square', 8, { timeout: 5000 })));
  for (const [s, x] of [
    [py, 9],
    [rust, 10],
  ]) {
    const report = expect('report');
    m.emit(s, 'callNode', { slot: w.slot, x });
    const r = await report;
    result(`back-${s === py ? 'python' : 'rust'}`, { sender: r.sender, ...r.d });
  }

  // Typed errors across languages.
  result('pythonThrows', await caught(m.request(py, 'boom', null, { timeout: 5000 })));
  result('rustNotJson', await caught(m.request(rust, 'notJson', null, { timeout: 5000 })));
  result('rustRaw', await caught(m.request(rust, 'notJson', null, { timeout: 5000, raw: true }).then((b) => [...b])));

  // A lock the Python worker holds for 600 ms: a short wait times out; a
  // Node section waiting for it runs only after Python released it.
  {
    const held = expect('held');
    const released = expect('released');
    m.emit(py, 'hold', { name: 'mixed', ms: 600 });
    const h = await held;
    const short = await caught(w.synchronize('mixed', () => 'got it', { timeout: 100 }));
    const waitStart = Date.now();
    const section = await w.synchronize('mixed', (s) => ({ acquired: Date.now(), token: s.fencingToken, ownerDied: s.ownerDied }), {
      timeout: 10000,
    });
    const r = await released;
    result('lock', { held: h.d, short, waitStart, section, released: r.d });
  }

  // The Python holder SIGKILLed inside its section while this worker
  // waits for the lock: the Node section sees ownerDied.
  {
    const holding = expect('holding');
    m.emit(py, 'dieHolding', { name: 'victim' });
    const h = await holding;
    let entered = false;
    const waiting = w.synchronize('victim', (s) => {
      entered = true;
      return { ownerDied: s.ownerDied, token: s.fencingToken };
    }, { timeout: 10000 });
    await sleep(200);
    const enteredBeforeKill = entered;
    m.emit(py, 'die', null);
    const section = await caught(waiting);
    const again = await caught(w.synchronize('victim', (s) => ({ ownerDied: s.ownerDied, token: s.fencingToken })));
    result('ownerDied', { holding: h.d, enteredBeforeKill, section, again });
  }

  // The master respawns the Python worker (instance 1): it serves again.
  const after = await languages();
  result('respawned', { by: after.by, map: await m.map('square', 3, { timeout: 2000 }) });
  result('errors', errors);
  console.log('DONE');
}

if (w.slot === 0) {
  drive().catch((e) => {
    console.log(`FAILED ${e && e.stack}`);
  });
}
