'use strict';
// think.messenger's map: every worker, the caller included, runs the
// handler; the caller gets one entry per worker, in slot order, and never
// waits past the timeout.
//
//   target/release/shmcluster run -w 4 -- node examples/node/map.js
//
// Worker 0 waits until every worker is up, maps `testMap`, prints the
// entries, then stops the cluster.
const { Worker } = require('../../node'); // require('shmcluster') once installed

const w = Worker.fromEnv();
const m = w.messenger();

m.on('testMap', () => Math.random());
m.on('up', () => true);
w.on('stop', () => w.close());
w.ready();

async function everyoneUp() {
  for (;;) {
    const all = await m.map('up', null, { timeout: 1000 });
    if (all.length === w.instances && all.every((e) => e.ok)) return;
    await new Promise((r) => setTimeout(r, 50));
  }
}

async function main() {
  await everyoneUp();
  const all = await m.map('testMap', null, { timeout: 1000 });
  for (const e of all) {
    console.log(`worker ${w.slot}: map entry of worker ${e.slot}: ${e.ok ? e.value : `${e.error.code} ${e.error.message}`}`);
  }
  w.requestShutdown(); // done: a graceful shutdown of the cluster
}

if (w.slot === 0) {
  main().catch((e) => {
    console.error(e);
    w.requestShutdown();
  });
}
