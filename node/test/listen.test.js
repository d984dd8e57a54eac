'use strict';
// listen.js: the listener helpers (no listener: typed errors; the systemd
// variables without Worker.fromEnv, under a real master) and the drain of
// an HTTP server (in one process, over raw sockets, so that what the
// server does to each connection is seen as it happens). The drain under
// a real master with wrk is tests/node_http.rs.
const { test } = require('node:test');
const assert = require('node:assert/strict');
const { spawn } = require('node:child_process');
const http = require('node:http');
const net = require('node:net');
const path = require('node:path');
const readline = require('node:readline');
const { listenFds, listener, drainer } = require('..');

const { bin } = require('./harness');

test('without inherited listeners: [] and typed errors', () => {
  assert.deepEqual(listenFds(), []);
  assert.throws(() => listener(), { code: 'ENVIRONMENT' });
  assert.throws(() => listener('web'), { code: 'ENVIRONMENT' });
  assert.throws(() => listener(-1), { code: 'INVALID_ARGUMENT' });
  assert.throws(() => listener(0.5), { code: 'INVALID_ARGUMENT' });
  assert.throws(() => listener({}), { code: 'INVALID_ARGUMENT' });
  assert.throws(() => drainer(http.createServer(), { idleTimeout: -1 }), { code: 'INVALID_ARGUMENT' });
});

// A raw HTTP/1.1 connection: what arrives, and when it ends.
function connect(port) {
  return new Promise((resolve, reject) => {
    const s = net.connect(port, '127.0.0.1', () => resolve(c));
    const c = { s, data: '', ended: null, waiters: [] };
    s.setEncoding('latin1');
    const poke = () => {
      for (const w of c.waiters.splice(0)) w();
    };
    s.on('data', (d) => {
      c.data += d;
      poke();
    });
    s.on('close', () => {
      c.ended = Date.now();
      poke();
    });
    s.on('error', () => {});
    s.once('error', reject);
  });
}

function until(c, done, ms = 5000) {
  return new Promise((resolve, reject) => {
    const t = setTimeout(() => reject(new Error(`timed out; got ${JSON.stringify(c.data)}`)), ms);
    const check = () => {
      if (done()) {
        clearTimeout(t);
        resolve();
      } else {
        c.waiters.push(check);
      }
    };
    check();
  });
}

// Sends one GET and waits for its whole answer (Content-Length bodies).
async function get(c, url) {
  const from = c.data.length;
  c.s.write(`GET ${url} HTTP/1.1\r\nHost: t\r\n\r\n`);
  let answer;
  await until(c, () => {
    const text = c.data.slice(from);
    const end = text.indexOf('\r\n\r\n');
    if (end < 0) return false;
    const len = Number((/content-length: (\d+)/i.exec(text.slice(0, end)) || [])[1]);
    if (text.length < end + 4 + len) return false;
    answer = { head: text.slice(0, end).toLowerCase(), body: text.slice(end + 4, end + 4 + len) };
    return true;
  });
  return answer;
}

test('drain: stop accepting, answer in-flight and later requests with close, idle ones closed at the deadline', async () => {
  const server = http.createServer((req, res) => {
    const ms = Number(new URL(req.url, 'http://t').searchParams.get('ms')) || 0;
    setTimeout(() => {
      res.setHeader('Content-Length', 2);
      res.end('ok');
    }, ms);
  });
  const idleTimeout = 1000;
  const drain = drainer(server, { idleTimeout });
  await new Promise((r) => server.listen(0, '127.0.0.1', r));
  const { port } = server.address();
  const inFlight = await connect(port);
  const reused = await connect(port);
  const idle = await connect(port);
  for (const c of [inFlight, reused, idle]) assert.doesNotMatch((await get(c, '/')).head, /connection: close/);
  const slow = get(inFlight, '/?ms=300');
  await new Promise((r) => setTimeout(r, 50));

  const start = Date.now();
  let drained = null;
  drain().then(() => {
    drained = Date.now();
  });
  // A request on a kept-alive connection before the deadline is answered,
  // with close, and the connection ends.
  const b = await get(reused, '/');
  assert.equal(b.body, 'ok');
  assert.match(b.head, /connection: close/);
  await until(reused, () => reused.ended !== null);
  // No longer accepting.
  await assert.rejects(connect(port), { code: 'ECONNREFUSED' });
  // The answer in flight comes, says close, and its connection ends.
  const a = await slow;
  assert.equal(a.body, 'ok');
  assert.match(a.head, /connection: close/);
  await until(inFlight, () => inFlight.ended !== null);
  // The idle one is closed at the deadline, not before; then the drain ends.
  await until(idle, () => idle.ended !== null, 5000);
  assert.ok(idle.ended - start >= idleTimeout - 20, `idle connection closed after ${idle.ended - start} ms`);
  await until(idle, () => drained !== null);
  assert.equal(server.listening, false);
  assert.equal(await drain(), undefined, 'drain() again: the same drain');
});

test('a drain before the server listens: it resolves at once, and a later listen is closed', { timeout: 5000 }, async () => {
  const server = http.createServer((req, res) => res.end('ok'));
  const drain = drainer(server, { idleTimeout: 100 });
  await drain();
  // Told to stop before it listened: it must not start serving now.
  const closed = new Promise((resolve) => server.once('close', resolve));
  server.listen(0, '127.0.0.1');
  await closed;
  assert.equal(server.listening, false);
});

test('listener() from the systemd variables alone (no Worker.fromEnv), under a real master', async (t) => {
  assert.ok(bin, 'build the command first: cargo build -p shmcluster');
  const child = `
    const http = require('node:http');
    const { listenFds, listener } = require(${JSON.stringify(path.join(__dirname, '..'))});
    const fds = listenFds();
    const server = http.createServer((req, res) => res.end(String(process.pid)));
    server.listen(listener('listen0'), () => {
      // What a child process of the worker finds at fd 3: nothing, since
      // Node marks the descriptors it inherits close-on-exec at start-up
      // (fdinfo flags 02000002 before any listen, on Node 20).
      let child;
      try {
        child = require('node:child_process').execFileSync('readlink', ['/proc/self/fd/3'], { stdio: ['ignore', 'pipe', 'ignore'] }).toString().trim();
      } catch (_) {
        child = null;
      }
      console.log(JSON.stringify({ fds, again: listenFds() === fds, left: process.env.LISTEN_FDS ?? null, child, port: server.address().port }));
    });`;
  const master = spawn(bin, ['run', '-w', '1', '--ready-on-start', '--listen', '127.0.0.1:0', '--', process.execPath, '-e', child], {
    detached: true,
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let log = '';
  master.stderr.on('data', (d) => {
    log += d;
  });
  t.after(
    () =>
      new Promise((resolve) => {
        if (master.exitCode !== null || master.signalCode !== null) return resolve();
        const kill = setTimeout(() => {
          try {
            process.kill(-master.pid, 'SIGKILL');
          } catch (_) {}
        }, 5000);
        master.once('exit', () => {
          clearTimeout(kill);
          resolve();
        });
        master.kill('SIGTERM');
      }),
  );
  const line = await new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`no line in 20 s:\n${log}`)), 20000);
    readline.createInterface({ input: master.stdout }).once('line', (l) => {
      clearTimeout(timer);
      resolve(l);
    });
  });
  const got = JSON.parse(line);
  assert.deepEqual(got.fds, [{ fd: 3, name: 'listen0' }]);
  assert.equal(got.again, true);
  assert.equal(got.left, null, 'the variables are removed once taken');
  assert.ok(!/^socket:/.test(got.child || ''), `a child process inherited the listener: fd 3 is ${got.child}`);
  const pid = await new Promise((resolve, reject) => {
    http.get({ host: '127.0.0.1', port: got.port, agent: false }, (res) => {
      let body = '';
      res.on('data', (d) => (body += d));
      res.on('end', () => resolve(Number(body)));
    }).on('error', reject);
  });
  assert.ok(pid > 0 && pid !== master.pid, `answered by ${pid}`);
});
