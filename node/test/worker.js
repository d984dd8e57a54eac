'use strict';
// A worker of the test cluster (test/cluster.test.js starts
// `shmcluster run -w 3 -- node test/worker.js`). Every worker serves the
// handlers below; slot 0 also drives the scenarios and prints one
// `RESULT <json>` line each, then `DONE`.
const { Worker } = require('..');

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const w = Worker.fromEnv();
const m = w.messenger();

const counts = {};
const got = [];
const errors = [];
m.onError((e) => errors.push(`${e.code}: ${e.message}`));
m.on('bc', (d, ctx) => {
  counts[ctx.sender] = (counts[ctx.sender] || 0) + 1;
});
m.on('doBroadcast', () => m.broadcast('bc', { from: w.slot }));
m.on('bcCounts', () => counts);
m.on('square', (x) => x * x);
m.on('who', () => w.slot);
m.on('wake', () => m.wake);
m.on('slow', async (x) => {
  await sleep(x.ms);
  return x.v;
});
m.on('boom', () => {
  throw new Error(`kaboom from ${w.slot}`);
});
m.on('rejects', async () => {
  throw new Error('async kaboom');
});
m.on('task', (d, ctx) => ({ ran: w.slot, delivery: ctx.deliveryId, d }));
m.on('message', (d, ctx) => got.push(['message', ctx.sender, d]));
m.on('custom', (d, ctx) => got.push(['custom', ctx.sender, d]));
m.on('got', () => got);
m.on('errors', () => errors);
m.on('raw', (b) => Buffer.concat([Buffer.from('raw:'), b]), { raw: true });
// synchronize: a read-modify-write of a file that loses updates unless
// the sections exclude each other across processes.
const counterFile = require('node:path').join(require('node:os').tmpdir(), `shmc-node-counter-${process.ppid}`);
m.on('countUp', async (n) => {
  const fs = require('node:fs/promises');
  const tokens = [];
  for (let i = 0; i < n; i++) {
    await w.synchronize('counter', async (s) => {
      let v = 0;
      try {
        v = Number(await fs.readFile(counterFile, 'utf8'));
      } catch (_) {}
      await new Promise((r) => setImmediate(r));
      await fs.writeFile(counterFile, String(v + 1));
      tokens.push(s.fencingToken);
    });
  }
  return tokens;
});
m.on('dieInSection', () =>
  w.synchronize('victim', async () => {
    process.kill(process.pid, 'SIGKILL');
    await new Promise(() => {});
  }),
);
// consume, at least once: the first delivery SIGKILLs its worker inside
// the handler (leaving a mark with the delivery id); the redelivery runs.
const dieMark = require('node:path').join(require('node:os').tmpdir(), `shmc-node-consume-${process.ppid}`);
if (w.slot !== 0) {
  m.on('consumeDie', async (d, ctx) => {
    const fs = require('node:fs');
    if (!fs.existsSync(dieMark)) {
      fs.writeFileSync(dieMark, `${ctx.deliveryId} ${w.slot}`);
      process.kill(process.pid, 'SIGKILL');
      await new Promise(() => {});
    }
    return null;
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
    return { ok: false, code: e.code, message: e.message, isError: e instanceof Error };
  }
};

async function drive() {
  // Every instance up.
  for (let i = 0; ; i++) {
    const all = await m.map('who', null, { timeout: 1000 });
    if (all.length === w.instances && all.every((e) => e.ok)) break;
    if (i > 200) throw new Error(`cluster not up: ${JSON.stringify(all)}`);
    await sleep(50);
  }
  result('wake', await m.map('wake', null, { timeout: 2000 }));
  for (let s = 0; s < w.instances; s++) await m.request(s, 'doBroadcast', null, { timeout: 2000 });
  await sleep(300);
  result('broadcast', await m.map('bcCounts', null, { timeout: 2000 }));
  result('request', await caught(m.request(1, 'square', 12, { timeout: 2000 })));
  result('map', await m.map('who', null, { timeout: 2000 }));
  result('mapBoom', await m.map('boom', null, { timeout: 2000 }));
  result('consume', await caught(m.consume('task', { n: 1 }, { timeout: 2000 })));
  result('throws', await caught(m.request(2, 'boom', null, { timeout: 2000 })));
  result('rejects', await caught(m.request(1, 'rejects', null, { timeout: 2000 })));
  result('noSuchWorker', await caught(m.request(99, 'square', 1, { timeout: 2000 })));
  result('emitNoSuchWorker', await caught((async () => m.emit(99, 'square', 1))()));
  result('noHandler', await caught(m.request(1, 'nobody', 1, { timeout: 2000 })));
  result('timedOut', await caught(m.request(1, 'slow', { ms: 2000, v: 1 }, { timeout: 100 })));
  result('tooLarge', await caught(m.request(1, 'square', 'x'.repeat(m.maxPayload + 1), { timeout: 2000 })));
  result('raw', await caught(m.request(1, 'raw', Buffer.from([1, 2]), { timeout: 2000, raw: true }).then((b) => b.toString('latin1'))));
  // A raw sender's bytes that are not JSON, to JSON handlers.
  result('notJson', await caught(m.request(1, 'square', Buffer.from([0xff, 0xfe, 0x00]), { timeout: 2000 })));
  m.emit(1, 'bc', Buffer.from([0xff, 0x00]));
  result('afterNotJson', await caught(m.request(1, 'square', 5, { timeout: 2000 })));
  result('errors', await m.request(1, 'errors', null, { timeout: 2000 }));
  m.to(1).send('hi');
  m.to(1).emit('custom', 'hello');
  m.to('all').send('all attention');
  await sleep(200);
  result('ipchannel', await m.map('got', null, { timeout: 2000 }));

  // The event loop stays free while many requests are in flight.
  let ticks = 0;
  const tick = setInterval(() => ticks++, 10);
  const n = 10000;
  const started = Date.now();
  const calls = [];
  for (let i = 0; i < n; i++) calls.push(m.request(1 + (i % 2), 'slow', { ms: 1000, v: i }, { timeout: 20000 }));
  const ticksAfterSend = ticks;
  const values = await Promise.all(calls);
  clearInterval(tick);
  result('loopFree', {
    n,
    correct: values.every((v, i) => v === i),
    ticks,
    ticksAfterSend,
    ms: Date.now() - started,
  });

  // synchronize across the three workers, then a holder SIGKILLed inside.
  const fs = require('node:fs');
  fs.rmSync(counterFile, { force: true });
  const tokens = await m.map('countUp', 20, { timeout: 30000 });
  result('synchronize', { tokens, count: Number(fs.readFileSync(counterFile, 'utf8')) });
  fs.rmSync(counterFile, { force: true });
  result('dieInSection', await caught(m.request(2, 'dieInSection', null, { timeout: 5000 })));
  result('afterDeath', await w.synchronize('victim', (s) => s));
  result('afterAgain', await w.synchronize('victim', (s) => s));
  fs.rmSync(dieMark, { force: true });
  const consumed = await caught(m.consume('consumeDie', null, { timeout: 10000 }));
  const [firstId, firstSlot] = fs.readFileSync(dieMark, 'utf8').split(' ');
  fs.rmSync(dieMark, { force: true });
  result('consumeRedelivered', { consumed, firstId, firstSlot: Number(firstSlot) });
  console.log('DONE');
}

if (w.slot === 0) {
  drive().catch((e) => {
    console.log(`FAILED ${e && e.stack}`);
  });
}
