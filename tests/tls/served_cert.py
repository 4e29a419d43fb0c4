"""Connects over TLS to 127.0.0.1:PORT with OpenSSL (Python's ssl) and prints the DER of
the certificate the server sent, in hex, or "failed" if the handshake failed.

  served_cert.py PORT VERSION SNI [CIPHERS]

VERSION is 1.2 or 1.3; SNI "-" sends none; CIPHERS is an OpenSSL TLS 1.2 cipher list."""

import socket
import ssl
import sys


def main():
    port, version, sni = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    v = ssl.TLSVersion.TLSv1_3 if version == "1.3" else ssl.TLSVersion.TLSv1_2
    ctx.minimum_version = v
    ctx.maximum_version = v
    if len(sys.argv) > 4:
        ctx.set_ciphers(sys.argv[4])
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            with ctx.wrap_socket(raw, server_hostname=None if sni == "-" else sni) as t:
                print(t.getpeercert(binary_form=True).hex())
    except (ssl.SSLError, ConnectionError):
        print("failed")


main()
