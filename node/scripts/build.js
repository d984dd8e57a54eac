'use strict';
// Builds the addon from source with cargo and copies it to
// shmcluster.node, where index.js loads it. `--debug` for a debug build
// (the tests' default: faster to build); a release build otherwise.
// SHMCLUSTER_NODE_PROFILE=debug|release overrides.
const { execFileSync } = require('node:child_process');
const fs = require('node:fs');
const path = require('node:path');

const here = path.resolve(__dirname, '..');
const root = path.resolve(here, '..');
const profile = process.env.SHMCLUSTER_NODE_PROFILE || (process.argv.includes('--debug') ? 'debug' : 'release');
const args = ['build', '-p', 'shmcluster-node'];
if (profile === 'release') args.push('--release');
execFileSync('cargo', args, { cwd: root, stdio: 'inherit' });
const target = process.env.CARGO_TARGET_DIR || path.join(root, 'target');
const lib = path.join(target, profile, 'libshmcluster_node.so');
// Through a temporary name: a running process that has the old file
// mapped keeps it.
const tmp = path.join(here, 'shmcluster.node.tmp');
fs.copyFileSync(lib, tmp);
fs.renameSync(tmp, path.join(here, 'shmcluster.node'));
console.log(`shmcluster.node <- ${lib}`);
