'use strict';
// think.messenger's consume: each task runs on exactly one worker (again
// on another if that one dies before answering: at least once).
//
//   target/release/shmcluster run -w 4 -- node examples/node/consume.js
//
// Worker 0 waits until every worker is up, hands out six tasks at once,
// prints where each ran, then stops the cluster.
const { Worker } = require('../../node'); // require('shmcluster') once installed

const w = Worker.fromEnv();
const m = w.messenger();

m.on('consumeEvent', async (data, ctx) => {
  console.log(`worker ${w.slot}: consumeEvent ${JSON.stringify(data)} (delivery ${ctx.deliveryId})`);
  await new Promise((r) => setTimeout(r, 20)); // some work
});
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
  const tasks = [1, 2, 3, 4, 5, 6].map((job) => m.consume('consumeEvent', { job }, { timeout: 5000 }));
  for (const [i, done] of (await Promise.all(tasks)).entries()) {
    console.log(`worker ${w.slot}: job ${i + 1} ran on worker ${done.slot} (delivery ${done.deliveryId}, attempt ${done.attempts})`);
  }
  w.requestShutdown(); // done: a graceful shutdown of the cluster
}

if (w.slot === 0) {
  main().catch((e) => {
    console.error(e);
    w.requestShutdown();
  });
}
