#!/usr/bin/env bash
# Every test of the project, in the order a failure is cheapest to find.
# This is the README's test command, and what `.ci/run` runs.
#
# Needs (README, "Set-up"): the nightly toolchain with Miri, and cargo-fuzz.
# Each step has a time limit, so a hang fails instead of eating CI's budget
# (the multi-process tests also carry their own watchdogs).
set -euo pipefail
cd "$(dirname "$0")"

step() { printf '\n== %s\n' "$*"; }

step "unit, integration, doc and multi-process tests"
# Without the axum example's package, whose `shmcluster` features (tokio,
# http) would otherwise be on for every crate here: this step tests the
# crate without features. tests/axum_cluster.rs builds the example itself
# (`cargo build -p axum_cluster`) and drives it over HTTP, with wrk among
# its clients (reloads under load, SIGKILL, shutdown). tests/node_http.rs
# (examples/node/http.js under wrk through reloads), tests/node_mixed.rs
# (Node.js, Python and Rust workers in one cluster) and
# tests/node_examples.rs (examples/node/) build the Node.js addon themselves
# (node/scripts/build.js, as `npm install`) and libshmcluster.so: node,
# python3 and wrk on the PATH, nothing built before.
timeout 1200 cargo test --workspace --exclude axum_cluster

step "the tokio and http features: the async messenger, async synchronize, the HTTP drain"
# The lib's eventfd-park and drain unit tests, the async messenger in
# threads mode, async sections, and the doc examples of both features.
timeout 1200 cargo test --features tokio,http --lib --test async_messenger --test locks_async
timeout 600 cargo test --features tokio,http --doc

step "the nats feature: hosts joined through a real NATS cluster"
# Each test starts its own nats-server cluster on loopback
# (tests/common/nats.rs; the Debian package nats-server on the PATH).
# tests/hosts.rs: several masters as hosts with their bridges, and the
# faults (a NATS server, a bridge, a whole host SIGKILLed; garbage);
# tests/hosts_partition.rs: a host cut off by a veth pair taken down
# (network namespaces: needs root and iproute2);
# tests/hosts_python.rs: a host of Python workers beside a host of Rust ones;
# tests/bridge_master.rs: the master's side of the bridge (and the CLI);
# tests/hosts_example.rs: examples/hosts.rs runs and shows every step.
timeout 300 cargo test --features nats --lib bridge::
timeout 900 cargo test --features nats,cli --test nats_harness --test hosts --test hosts_partition --test hosts_python --test bridge_master --test hosts_example

step "python: the wheel (pip install ffi/python) in a fresh venv, its tests against the installed package"
# pip builds the wheel with setuptools-rust (ffi/python/setup.py): a release
# build of libshmcluster.so and of the shmcluster command into target/
# (reused by later runs), bundled with the package. The tests then run
# from outside the source tree, without SHMCLUSTER_LIB or PYTHONPATH, so
# `import shmcluster` is the installed one and loads the bundled library;
# test_cluster.py checks that (SHMCLUSTER_EXPECT_INSTALLED=1) and runs
# `shmcluster run` from the venv: a file missing from the wheel fails here.
venv="$PWD/target/python-venv"
rm -rf "$venv"
python3 -m venv "$venv"
timeout 900 "$venv/bin/pip" install --quiet --disable-pip-version-check ./ffi/python pytest
(
  elsewhere="$(mktemp -d)"
  trap 'rm -rf "$elsewhere"' EXIT
  cd "$elsewhere"
  env -u SHMCLUSTER_LIB -u PYTHONPATH SHMCLUSTER_EXPECT_INSTALLED=1 PYTHONDONTWRITEBYTECODE=1 \
    timeout 300 "$venv/bin/python" -m pytest -q -p no:cacheprovider --rootdir "$elsewhere" "$OLDPWD/ffi/python/tests"
)

step "node: the npm package (napi-rs addon) in one process and in a real cluster"
# Node.js >= 20 and npm (.ci/run checks them). `npm install` builds the
# addon from source (cargo build --release -p shmcluster-node) and copies
# it to node/shmcluster.node; `npm test` builds the command (cargo build
# -p shmcluster) and runs node's own test runner: test/standalone.test.js,
# test/listen.test.js (listeners, the drain), then test/cluster.test.js
# (`shmcluster run -w 3 -- node test/worker.js`).
(cd node && npm install && timeout 600 npm test)

step "loom: the park/wake and space-wait handshakes lose no wakeup"
LOOM_MAX_PREEMPTIONS=3 RUSTFLAGS="--cfg loom" \
  timeout 900 cargo test --release --lib --target-dir target/loom wake::

step "miri: the lane logic over heap memory"
MIRIFLAGS="-Zmiri-disable-isolation" timeout 1200 cargo +nightly miri test --lib lane::

step "fuzz: each target for ${FUZZ_SECONDS:=30} s (no input may crash)"
(
  cd fuzz
  timeout 900 cargo +nightly fuzz build
  for target in lane attach; do
    extra=()
    [ "$target" = attach ] && extra=(-dict=attach.dict)
    timeout $((FUZZ_SECONDS + 120)) cargo +nightly fuzz run "$target" -- \
      -max_total_time="$FUZZ_SECONDS" -timeout=10 "${extra[@]}"
  done
)

step "benchmarks and examples build"
timeout 900 cargo build --release --features tokio,http,nats --benches --examples
timeout 900 cargo build --release -p axum_cluster

echo
echo "all tests passed"
