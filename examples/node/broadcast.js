'use strict';
// think.messenger's broadcast: every worker, the sender included, runs its
// handlers for the event.
//
//   target/release/shmcluster run -w 4 -- node examples/node/broadcast.js
//
// Worker 0 waits until every worker is up, broadcasts `test` once, asks
// every worker (a map) how many it got, then stops the cluster.
const { Worker } = require('../../node'); // require('shmcluster') once installed

const w = Worker.fromEnv();
const m = w.messenger();

let got = 0;
m.on('test', (data, ctx) => {
  got++;
  console.log(`worker ${w.slot}: test ${JSON.stringify(data)} from worker ${ctx.sender}`);
});
m.on('got', () => got);
w.on('stop', () => w.close());
w.ready();

// Until every worker answers a map (they start at about the same time).
async function everyoneUp() {
  for (;;) {
    const all = await m.map('got', null, { timeout: 1000 });
    if (all.length === w.instances && all.every((e) => e.ok)) return;
    await new Promise((r) => setTimeout(r, 50));
  }
}

async function main() {
  await everyoneUp();
  const n = m.broadcast('test', { hello: 'world' });
  console.log(`worker ${w.slot}: broadcast test to ${n} workers`);
  // A worker's messages arrive in the order they were sent: the map comes
  // after the broadcast to each worker.
  const counts = await m.map('got', null, { timeout: 1000 });
  console.log(`worker ${w.slot}: each worker got it ${counts.map((e) => `${e.slot}:${e.value}`).join(' ')}`);
  // Done: a graceful shutdown of the cluster, as `shmcluster stop` does.
  w.requestShutdown();
}

if (w.slot === 0) {
  main().catch((e) => {
    console.error(e);
    w.requestShutdown();
  });
}
