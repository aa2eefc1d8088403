"""Sends DNS queries over UDP from raw sockets, whole or as two IP fragments
(IPv4, or IPv6 with a Fragment header) in order or later fragment first,
and reports which were answered.

argv: CLIENT4 RESOLVER4 CLIENT6 RESOLVER6 CASES, CASES a JSON list of
{"name", "v6", "frag": "whole" | "in_order" | "reversed", "sport"}. Prints a
JSON list of the source ports whose query got its answer within 1.5 s.
"""

import json
import select
import socket
import struct
import sys
import time

CLIENT4, RESOLVER4, CLIENT6, RESOLVER6 = sys.argv[1:5]
CASES = json.loads(sys.argv[5])
AF6 = socket.AF_INET6
# The first fragment ends 4 bytes into the name (UDP 8 + DNS header 12).
CUT = 24


def checksum(b):
    if len(b) % 2:
        b += b"\0"
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def query(name, qid):
    q = struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0)
    for label in name.split("."):
        q += bytes([len(label)]) + label.encode()
    return q + b"\0" + struct.pack("!HH", 1, 1)


def udp(src, dst, sport, payload, v6):
    length = 8 + len(payload)
    if v6:
        pseudo = socket.inet_pton(AF6, src) + socket.inet_pton(AF6, dst) + struct.pack("!I3xB", length, 17)
    else:
        pseudo = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!xBH", 17, length)
    header = struct.pack("!HHHH", sport, 53, length, 0)
    return struct.pack("!HHHH", sport, 53, length, checksum(pseudo + header + payload) or 0xFFFF) + payload


def ipv4(src, dst, ident, offset, more, data):
    flags = offset // 8 | (0x2000 if more else 0)
    h = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(data), ident, flags, 64, 17, 0, socket.inet_aton(src), socket.inet_aton(dst))
    return h[:10] + struct.pack("!H", checksum(h)) + h[12:] + data


def ipv6(src, dst, ident, offset, more, data, fragment):
    ext, nh = (struct.pack("!BBHI", 17, 0, offset | more, ident), 44) if fragment else (b"", 17)
    fixed = struct.pack("!IHBB16s16s", 0x60000000, len(ext) + len(data), nh, 64, socket.inet_pton(AF6, src), socket.inet_pton(AF6, dst))
    return fixed + ext + data


def packets(case):
    v6, sport = case["v6"], case["sport"]
    src, dst = (CLIENT6, RESOLVER6) if v6 else (CLIENT4, RESOLVER4)
    data = udp(src, dst, sport, query(case["name"], sport), v6)
    ip = (lambda o, m, d, f: ipv6(src, dst, sport, o, m, d, f)) if v6 else (lambda o, m, d, f: ipv4(src, dst, sport, o, m, d))
    if case["frag"] == "whole":
        return dst, [ip(0, 0, data, False)]
    pieces = [ip(0, 1, data[:CUT], True), ip(CUT, 0, data[CUT:], True)]
    return dst, pieces if case["frag"] == "in_order" else pieces[::-1]


raw4 = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
raw6 = socket.socket(AF6, socket.SOCK_RAW, socket.IPPROTO_RAW)
listeners = {}
for case in CASES:
    s = socket.socket(AF6 if case["v6"] else socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((CLIENT6 if case["v6"] else CLIENT4, case["sport"]))
    listeners[s] = case["sport"]
for case in CASES:
    dst, pkts = packets(case)
    for p in pkts:
        (raw6 if case["v6"] else raw4).sendto(p, (dst, 0))
answered = []
deadline = time.monotonic() + 1.5
while listeners and time.monotonic() < deadline:
    ready, _, _ = select.select(list(listeners), [], [], max(0, deadline - time.monotonic()))
    for s in ready:
        reply = s.recv(4096)
        if len(reply) >= 12 and struct.unpack("!H", reply[:2])[0] == listeners[s] and reply[2] & 0x80:
            answered.append(listeners.pop(s))
print(json.dumps(sorted(answered)))
