'use strict';
// SFN's ipchannel: `to(id).send(data)` (the `message` event),
// `to(id).emit(event, data)`, `to('all')`, and messages sent before the
// receiver is up, which wait for it.
//
//   target/release/shmcluster run -w 4 -- node examples/node/ipchannel.js
//
// Worker 0 sends to the last worker at once, while that worker is still
// starting (it waits a second before attaching): the message waits in its
// inbox and is handled once it is up. When every worker is up, worker 0
// sends to worker 1 and to all, asks every worker (a map) what it got,
// then stops the cluster.
const { Worker } = require('../../node'); // require('shmcluster') once installed

const last = Number(process.env.SHMCLUSTER_WORKERS) - 1;
const slot = Number(process.env.SHMCLUSTER_WORKER);

async function start() {
  if (slot === last) {
    // A slow start: worker 0's message arrives before this worker is up.
    await new Promise((r) => setTimeout(r, 1000));
    console.log(`worker ${slot}: up after 1 s`);
  }
  const w = Worker.fromEnv();
  const m = w.messenger();
  const got = [];
  m.on('message', (data, ctx) => {
    got.push(data);
    console.log(`worker ${w.slot}: message ${JSON.stringify(data)} from worker ${ctx.sender}`);
  });
  m.on('custom-event', (data, ctx) => {
    got.push(data);
    console.log(`worker ${w.slot}: custom-event ${JSON.stringify(data)} from worker ${ctx.sender}`);
  });
  m.on('got', () => got);
  w.on('stop', () => w.close());
  w.ready();
  if (w.slot === 0) await drive(w, m);
}

async function drive(w, m) {
  // Before the last worker is up: queued in its inbox.
  m.to(last).send('sent before you were up');
  console.log(`worker 0: to(${last}).send while worker ${last} is starting`);
  for (;;) {
    const all = await m.map('got', null, { timeout: 1000 });
    if (all.length === w.instances && all.every((e) => e.ok)) break;
    await new Promise((r) => setTimeout(r, 50));
  }
  m.to(1).send('hi');
  m.to(1).emit('custom-event', 'hello');
  m.to('all').send('all attention');
  // Each worker's messages arrive in the order they were sent.
  for (const e of await m.map('got', null, { timeout: 1000 })) {
    console.log(`worker 0: worker ${e.slot} got ${JSON.stringify(e.value)}`);
  }
  w.requestShutdown(); // done: a graceful shutdown of the cluster
}

start().catch((e) => {
  console.error(e);
  w.requestShutdown();
});
