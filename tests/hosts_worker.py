"""A Python worker of host `b` in tests/hosts_python.rs: spawned by
`shmcluster run --nats ... -- python3 tests/hosts_worker.py`, it talks with
the Rust workers of host `a` through the C ABI (the `shmcluster` binding,
PYTHONPATH=ffi/python, SHMCLUSTER_LIB=libshmcluster.so) and both hosts'
NATS bridges.

It serves:
    ping     raw bytes b"python <slot>"
    where    postcard of the String "b" (what tests/common/hosts.rs'
             wait_for_workers maps)
    pyask    payload: the driver's slot and an `a` slot (one byte each).
             After the handler returned (a handler cannot wait on its own
             worker), the polling loop requests `ping` of that `a` slot
             with request_at, emits what it got to the driver with emit_at
             ("pyreport"), then broadcasts a `log` event every Rust worker
             of every host handles.

The Rust `ping` handler is typed: postcard `()` in (zero bytes) and
`(String, u32)` out; `log` takes postcard `(String, u64)`. Postcard is
written and read by hand here (varint lengths and integers).
"""

import sys

import shmcluster as sc


def varint(n):
    """Postcard's unsigned varint (LEB128)."""
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def read_varint(data, at):
    """A varint at `at`: (value, the offset after it)."""
    value, shift = 0, 0
    while True:
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, at
        shift += 7


def decode_ping(data):
    """Postcard of (String, u32): a varint length, the UTF-8 bytes, a varint."""
    n, at = read_varint(data, 0)
    host = data[at : at + n].decode("utf-8")
    slot, at = read_varint(data, at + n)
    if at != len(data):
        raise ValueError(f"{len(data) - at} bytes after the answer")
    return host, slot


def main():
    w = sc.Worker.from_env()
    asks = []

    @w.on("ping")
    def ping(msg):
        return b"python %d" % w.slot

    @w.on("where")
    def where(msg):
        # postcard of the String "b": its length (1), then its bytes.
        return varint(1) + b"b"

    @w.on("pyask")
    def pyask(msg):
        asks.append((msg.data[0], msg.data[1]))

    w.ready()
    while not w.should_stop():
        w.poll(0.05)
        while asks:
            driver, a_slot = asks.pop(0)
            try:
                # postcard of () is zero bytes.
                host, slot = decode_ping(w.request_at("a", a_slot, "ping", b"", timeout=5))
                report = f"pong {w.slot} {host} {slot}"
            except Exception as e:  # the driver shows what went wrong
                report = f"error {w.slot} {type(e).__name__}: {e}"
            w.emit_at("a", driver, "pyreport", report.encode())
            # postcard of ("py", slot as u64): the string's length 2, b"py",
            # then the slot as a varint.
            w.broadcast("log", varint(2) + b"py" + varint(w.slot))
    w.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
