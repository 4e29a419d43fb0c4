"""Connects twice over TLS to 127.0.0.1:PORT with one TLS version (1.2 or 1.3), offering
the first connection's session on the second, and prints whether the server resumed it
("reused") or did a full handshake ("full"). The client is OpenSSL (Python's ssl), not
the TLS library legate uses, so what it sees is what an ordinary client sees."""

import socket
import ssl
import sys


def main():
    port, version = int(sys.argv[1]), sys.argv[2]
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    v = ssl.TLSVersion.TLSv1_3 if version == "1.3" else ssl.TLSVersion.TLSv1_2
    ctx.minimum_version = v
    ctx.maximum_version = v

    def once(session=None):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            with ctx.wrap_socket(raw, server_hostname="localhost", session=session) as t:
                # TLS 1.3 tickets arrive after the handshake: read a whole response first.
                t.sendall(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
                while t.recv(4096):
                    pass
                return t.session, t.session_reused

    first, _ = once()
    _, reused = once(first)
    print("reused" if reused else "full")


main()
