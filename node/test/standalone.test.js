'use strict';
// The API in one process (Worker.standalone(): a cluster of one), and
// what must hold of its lifecycle: unref lets the process exit, close
// ends calls in flight, bad arguments are typed errors.
const { test } = require('node:test');
const assert = require('node:assert/strict');
const { spawnSync } = require('node:child_process');
const path = require('node:path');
const { Worker, ShmclusterError } = require('..');

test('request, map, consume, broadcast to itself', async () => {
  const w = Worker.standalone();
  const m = w.messenger();
  try {
    assert.equal(w.slot, 0);
    assert.equal(w.instances, 1);
    const seen = [];
    m.on('bc', (d, ctx) => seen.push([d, ctx.sender, ctx.kind]));
    m.on('square', (x) => x * x);
    m.on('later', async (x) => {
      await new Promise((r) => setTimeout(r, 20));
      return { x };
    });
    assert.equal(m.broadcast('bc', { a: 1 }), 1);
    assert.equal(await m.request(0, 'square', 12, { timeout: 1000 }), 144);
    assert.deepEqual(await m.request(0, 'later', 'v'), { x: 'v' });
    assert.deepEqual(await m.map('square', 3), [{ slot: 0, ok: true, value: 9 }]);
    const c = await m.consume('square', 2);
    assert.equal(c.slot, 0);
    assert.equal(c.attempts, 1);
    assert.deepEqual(seen, [[{ a: 1 }, 0, 'event']]);
  } finally {
    w.close();
  }
});

test('bad arguments are typed errors', async () => {
  const w = Worker.standalone();
  const m = w.messenger();
  try {
    m.on('square', (x) => x * x);
    await assert.rejects(m.request(3, 'square', 1), { code: 'NO_SUCH_WORKER' });
    await assert.rejects(m.request(-1, 'square', 1), { code: 'NO_SUCH_WORKER' });
    await assert.rejects(m.request('x', 'square', 1), { code: 'INVALID_ARGUMENT' });
    await assert.rejects(m.request(0, 'square', 1, { timeout: -5 }), { code: 'INVALID_ARGUMENT' });
    await assert.rejects(m.request(0, 'e'.repeat(300), 1), { code: 'EVENT_NAME' });
    await assert.rejects(m.request(0, 'square', 'x'.repeat(m.maxPayload + 1)), { code: 'TOO_LARGE' });
    const cyclic = {};
    cyclic.self = cyclic;
    await assert.rejects(m.request(0, 'square', cyclic), { code: 'INVALID_ARGUMENT' });
    assert.throws(() => m.emit(7, 'square', 1), { code: 'NO_SUCH_WORKER' });
    assert.throws(() => m.on('square', 'not a function'), { code: 'INVALID_ARGUMENT' });
    const e = await m.request(0, 'nobody', 1, { timeout: 500 }).catch((x) => x);
    assert.ok(e instanceof ShmclusterError && e instanceof Error);
    assert.equal(e.code, 'NO_HANDLER');
  } finally {
    w.close();
  }
});

test('close ends calls in flight with WORKER_CLOSED', async () => {
  const w = Worker.standalone();
  const m = w.messenger();
  m.on('never', () => new Promise(() => {}));
  const p = m.request(0, 'never', null, { timeout: 5000 });
  await new Promise((r) => setTimeout(r, 20));
  w.close();
  await assert.rejects(p, { code: 'WORKER_CLOSED' });
  await assert.rejects(m.request(0, 'never', null), { code: 'WORKER_CLOSED' });
  assert.throws(() => m.broadcast('x', 1), { code: 'WORKER_CLOSED' });
});

test('requestShutdown: the worker itself is told to stop', { timeout: 5000 }, async () => {
  const w = Worker.standalone();
  w.messenger();
  assert.equal(w.shouldStop(), false);
  const stopped = new Promise((resolve) => w.once('stop', resolve));
  w.requestShutdown();
  await stopped;
  assert.equal(w.shouldStop(), true);
  w.close();
  assert.throws(() => w.requestShutdown(), { code: 'WORKER_CLOSED' });
});

test('an unref()ed messenger does not keep the process alive; a ref()ed one does', () => {
  const script = (ref) => `
    const { Worker } = require(${JSON.stringify(path.join(__dirname, '..'))});
    const m = Worker.standalone().messenger();
    m.on('x', () => 1);
    ${ref ? '' : 'm.unref();'}
  `;
  const unref = spawnSync(process.execPath, ['-e', script(false)], { timeout: 10000 });
  assert.equal(unref.status, 0, String(unref.stderr));
  const thread = spawnSync(process.execPath, ['-e', script(false)], {
    timeout: 10000,
    env: { ...process.env, NODE_SHMCLUSTER_WAKE: 'thread' },
  });
  assert.equal(thread.status, 0, `the waiter thread's wake unref'd too: ${thread.stderr}`);
  const ref = spawnSync(process.execPath, ['-e', script(true)], { timeout: 1500, killSignal: 'SIGKILL' });
  assert.equal(ref.signal, 'SIGKILL', 'a referenced messenger keeps the loop alive');
});

test('synchronize: sections of one lock exclude each other across awaits', async () => {
  const w = Worker.standalone();
  try {
    let inside = 0;
    let most = 0;
    const section = async () => {
      inside++;
      most = Math.max(most, inside);
      await new Promise((r) => setTimeout(r, 5));
      inside--;
    };
    await Promise.all(Array.from({ length: 10 }, () => w.synchronize('k', section)));
    assert.equal(most, 1);
    const g = await w.synchronize((s) => s);
    assert.deepEqual([g.name, g.ownerDied, typeof g.fencingToken], ['', false, 'number']);
    let entered;
    const holding = new Promise((r) => (entered = r));
    const hold = w.synchronize('t', () => {
      entered();
      return new Promise((r) => setTimeout(r, 300));
    });
    await holding;
    await assert.rejects(w.synchronize('t', () => 1, { timeout: 50 }), { code: 'LOCK_TIMEOUT' });
    await hold;
    await assert.rejects(w.synchronize('x'.repeat(100), () => 1), { code: 'LOCK_NAME_TOO_LONG' });
    // A section that throws releases the lock, and the caller gets its error.
    await assert.rejects(w.synchronize('k', () => { throw new Error('inside'); }), /inside/);
    assert.equal(await w.synchronize('k', () => 'again', { timeout: 1000 }), 'again');
  } finally {
    w.close();
  }
});

test('spin: defaults, NODE_SHMCLUSTER_SPIN, the option and its bounds', async () => {
  const w = Worker.standalone();
  try {
    assert.deepEqual(w.messenger().spin, { request: 50, answer: 20 });
  } finally {
    w.close();
  }
  for (const [spin, want] of [
    [0, { request: 0, answer: 0 }],
    [1000, { request: 1000, answer: 1000 }],
    [{ request: 7 }, { request: 7, answer: 20 }],
    [{ answer: 3 }, { request: 50, answer: 3 }],
  ]) {
    const s = Worker.standalone({ spin });
    const m = s.messenger();
    try {
      assert.deepEqual(m.spin, want);
      m.on('square', (x) => x * x);
      // Calls work whatever the spin.
      for (let i = 0; i < 50; i++) assert.equal(await m.request(0, 'square', i), i * i);
      assert.deepEqual(await m.map('square', 3), [{ slot: 0, ok: true, value: 9 }]);
    } finally {
      s.close();
    }
  }
  for (const spin of [-1, 1001, 1.5, '5', null, { request: -2 }, { answer: 2000 }]) {
    assert.throws(() => Worker.standalone({ spin }), (e) => e instanceof ShmclusterError && e.code === 'INVALID_ARGUMENT', String(spin));
  }
  const env = (v) =>
    spawnSync(process.execPath, ['-e', "const { Worker } = require('.'); const w = Worker.standalone(); console.log(JSON.stringify(w.messenger().spin)); w.close();"], {
      cwd: path.join(__dirname, '..'),
      env: { ...process.env, NODE_SHMCLUSTER_SPIN: v },
      encoding: 'utf8',
      timeout: 10000,
    }).stdout.trim();
  assert.equal(env('30'), '{"request":30,"answer":20}');
  assert.equal(env('30,4'), '{"request":30,"answer":4}');
  assert.equal(env('0,0'), '{"request":0,"answer":0}');
  // Too long is capped, garbage leaves the default.
  assert.equal(env('5000,x'), '{"request":1000,"answer":20}');
});

test('a synchronize still waiting when the worker closes: WORKER_CLOSED, its section never runs', { timeout: 10000 }, async () => {
  const w = Worker.standalone();
  let entered;
  const holding = new Promise((r) => (entered = r));
  let finish;
  const first = w.synchronize('c', () => {
    entered();
    return new Promise((r) => (finish = r));
  });
  await holding;
  let ran = false;
  const second = w.synchronize('c', () => {
    ran = true;
  });
  w.close();
  await assert.rejects(second, { code: 'WORKER_CLOSED' });
  await assert.rejects(w.synchronize('c', () => 1), { code: 'WORKER_CLOSED' });
  finish('done');
  assert.equal(await first, 'done');
  // Time for a wrongly woken waiter to have run.
  await new Promise((r) => setTimeout(r, 100));
  assert.equal(ran, false, 'a section ran after close()');
});

test('close() with a synchronize waiting for a lock held elsewhere: the process still exits', () => {
  // The lock is held by this process's own election (a candidate thread
  // holds the lock `leader:` while it leads), which close() ends last; a
  // waiting section must not keep the loop alive or run.
  const script = `
    const { Worker } = require(${JSON.stringify(path.join(__dirname, '..'))});
    const w = Worker.standalone();
    const m = w.messenger();
    m.campaign();
    (async () => {
      for (let i = 0; i < 500 && !m.isLeader; i++) await new Promise((r) => setTimeout(r, 10));
      if (!m.isLeader) throw new Error('no leader');
      const p = w.synchronize('leader:', () => console.log('RAN'));
      p.then(() => console.log('RESOLVED'), (e) => console.log('REJECTED ' + e.code));
      setTimeout(() => w.close(), 50);
    })();
  `;
  const r = spawnSync(process.execPath, ['-e', script], { timeout: 5000, killSignal: 'SIGKILL' });
  assert.equal(r.signal, null, `the process did not exit: ${r.stdout}${r.stderr}`);
  assert.equal(r.status, 0, String(r.stderr));
  assert.equal(String(r.stdout).trim(), 'REJECTED WORKER_CLOSED');
});

test('payloads: raw handlers get Buffers, JSON ones values, in order past a turn', async () => {
  const w = Worker.standalone();
  const m = w.messenger();
  try {
    // UTF-8 text to a raw handler is still a Buffer (the addon hands JSON
    // handlers strings).
    m.on('bytes', (b) => (Buffer.isBuffer(b) ? `buffer:${b.toString('latin1')}` : typeof b), { raw: true });
    assert.equal(await m.request(0, 'bytes', Buffer.from('abc')), 'buffer:abc');
    assert.equal(await m.request(0, 'bytes', { a: 1 }), 'buffer:{"a":1}');
    // A raw caller gets the answer's bytes.
    m.on('echo', (x) => x);
    const raw = await m.request(0, 'echo', 'x', { raw: true });
    assert.ok(Buffer.isBuffer(raw));
    assert.equal(raw.toString(), '"x"');
    m.on('what', (x) => (x === undefined ? 'undefined' : typeof x));
    assert.equal(await m.request(0, 'what', Buffer.alloc(0)), 'undefined');
    // Bytes that are not UTF-8, to a JSON handler: a typed error.
    await assert.rejects(m.request(0, 'echo', Buffer.from([0xff, 0xfe, 0x31])), {
      code: 'HANDLER_FAILED',
      message: /not JSON/,
    });
    // An answer longer than the limit answers HANDLER_FAILED.
    m.on('big', () => 'x'.repeat(m.maxPayload));
    await assert.rejects(m.request(0, 'big', null), { code: 'HANDLER_FAILED', message: /too large/ });
    // A raw and a JSON handler of one event; then the JSON one alone.
    const seen = [];
    const rawFn = (b) => seen.push(['raw', Buffer.isBuffer(b), b.toString()]);
    m.on('mix', (v) => seen.push(['json', v]));
    m.on('mix', rawFn, { raw: true });
    m.broadcast('mix', { k: 1 });
    await new Promise((r) => setTimeout(r, 50));
    m.off('mix', rawFn);
    m.broadcast('mix', { k: 2 });
    await new Promise((r) => setTimeout(r, 50));
    assert.deepEqual(seen, [['json', { k: 1 }], ['raw', true, '{"k":1}'], ['json', { k: 2 }]]);
    // More messages than one turn hands JS (4096 numbers, 3 per event):
    // all of them, in order.
    const N = 3000;
    const got = [];
    let done;
    const all = new Promise((r) => (done = r));
    m.on('many', (i) => {
      got.push(i);
      if (got.length === N) done();
    });
    for (let i = 0; i < N; i++) m.emit(0, 'many', i);
    await all;
    assert.deepEqual(got, Array.from({ length: N }, (_, i) => i));
  } finally {
    w.close();
  }
});
