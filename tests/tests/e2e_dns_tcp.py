"""Sends DNS queries over TCP from plain sockets (TCP_NODELAY, one send per
piece, a pause between pieces so each leaves as its own segment), split
as an evasion tool would, and reports which were answered.

argv: RESOLVER4 RESOLVER6 CASES, CASES a JSON list of {"names": [...],
"v6", "split": "whole" | "prefix" | "name" | "bytes", "id"}: one
connection per case carrying its names' queries in order (DNS ids id,
id + 1, ...), each query cut: "prefix" after its 2-byte length prefix,
"name" 4 bytes into its name, "bytes" into 1-byte segments. Prints a JSON
list of the ids answered within 1.5 s of the last send.
"""

import json
import select
import socket
import struct
import sys
import threading
import time

RESOLVER4, RESOLVER6 = sys.argv[1:3]
CASES = json.loads(sys.argv[3])


def query(name, qid):
    q = struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0)
    for label in name.split("."):
        q += bytes([len(label)]) + label.encode()
    return q + b"\0" + struct.pack("!HH", 1, 1)


def pieces(stream, split):
    if split == "whole":
        return [stream]
    if split == "prefix":
        return [stream[:2], stream[2:]]
    if split == "name":
        # Prefix 2, header 12, then 4 bytes of the name.
        return [stream[:18], stream[18:]]
    return [stream[i : i + 1] for i in range(len(stream))]


def run(case, answered):
    family = socket.AF_INET6 if case["v6"] else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    # Closed with a RST: nothing is retransmitted after the case.
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.settimeout(5)
    s.connect((RESOLVER6 if case["v6"] else RESOLVER4, 53))
    for i, name in enumerate(case["names"]):
        msg = query(name, case["id"] + i)
        for p in pieces(struct.pack("!H", len(msg)) + msg, case["split"]):
            s.send(p)
            time.sleep(0.003 if case["split"] == "bytes" else 0.05)
    buf = b""
    deadline = time.time() + 1.5
    while time.time() < deadline:
        r, _, _ = select.select([s], [], [], max(0, deadline - time.time()))
        if not r:
            break
        data = s.recv(65536)
        if not data:
            break
        buf += data
        while len(buf) >= 2 and len(buf) >= 2 + struct.unpack("!H", buf[:2])[0]:
            n = struct.unpack("!H", buf[:2])[0]
            msg, buf = buf[2 : 2 + n], buf[2 + n :]
            answered.append(struct.unpack("!H", msg[:2])[0])
    s.close()


# dnsmasq serves at most 20 TCP connections at a time (its MAX_PROCS): a
# connection beyond them waits to be accepted, past the 1.5 s.
slots = threading.Semaphore(8)


def limited(case, answered):
    with slots:
        run(case, answered)


answered = []
threads = [threading.Thread(target=limited, args=(c, answered)) for c in CASES]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(json.dumps(sorted(answered)))
