'use strict';
// An HTTP server of Node workers on the listener the master bound:
//
//   cargo build --release -p shmcluster && (cd node && npm install)
//   target/release/shmcluster run -w 4 --listen 127.0.0.1:8080 -- node examples/node/http.js
//   curl localhost:8080/            # which worker answered: slot, pid, generation
//   curl localhost:8080/workers     # every worker, through the messenger (map)
//   curl -X POST localhost:8080/count   # a counter shared by the workers (synchronize)
//   curl 'localhost:8080/slow?ms=500'   # an answer that takes its time
//   kill -HUP <master pid>          # a rolling reload: no request fails
//   kill -TERM <master pid>         # a graceful shutdown: requests in flight finish
//
// Each worker listens on fd 3 (`listener()`), says ready once listening,
// and drains when the master tells it to stop (`drainOnStop`): it stops
// accepting, finishes its requests in flight, closes its keep-alive
// connections, and exits 0. The package is required from the repository
// (`require('../../node')`); an installed one is `require('shmcluster')`.

const fs = require('node:fs');
const http = require('node:http');
const os = require('node:os');
const path = require('node:path');

const { Worker, listener, drainOnStop } = require('../../node');

const generation = Number(process.env.SHMCLUSTER_GENERATION);
const w = Worker.fromEnv();
const m = w.messenger();
const me = () => ({ slot: w.slot, pid: process.pid, generation });

// Every worker answers `who` (GET /workers maps over them).
m.on('who', () => me());

// The counter lives in a file of the cluster's (the master's pid names
// it); the workers take turns with it under the cluster-wide lock `count`.
const counterFile = path.join(process.env.SHMC_HTTP_DATA || os.tmpdir(), `shmcluster-http-count-${process.ppid}`);
const readCounter = () => {
  try {
    return Number(fs.readFileSync(counterFile, 'utf8')) || 0;
  } catch (e) {
    if (e.code === 'ENOENT') return 0;
    throw e;
  }
};

function send(res, status, body) {
  const json = typeof body !== 'string';
  const text = json ? `${JSON.stringify(body)}\n` : body;
  res.writeHead(status, { 'Content-Type': json ? 'application/json' : 'text/plain', 'Content-Length': Buffer.byteLength(text) });
  res.end(text);
}

async function route(req, res) {
  const url = new URL(req.url, 'http://x');
  const banner = () => `worker ${w.slot} pid ${process.pid} generation ${generation}\n`;
  if (req.method === 'GET' && url.pathname === '/') return send(res, 200, banner());
  if (req.method === 'GET' && url.pathname === '/slow') {
    const ms = Math.min(Number(url.searchParams.get('ms')) || 0, 10000);
    await new Promise((r) => setTimeout(r, ms));
    return send(res, 200, banner());
  }
  if (req.method === 'GET' && url.pathname === '/workers') {
    const all = await m.map('who', null, { timeout: 1000 });
    return send(res, 200, { askedBy: me(), workers: all.filter((e) => e.ok).map((e) => e.value), errors: all.filter((e) => !e.ok) });
  }
  if (url.pathname === '/count' && (req.method === 'GET' || req.method === 'POST')) {
    const value = await w.synchronize('count', async (section) => {
      const v = readCounter() + (req.method === 'POST' ? 1 : 0);
      if (req.method === 'POST') fs.writeFileSync(counterFile, String(v));
      return { value: v, token: section.fencingToken, ownerDied: section.ownerDied };
    }, { timeout: 5000 });
    return send(res, 200, { ...value, slot: w.slot });
  }
  return send(res, 404, 'not found\n');
}

const server = http.createServer((req, res) => {
  req.resume();
  req.on('end', () => {
    route(req, res).catch((e) => send(res, 500, `${e.code || 'error'}: ${e.message}\n`));
  });
});
drainOnStop(w, server);
server.listen(listener(), () => w.ready());
