#!/bin/sh
# The one command `shmcluster run` starts for every worker (tests/interop.rs):
# picks the program by instance number and execs it, so the worker keeps
# this process's pid (LISTEN_PID names it) and inherited descriptors.
case "$SHMCLUSTER_INDEX" in
    0) INTEROP_ROLE=rust-worker exec "$INTEROP_RUST_EXE" ;;
    1) exec "$INTEROP_C_EXE" ;;
    2) exec python3 "$INTEROP_PY" main ;;
    3) exec python3 "$INTEROP_PY" victim ;;
    *) echo "dispatch.sh: no program for instance $SHMCLUSTER_INDEX" >&2; exit 3 ;;
esac
