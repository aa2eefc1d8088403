"""The server of e2e_evasion_stream: TLS (Python ssl) and HTTP on port 443
and 80 of the given IPv4 and IPv6 addresses. Prints, unbuffered, one line
per name it was asked for and answers: `tls NAME` when a ClientHello
naming NAME reached it (the SNI callback, before its ServerHello), `http
HOST` when a request with that Host did (before its response).

argv: ADDR4 ADDR6 CERT KEY
"""

import socket
import ssl
import sys
import threading

ADDR4, ADDR6, CERT, KEY = sys.argv[1:5]
lock = threading.Lock()


def say(line):
    with lock:
        print(line, flush=True)


def tls_conn(conn, ctx):
    try:
        with ctx.wrap_socket(conn, server_side=True) as s:
            s.recv(1)
    except Exception:
        pass


def http_conn(conn):
    try:
        conn.settimeout(10)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(4096)
            if not chunk:
                return
            data += chunk
        for line in data.split(b"\r\n")[1:]:
            if line.lower().startswith(b"host:"):
                say("http " + line[5:].strip().decode(errors="replace"))
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
    except Exception:
        pass
    finally:
        conn.close()


def serve(family, addr, port, tls):
    ls = socket.socket(family, socket.SOCK_STREAM)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind((addr, port))
    ls.listen(64)
    ctx = None
    if tls:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(CERT, KEY)

        def sni(sock, name, _ctx):
            say("tls %s" % name)

        ctx.sni_callback = sni
    while True:
        conn, _ = ls.accept()
        target = (lambda c=conn: tls_conn(c, ctx)) if tls else (lambda c=conn: http_conn(c))
        threading.Thread(target=target, daemon=True).start()


for family, addr in ((socket.AF_INET, ADDR4), (socket.AF_INET6, ADDR6)):
    for port, tls in ((443, True), (80, False)):
        threading.Thread(target=serve, args=(family, addr, port, tls), daemon=True).start()
say("ready")
threading.Event().wait()
