'use strict';
// Listeners and drain for Node servers under `shmcluster run`.
//
// The master binds each `--listen ADDR` before it starts any worker and
// hands the sockets to every worker as systemd's socket activation does:
// descriptors 3, 4, ... with LISTEN_FDS (how many), LISTEN_PID (the
// worker's own pid) and LISTEN_FDNAMES (their names, `listen0`, ...).
//
//   const { Worker, listener, drainOnStop } = require('shmcluster');
//   const w = Worker.fromEnv();
//   const server = http.createServer(handler);
//   drainOnStop(w, server);
//   server.listen(listener(), () => w.ready());
//
// A drain (a rolling reload replacing this worker, or a shutdown): the
// server stops accepting at once (the socket stays open in the master and
// the other workers, so no connection waiting to be accepted is lost),
// every answer from then on says `Connection: close` and its connection
// ends after it, connections still idle `idleTimeout` ms later are closed,
// and once the last connection has ended the worker closes and the process
// exits 0.

const net = require('node:net');
const path = require('node:path');

const { takeListeners } = require(path.join(__dirname, 'shmcluster.node'));

/** How long a draining server leaves idle keep-alive connections open (ms). */
const DRAIN_IDLE_TIMEOUT = 5000;

/** An error of this module: `code` as in index.js's ShmclusterError. */
function failure(code, message) {
  // Loaded from index.js at its end: its exports are complete by now.
  const { ShmclusterError } = require('./index.js');
  return new ShmclusterError(code, message);
}

let taken = null;

/**
 * The listening sockets the master handed this process: `[{ fd, name }]`
 * in `LISTEN_FDS` order, `[]` if there are none. Taken once (later calls
 * return the same list): from `Worker.fromEnv()` if it ran, else from the
 * variables themselves (then removed from the environment, as
 * `sd_listen_fds(1)` does, so that a later `fromEnv` does not take them a
 * second time). The descriptors belong to the caller: whatever listens on
 * one closes it.
 */
function listenFds() {
  if (taken) return taken;
  const fromWorker = takeListeners();
  taken = fromWorker !== null && fromWorker !== undefined ? fromWorker : fromEnvironment();
  return taken;
}

// sd_listen_fds(3): only if LISTEN_PID is this process.
function fromEnvironment() {
  const env = process.env;
  const pid = env.LISTEN_PID;
  const count = env.LISTEN_FDS;
  const names = env.LISTEN_FDNAMES;
  delete env.LISTEN_PID;
  delete env.LISTEN_FDS;
  delete env.LISTEN_FDNAMES;
  if (pid === undefined || Number(pid) !== process.pid) return [];
  const n = Number(count);
  if (!Number.isInteger(n) || n < 0 || n > 1 << 20) {
    throw failure('ENVIRONMENT', `LISTEN_FDS=${JSON.stringify(count)} is not a count`);
  }
  const list = names === undefined ? [] : names.split(':');
  const out = [];
  for (let i = 0; i < n; i++) out.push({ fd: 3 + i, name: list[i] || 'unknown' });
  return out;
}

/**
 * `{ fd }` of one inherited listener, for `server.listen(listener(), cb)`:
 * `which` is its position (default 0, the first `--listen`) or its name.
 * Throws `ENVIRONMENT` if there is no such listener (the process was not
 * started with `--listen`).
 */
function listener(which) {
  const all = listenFds();
  let found;
  if (which === undefined || typeof which === 'number') {
    const i = which === undefined ? 0 : which;
    if (!Number.isInteger(i) || i < 0) throw failure('INVALID_ARGUMENT', `${String(which)} is not a listener index`);
    found = all[i];
  } else if (typeof which === 'string') {
    found = all.find((l) => l.name === which);
  } else {
    throw failure('INVALID_ARGUMENT', 'a listener is chosen by its index or its name');
  }
  if (!found) {
    const have = all.length === 0 ? 'none' : all.map((l, i) => `${i}:${l.name}`).join(', ');
    throw failure(
      'ENVIRONMENT',
      `no listener ${JSON.stringify(which === undefined ? 0 : which)} (inherited: ${have}); ` +
        'start the worker with `shmcluster run --listen ADDR -- node ...`',
    );
  }
  return { fd: found.fd };
}

/**
 * Prepares `server` (an `http.Server`, or any `net.Server`) for a drain and
 * returns `drain()`, which starts it and resolves once the last connection
 * has ended. `opts.idleTimeout` (ms, default 5000): how long idle
 * keep-alive connections are left open. Call it before the server listens,
 * so that it sees every request.
 *
 * Idle connections are not closed at once: a client may have sent its next
 * request on one already (wrk does, at once), and closing it under that
 * request would fail it. Every answer from the drain on says
 * `Connection: close` instead, so each connection in use ends after its
 * next answer; only those still idle at the deadline are closed.
 */
function drainer(server, opts) {
  const idleTimeout = opts && opts.idleTimeout !== undefined ? opts.idleTimeout : DRAIN_IDLE_TIMEOUT;
  if (typeof idleTimeout !== 'number' || !(idleTimeout >= 0)) {
    throw failure('INVALID_ARGUMENT', 'idleTimeout must be a number of milliseconds >= 0');
  }
  let draining = null;
  const open = new Set(); // answers not yet sent in full
  const closeAfter = (res) => {
    if (!res.headersSent) res.setHeader('Connection', 'close');
  };
  server.prependListener('request', (req, res) => {
    if (draining) {
      closeAfter(res);
      return;
    }
    open.add(res);
    const done = () => open.delete(res);
    res.once('finish', done);
    res.once('close', done);
  });
  return function drain() {
    if (draining) return draining;
    draining = new Promise((resolve) => {
      for (const res of open) closeAfter(res);
      open.clear();
      let sweep = null;
      const idle = setTimeout(() => {
        // Idle now, and from now on whenever a connection is idle (an
        // answer begun before the drain kept its connection alive).
        const closeIdle = () => {
          if (typeof server.closeIdleConnections === 'function') server.closeIdleConnections();
        };
        closeIdle();
        sweep = setInterval(closeIdle, 100);
      }, idleTimeout);
      const finish = () => {
        clearTimeout(idle);
        if (sweep) clearInterval(sweep);
        resolve();
      };
      if (!server.listening) {
        // Told to stop before it listened: nothing to wait for, and it
        // must not start accepting afterwards.
        server.once('listening', () => net.Server.prototype.close.call(server));
        finish();
        return;
      }
      // net.Server's close, not http.Server's: since Node 19 the latter
      // also closes every idle connection at once (see above). The
      // callback runs once every connection has ended.
      net.Server.prototype.close.call(server, () => finish());
    });
    return draining;
  };
}

/**
 * Drains `server` when `worker` is told to stop (its `stop` event: a
 * reload replacing it, or a shutdown), then closes the worker and, unless
 * `opts.exit === false`, exits the process with code 0. Makes the
 * worker's messenger if it has none: the stop is seen on its turns (within
 * 50 ms). `opts.idleTimeout`: see `drainer`. Returns `drain`, to start the
 * same drain by hand.
 */
function drainOnStop(worker, server, opts) {
  const drain = drainer(server, opts);
  const exit = !(opts && opts.exit === false);
  worker.messenger();
  worker.once('stop', () => {
    drain().then(() => {
      worker.close();
      if (exit) process.exit(0);
    });
  });
  return drain;
}

module.exports = { listenFds, listener, drainer, drainOnStop, DRAIN_IDLE_TIMEOUT };
