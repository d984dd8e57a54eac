"""The Python worker of tests/node_mixed.rs (instance 1, through
tests/node_mixed/dispatch.sh): the ctypes binding over libshmcluster
(PYTHONPATH=ffi/python, SHMCLUSTER_LIB). Payloads are JSON text, as the
Node.js worker sends and expects by default.

It serves (requests answer JSON, events answer nothing):
    who          {"lang": "python", "slot": <slot>}
    square       x -> {"lang": "python", "v": x * x}
    boom         raises ValueError("python <slot> says no")
    doBroadcast  answers null, then (after the handler) broadcasts `bc`
                 {"lang": "python"} to every worker
    bc           counts the broadcasts it got per sender slot
    bcCounts     {"counts": {sender: n}, "langs": {sender: lang}}
    callNode     event {"slot", "x"}: after the handler, requests `square`
                 of that slot and emits `report` {"lang", "answer"} to it
    hold         event {"name", "ms"}: takes lock `name`, emits `held`
                 {"token", "t"} to the sender, keeps it `ms` (serving),
                 then emits `released` {"token", "t"} with the time just
                 before the unlock (ms since the epoch)
    dieHolding   event {"name"}: takes lock `name`, emits `holding`
                 {"token"}, and serves until `die` comes: SIGKILLs itself
                 inside the section
A handler must not call into its own worker (it is dispatching): the work
is queued and done by the polling loop after the handler returned.
"""

import json
import os
import signal
import sys
import time

import shmcluster as sc


def now_ms():
    return int(time.time() * 1000)


def main():
    w = sc.Worker.from_env()
    counts, langs = {}, {}
    todo = []
    die = []

    def answer(value):
        return json.dumps(value).encode()

    @w.on("who")
    def who(msg):
        return answer({"lang": "python", "slot": w.slot})

    @w.on("square")
    def square(msg):
        x = msg.json()
        return answer({"lang": "python", "v": x * x})

    @w.on("boom")
    def boom(msg):
        raise ValueError(f"python {w.slot} says no")

    @w.on("doBroadcast")
    def do_broadcast(msg):
        todo.append(("broadcast", None, None))
        return answer(None)

    @w.on("bc")
    def bc(msg):
        s = str(msg.sender_slot)
        counts[s] = counts.get(s, 0) + 1
        langs[s] = msg.json()["lang"]

    @w.on("bcCounts")
    def bc_counts(msg):
        return answer({"counts": counts, "langs": langs})

    @w.on("callNode")
    def call_node(msg):
        todo.append(("call", msg.sender_slot, msg.json()))

    @w.on("hold")
    def hold(msg):
        todo.append(("hold", msg.sender_slot, msg.json()))

    @w.on("dieHolding")
    def die_holding(msg):
        todo.append(("dieHolding", msg.sender_slot, msg.json()))

    @w.on("die")
    def on_die(msg):
        die.append(True)

    def serve(seconds):
        until = time.monotonic() + seconds
        while time.monotonic() < until and not w.should_stop():
            w.poll(0.01)

    w.ready()
    while not w.should_stop():
        w.poll(0.05)
        while todo:
            what, sender, data = todo.pop(0)
            if what == "broadcast":
                w.broadcast("bc", answer({"lang": "python"}))
            elif what == "call":
                got = json.loads(w.request(data["slot"], "square", answer(data["x"]), timeout=5))
                w.emit(data["slot"], "report", answer({"lang": "python", "answer": got}))
            elif what == "hold":
                lock = w.lock(data["name"], timeout=5)
                w.emit(sender, "held", answer({"token": lock.fencing_token, "t": now_ms()}))
                serve(data["ms"] / 1000)
                t = now_ms()
                lock.unlock()
                w.emit(sender, "released", answer({"token": lock.fencing_token, "t": t}))
            elif what == "dieHolding":
                lock = w.lock(data["name"], timeout=5)
                w.emit(sender, "holding", answer({"token": lock.fencing_token}))
                until = time.monotonic() + 10
                while not die and time.monotonic() < until and not w.should_stop():
                    w.poll(0.01)
                if die:
                    os.kill(os.getpid(), signal.SIGKILL)
                lock.unlock()
    w.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
