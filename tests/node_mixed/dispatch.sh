#!/bin/sh
# The worker command of tests/node_mixed.rs: `shmcluster run -w 3 -- sh
# tests/node_mixed/dispatch.sh`. Every worker starts as this script, which
# execs the language its instance number (SHMCLUSTER_INDEX, kept when a
# worker is respawned) names: 0 Node.js (the driver), 1 Python (the
# ctypes binding; SHMCLUSTER_LIB and PYTHONPATH come from the test), 2 Rust
# (the test binary itself, NODE_MIXED_RUST, as SHMC_ROLE=rust_worker).
# exec keeps the process the master spawned, with its descriptors.
here=$(dirname "$0")
case "$SHMCLUSTER_INDEX" in
0) exec node "$here/worker.js" ;;
1) exec python3 "$here/worker.py" ;;
2) exec env SHMC_ROLE=rust_worker "$NODE_MIXED_RUST" ;;
*) echo "dispatch.sh: no language for instance $SHMCLUSTER_INDEX" >&2; exit 2 ;;
esac
