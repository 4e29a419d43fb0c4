"""Sends GET / over TLS to 127.0.0.1:PORT with OpenSSL (Python's ssl), presenting the
client certificate CERT with key KEY ("-" presents none), and an x-forwarded-client-cert
header; prints the response status, or "failed" if the handshake or the read failed.

  client_cert_get.py PORT CERT KEY"""

import socket
import ssl
import sys


def main():
    port, cert, key = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if cert != "-":
        ctx.load_cert_chain(cert, key)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            with ctx.wrap_socket(raw, server_hostname="localhost") as t:
                t.sendall(
                    b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n"
                    b"x-forwarded-client-cert: By=spiffe://client-said\r\n\r\n"
                )
                data = b""
                while True:
                    d = t.recv(4096)
                    if not d:
                        break
                    data += d
        print(data.split(b" ")[1].decode() if data.startswith(b"HTTP/") else "failed")
    except (ssl.SSLError, OSError):
        print("failed")


main()
