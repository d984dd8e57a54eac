"""The binding under a real ``shmcluster run`` cluster (tests/cluster_worker.py
is the workers' program): leader calls, subscriptions, leader changes and
the master's events; and what an installed package must carry."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Optional

import pytest

import shmcluster as sc

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, "..", "..", ".."))
# Set by test-all.sh when it runs these tests against the wheel installed
# in a fresh virtual environment.
INSTALLED = os.environ.get("SHMCLUSTER_EXPECT_INSTALLED") == "1"


def command() -> Optional[str]:
    """The ``shmcluster`` command: the one ``pip install`` put beside this
    Python, else the PATH's, else (a source checkout) cargo's."""
    beside = os.path.join(os.path.dirname(sys.executable), "shmcluster")
    if os.path.exists(beside) or INSTALLED:
        return beside
    found = shutil.which("shmcluster")
    if found:
        return found
    for profile in ("debug", "release"):
        path = os.path.join(os.environ.get("CARGO_TARGET_DIR") or os.path.join(REPO, "target"), profile, "shmcluster")
        if os.path.exists(path):
            return path
    return None


def test_the_installed_package_carries_its_library_command_and_types():
    """Run against the installed wheel (test-all.sh): the package is not
    the source tree's, and it loads the library bundled in it."""
    if not INSTALLED:
        pytest.skip("not run against an installed wheel (SHMCLUSTER_EXPECT_INSTALLED=1)")
    assert "SHMCLUSTER_LIB" not in os.environ
    package = os.path.dirname(os.path.abspath(sc.__file__))
    assert not package.startswith(os.path.join(REPO, "ffi", "python")), package
    assert sc.load_library()._name == sc.BUNDLED_LIBRARY
    assert os.path.dirname(sc.BUNDLED_LIBRARY) == package
    for name in ("py.typed", "_codes.py", "libshmcluster.so"):
        assert os.path.exists(os.path.join(package, name)), name
    out = subprocess.run([command(), "--version"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and "shmcluster" in out.stdout, out


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    full = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(sc.__file__))), **env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=full)


def test_a_missing_library_is_a_typed_error_that_says_what_to_do():
    out = _python(
        "import shmcluster as sc\n"
        "try:\n"
        "    sc.Segment(1)\n"
        "except sc.LibraryNotFound as e:\n"
        "    print('LibraryNotFound', e.code, e)\n",
        SHMCLUSTER_LIB="/nonexistent/libshmcluster.so",
    )
    assert out.returncode == 0, out
    assert out.stdout.startswith("LibraryNotFound None SHMCLUSTER_LIB is '/nonexistent/libshmcluster.so'"), out
    assert "unset it" in out.stdout


def test_a_copy_of_the_package_without_its_library_says_what_to_do():
    """The package copied somewhere without libshmcluster.so (and no
    SHMCLUSTER_LIB): LibraryNotFound naming where it looked and what to do,
    and no noise from half-made objects."""
    with tempfile.TemporaryDirectory() as tmp:
        package = os.path.dirname(os.path.abspath(sc.__file__))
        shutil.copytree(package, os.path.join(tmp, "shmcluster"),
                        ignore=shutil.ignore_patterns("libshmcluster.so", "__pycache__"))
        env = {k: v for k, v in os.environ.items() if k not in ("SHMCLUSTER_LIB", "CARGO_TARGET_DIR")}
        env["PYTHONPATH"] = tmp
        out = subprocess.run(
            [sys.executable, "-c",
             "import shmcluster as sc\n"
             "try:\n"
             "    sc.Segment(1)\n"
             "except sc.LibraryNotFound as e:\n"
             "    print(e)\n"],
            capture_output=True, text=True, timeout=60, env=env, cwd=tmp,
        )
    assert out.returncode == 0, out
    assert out.stdout.startswith("libshmcluster.so not found (looked at "), out
    assert "pip install --force-reinstall" in out.stdout and "SHMCLUSTER_LIB" in out.stdout, out
    assert out.stderr == "", out


def test_a_library_that_is_not_ours_is_a_mismatch():
    """Any other shared library (here the C library) is refused with
    LibraryMismatch, before any call into it."""
    with pytest.raises(sc.LibraryMismatch) as e:
        sc.load_library("libc.so.6")
    assert e.value.code == sc.ABI_VERSION_MISMATCH
    assert "reinstall" in str(e.value)
    assert isinstance(e.value, sc.LibraryError) and isinstance(e.value, sc.ShmclusterError)


def test_a_library_without_the_event_loop_calls_is_a_mismatch():
    """A library of the same ABI version but older than this binding (no
    shmc_wake_fd, shmc_worker_locks, ...: what every Worker and AsyncWorker
    uses) is LibraryMismatch saying what to do, not an AttributeError."""
    import ctypes

    from shmcluster import _evloop

    with pytest.raises(sc.LibraryMismatch) as e:
        _evloop._prototype(ctypes.CDLL("libc.so.6"))
    assert e.value.code == sc.ABI_VERSION_MISMATCH
    assert "shmc_wake_fd" in str(e.value) and "reinstall" in str(e.value)


def test_a_non_library_file_is_not_found_with_the_loader_error():
    with tempfile.NamedTemporaryFile(suffix=".so") as f:
        f.write(b"not an ELF file")
        f.flush()
        with pytest.raises(sc.LibraryNotFound) as e:
            sc.load_library(f.name)
    assert "cannot load" in str(e.value)


def test_leader_calls_subscriptions_leader_changes_and_events_in_a_real_cluster():
    """Two Python workers under ``shmcluster run -w 2``: the follower
    invokes the leader (an answer, and a failure with its text), publishes
    (both subscribers get it), then the leader exits with code 7: the
    follower is told it leads now (on_leader_change), reads the master's
    EXIT event for the old leader's slot (events), and invokes itself."""
    bin_ = command()
    if bin_ is None:
        pytest.skip("no shmcluster command (cargo build -p shmcluster, or pip install ffi/python)")
    outdir = tempfile.mkdtemp(prefix="shmcluster-pytest-")
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(sc.__file__))),
               PYTHONDONTWRITEBYTECODE="1")
    master = subprocess.Popen(
        [bin_, "run", "-w", "2", "--", sys.executable, os.path.join(HERE, "cluster_worker.py"), outdir],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True,
    )
    try:
        log, _ = master.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(master.pid, signal.SIGKILL)
        log, _ = master.communicate()
        pytest.fail(f"the cluster did not finish within 90 s:\n{log}")
    finally:
        if master.poll() is None:
            os.killpg(master.pid, signal.SIGKILL)
            master.wait()
    path = os.path.join(outdir, "result.json")
    assert os.path.exists(path), f"no result; master exited {master.returncode}:\n{log}"
    with open(path) as f:
        r = json.load(f)
    shutil.rmtree(outdir, ignore_errors=True)
    assert master.returncode == 0, log

    me, old = r["slot"], r["leader"]
    assert me != old
    # invoke ran the old leader's handler (its slot in the answer's thousands)
    assert r["add"] == str(5 + 1000 * old)
    assert "leader says no" in r["boom"]
    assert r["news"] == ["hello"]
    # leader changes: first the old leader, then this worker
    assert r["changes"][0] == {"slot": old, "term": r["changes"][0]["term"], "is_me": False}
    last = r["changes"][-1]
    assert last["slot"] == me and last["is_me"] and last["term"] > r["changes"][0]["term"]
    # the master's event for the old leader's exit
    exit_ = r["exits"][0]
    assert (exit_["kind"], exit_["reason"], exit_["value"], exit_["slot"]) == ("EXIT", "EXITED", 7, old), exit_
    assert exit_["pid"] > 0 and "exited with code 7" in exit_["text"], exit_
    assert r["missed"] == 0
    assert r["invoke_after"] == str(2 + 1000 * me)


def test_events_without_a_master_are_none_and_readers_are_context_managers():
    with sc.Segment(1) as seg:
        with seg.worker(0) as w:
            with w.events() as events:
                assert events.next(timeout=0) is None
                assert events.next(timeout=0.05) is None
                assert events.missed == 0
            assert w.identity().has_master is False
            assert w.leader() is None and not w.is_leader()


def test_event_kind_names_match_the_c_enum_and_upgrade_events_read_back():
    """Every SHMC_EVENT_KIND_ number the library names (the binary upgrade's
    appended as 10 and 11), and an upgrade event as Events hands it out:
    the new master's pid in ``value``, negated for a failed upgrade."""
    lib = sc.load_library()
    names = [sc._name(lib.shmc_event_kind_name, k) for k in range(13)]
    assert names == [
        "UNKNOWN", "SPAWNED", "ONLINE", "EXIT", "CRASH_LOOP", "RELOAD_STARTED", "RELOAD_FINISHED",
        "SHUTDOWN_STARTED", "LOCK_HELD_TOO_LONG", "START_FAILED", "UPGRADE_STARTED", "UPGRADE_FINISHED",
        "12",  # no kind: _name falls back to the number
    ]
    none = 2**32 - 1
    cases = [
        (10, 4321, "UPGRADE_STARTED", "upgrade started: new master pid 4321"),
        (11, 4321, "UPGRADE_FINISHED", "upgrade finished: ok, new master pid 4321 took over; draining"),
        (11, -4321, "UPGRADE_FINISHED", "upgrade failed: new master pid 4321 did not take over"),
    ]
    for kind, value, name, text in cases:
        e = sc.Event._of(sc._Event(seq=3, kind=kind, reason=0, value=value, slot=none, index=none))
        assert (e.kind, e.reason, e.value, e.slot, e.index, e.pid) == (name, None, value, None, None, 0), e
        assert str(e) == text


def _wait(cond, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (an orphaned new master is reaped by init, not us) is gone.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_a_worker_reads_the_binary_upgrade_events_in_a_real_cluster():
    """``shmcluster run -w 1`` with a Python worker reading ``w.events()``;
    SIGUSR2 upgrades the master: the old worker reads UPGRADE_STARTED and
    UPGRADE_FINISHED, both carrying the new master's pid (positive: it took
    over) in ``value``, before it is drained; the old master exits 0."""
    bin_ = command()
    if bin_ is None:
        pytest.skip("no shmcluster command (cargo build -p shmcluster, or pip install ffi/python)")
    outdir = tempfile.mkdtemp(prefix="shmcluster-pytest-")
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(sc.__file__))),
               PYTHONDONTWRITEBYTECODE="1", XDG_RUNTIME_DIR=outdir)
    out = open(os.path.join(outdir, "master.log"), "w")
    master = subprocess.Popen(
        [bin_, "run", "-w", "1", "--", sys.executable, os.path.join(HERE, "upgrade_worker.py"), outdir],
        stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )

    def log() -> str:
        with open(os.path.join(outdir, "master.log")) as f:
            return f.read()

    def files(prefix: str) -> list:
        return sorted(n for n in os.listdir(outdir) if n.startswith(prefix))

    new_pid = 0
    try:
        _wait(lambda: len(files("ready-")) == 1, "the first worker")
        old_worker = int(files("ready-")[0].split("-")[1])
        os.kill(master.pid, signal.SIGUSR2)
        try:
            code = master.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the old master did not hand over within 60 s:\n{log()}")
        assert code == 0, log()
        _wait(lambda: not _alive(old_worker), "the old worker's drain")
        with open(os.path.join(outdir, f"events-{old_worker}.jsonl")) as f:
            seen = [json.loads(line) for line in f]
        upgrade = [e for e in seen if e["kind"].startswith("UPGRADE_")]
        assert [e["kind"] for e in upgrade] == ["UPGRADE_STARTED", "UPGRADE_FINISHED"], seen
        new_pid = upgrade[0]["value"]
        assert new_pid > 0 and new_pid != master.pid and _alive(new_pid), (upgrade, log())
        assert upgrade[1]["value"] == new_pid, upgrade
        assert upgrade[0]["text"] == f"upgrade started: new master pid {new_pid}"
        assert upgrade[1]["text"] == f"upgrade finished: ok, new master pid {new_pid} took over; draining"
        assert "UNKNOWN" not in [e["kind"] for e in seen], seen
        # The new master serves with its own worker; then shut it down.
        _wait(lambda: len(files("ready-")) == 2, "the new master's worker")
        os.kill(new_pid, signal.SIGTERM)
        _wait(lambda: not _alive(new_pid), "the new master's shutdown")
    finally:
        for pid in (new_pid, master.pid):
            if pid > 0 and _alive(pid):
                os.kill(pid, signal.SIGKILL)
        try:
            os.killpg(master.pid, signal.SIGKILL)  # anything left of the session
        except ProcessLookupError:
            pass
        master.wait()
        out.close()
    shutil.rmtree(outdir, ignore_errors=True)
