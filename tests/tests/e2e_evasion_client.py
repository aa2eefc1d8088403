"""The attacker of e2e_evasion_stream: for each case, a real TCP connection
(the kernel's handshake, its sequence numbers read off the wire with a
packet socket), then the ClientHello or HTTP request sent from a raw socket
as a circumvention tool sends it:

- plain: one segment;
- seqovl (zapret): the first segment starts 5 junk bytes before ISN + 1;
- oob (ByeDPI --oob): part one with an urgent byte after it (URG, pointer
  after the byte), then part two;
- disoob: the urgent byte first, then the hello's first part, then part two;
- fakedsplit-FOOL (zapret): a fake of part one naming an unlisted host of
  the same length, fooled so the server discards it, the real part one, the
  fake again, the real part two. FOOL: noack (no ACK flag), md5 (a TCP MD5
  option the server has no key for), cut 4 bytes into the name (where the
  names agree); or, cut after the part where the names differ ("block",
  "allow"), badsum (a bad TCP checksum), ttl (TTL or hop limit 1: it dies at the
  edge, a router), badack (an ACK number 66,000 past what the server sent);
  badseq (4 bytes into the name, its sequence number 10,000 bytes behind:
  outside the server's window).

- fakesyn-mid: part one, then a SYN with another ISN (3,000 ahead) and TTL
  or hop limit 1 (it dies at the edge), then part two;
- fakesyn-early: the same SYN after the handshake, before the data, then the
  whole hello or request;
- hosts2 (HTTP): two Host headers, the other name first, then the case's;
- frag-in_order, frag-reversed: the segment as two IP fragments (IPv4, or
  IPv6 with a Fragment header) cut in the name, in order or the later one
  first.

argv: CLIENT4 SERVER4 CLIENT6 SERVER6 CASES, CASES a JSON list of
{"name", "fake", "v6", "tls", "how", "sport"}. Prints "done".
"""

import json
import socket
import ssl
import struct
import sys
import time

CLIENT4, SERVER4, CLIENT6, SERVER6 = sys.argv[1:5]
CASES = json.loads(sys.argv[5])
AF6 = socket.AF_INET6
ETH_P_ALL = 3


def checksum(b):
    if len(b) % 2:
        b += b"\0"
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def client_hello(name):
    """A real ClientHello from Python's ssl (OpenSSL) for `name`."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(inc, out, server_hostname=name)
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return out.read()


def http_request(name, first_host=None):
    """A request for `name`; with `first_host`, a Host header naming it comes
    first (two Host headers)."""
    hosts = ("Host: %s\r\n" % first_host if first_host else "") + "Host: %s\r\n" % name
    return ("GET / HTTP/1.1\r\n%sUser-Agent: e2e\r\nAccept: */*\r\n\r\n" % hosts).encode()


def tcp(src, dst, sport, dport, seq, ack, flags, payload, v6, options=b"", urg=0):
    options += b"\0" * (-len(options) % 4)
    off = (20 + len(options)) // 4
    h = struct.pack("!HHIIBBHHH", sport, dport, seq & 0xFFFFFFFF, ack, off << 4, flags, 64240, 0, urg) + options
    if v6:
        pseudo = socket.inet_pton(AF6, src) + socket.inet_pton(AF6, dst) + struct.pack("!I3xB", len(h) + len(payload), 6)
    else:
        pseudo = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!xBH", 6, len(h) + len(payload))
    s = checksum(pseudo + h + payload)
    return h[:16] + struct.pack("!H", s) + h[18:] + payload


def fragments(src, dst, segment, v6, ident, at):
    """`segment` as two IP datagrams (IPv4 fragments, or IPv6 with a Fragment
    header), the first carrying its first `at` bytes (a multiple of 8)."""
    out = []
    for off, part, more in ((0, segment[:at], 1), (at, segment[at:], 0)):
        if v6:
            frag = struct.pack("!BBHI", 6, 0, off | more, ident)
            body = frag + part
            out.append(struct.pack("!IHBB16s16s", 0x60000000, len(body), 44, 64, socket.inet_pton(AF6, src), socket.inet_pton(AF6, dst)) + body)
        else:
            flags = (more << 13) | (off // 8)
            h = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(part), ident, flags, 64, 6, 0, socket.inet_aton(src), socket.inet_aton(dst))
            out.append(h[:10] + struct.pack("!H", checksum(h)) + h[12:] + part)
    return out


def ip(src, dst, data, v6, ttl=64):
    if v6:
        return struct.pack("!IHBB16s16s", 0x60000000, len(data), 6, ttl, socket.inet_pton(AF6, src), socket.inet_pton(AF6, dst)) + data
    h = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(data), 0, 0x4000, ttl, 6, 0, socket.inet_aton(src), socket.inet_aton(dst))
    return h[:10] + struct.pack("!H", checksum(h)) + h[12:] + data


SYN, ACK, PSH, URG = 0x02, 0x10, 0x08, 0x20
MD5 = bytes([1, 1, 19, 18]) + bytes(16)


def handshake(sniff, v6, sport, dport, src, dst):
    """Connects a real socket; returns it, ISN + 1 and the server's ISN + 1."""
    s = socket.socket(AF6 if v6 else socket.AF_INET, socket.SOCK_STREAM)
    s.bind((src, sport))
    s.connect((dst, dport))
    deadline = time.time() + 5
    while time.time() < deadline:
        frame = sniff.recv(65535)
        if v6:
            if frame[12:14] != b"\x86\xdd" or frame[20] != 6:
                continue
            t = frame[54:]
        else:
            if frame[12:14] != b"\x08\x00" or frame[23] != 6:
                continue
            t = frame[14 + (frame[14] & 15) * 4 :]
        sp, dp, seq, ack = struct.unpack("!HHII", t[:12])
        if sp == dport and dp == sport and t[13] & 0x12 == 0x12:
            return s, ack, (seq + 1) & 0xFFFFFFFF
    raise SystemExit("no SYN-ACK for port %d" % sport)


def run(case, sniff, raw4, raw6):
    v6, tls, sport, how = case["v6"], case["tls"], case["sport"], case["how"]
    src, dst = (CLIENT6, SERVER6) if v6 else (CLIENT4, SERVER4)
    dport = 443 if tls else 80
    real = client_hello(case["name"]) if tls else http_request(case["name"], case["fake"] if how == "hosts2" else None)
    fake = real.replace(case["name"].encode(), case["fake"].encode())
    assert len(fake) == len(real) and fake != real
    cut = real.index(case["name"].encode()) + 4
    if how in ("fakedsplit-badsum", "fakedsplit-ttl", "fakedsplit-badack"):
        cut = real.index(case["name"].encode()) + case["name"].index("ed.example")
    sock, isn1, ack = handshake(sniff, v6, sport, dport, src, dst)
    raw = raw6 if v6 else raw4

    def send(rel, payload, flags=ACK | PSH, options=b"", urg=0, badsum=False, ttl=64, ack_delta=0, seq_delta=0):
        a = (ack + ack_delta) & 0xFFFFFFFF if flags & ACK else 0
        segment = tcp(src, dst, sport, dport, (isn1 + rel + seq_delta) & 0xFFFFFFFF, a, flags, payload, v6, options, urg)
        if badsum:
            segment = segment[:16] + bytes([segment[16] ^ 0x5A]) + segment[17:]
        raw.sendto(ip(src, dst, segment, v6, ttl), (dst, 0))
        time.sleep(0.05)

    if how in ("plain", "hosts2"):
        send(0, real)
    elif how.startswith("frag-"):
        # The segment as two IP fragments cut in the name, in order or the
        # later one first.
        segment = tcp(src, dst, sport, dport, isn1, ack, ACK | PSH, real, v6)
        frags = fragments(src, dst, segment, v6, sport, (20 + cut) // 8 * 8)
        for f in frags if how == "frag-in_order" else frags[::-1]:
            raw.sendto(f, (dst, 0))
            time.sleep(0.05)
    elif how == "fakesyn-mid":
        send(0, real[:cut])
        send(3000, b"", flags=SYN, ttl=1)
        send(cut, real[cut:])
    elif how == "fakesyn-early":
        send(3000, b"", flags=SYN, ttl=1)
        send(0, real)
    elif how == "seqovl":
        send(-5, b"Z" * 5 + real)
    elif how == "oob":
        first = real[:cut] + b"X"
        send(0, first, ACK | PSH | URG, urg=len(first))
        send(cut + 1, real[cut:])
    elif how == "disoob":
        send(0, b"X" + real[:cut], ACK | PSH | URG, urg=1)
        send(cut + 1, real[cut:])
    elif how.startswith("fakedsplit-"):
        fool = how.split("-", 1)[1]
        fooled = {
            "noack": dict(flags=PSH),
            "md5": dict(options=MD5),
            "badsum": dict(badsum=True),
            "ttl": dict(ttl=1),
            "badack": dict(ack_delta=66000),
            "badseq": dict(seq_delta=-10000),
        }[fool]
        send(0, fake[:cut], **fooled)
        send(0, real[:cut])
        send(0, fake[:cut], **fooled)
        send(cut, real[cut:])
    else:
        raise SystemExit("unknown case " + how)
    return sock


sniff = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
sniff.bind(("eth0", 0))
sniff.settimeout(5)
raw4 = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
raw6 = socket.socket(AF6, socket.SOCK_RAW, socket.IPPROTO_RAW)
open_socks = [run(c, sniff, raw4, raw6) for c in CASES]
# Time for the server to read and answer, before the sockets close.
time.sleep(1.5)
print("done")
