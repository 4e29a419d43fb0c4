#!/usr/bin/env python3
"""How many real Envoy configs legate loads: the measurement behind issue 16.

The configs are other people's, so they are not committed here (the workplace's rule for
material fetched from public repositories); point this script at a local copy instead.

  scripts/corpus.py --gateway DIR [--envoy-examples DIR] [--legate BIN] [--envoy BIN]
                    [--keep DIR] [--show-errors N]

--gateway DIR   a checkout (or `git archive`) of github.com/envoyproxy/gateway. Its xDS
                translator's test outputs (internal/xds/translator/testdata/out/*/NAME.
                {listeners,clusters,routes,endpoints,secrets}.yaml) are what that control
                plane pushes; each NAME becomes one bootstrap, with the route configurations
                inlined into the HCMs that name them (RDS) and the endpoints into the clusters
                that name them (EDS), so one `--validate` checks all of it. Its rendered
                bootstraps (internal/xds/bootstrap/testdata/render/*.yaml) are taken as they are.
--envoy-examples DIR
                any directory of Envoy bootstraps (*.yaml), e.g. Envoy's examples/ and configs/.

Each bootstrap is run through `envoy --mode validate` when Envoy is found (a config Envoy
refuses says nothing about legate, and is counted apart) and `legate --validate`.
Prints accepted/total and the errors that block the most configs.
"""

import argparse
import collections
import copy
import os
import re
import shutil
import subprocess
import sys
import tempfile

try:
    import yaml
except ImportError:  # PyYAML ships with most Pythons; say so plainly if not.
    sys.exit("corpus.py needs PyYAML: python3 -m pip install pyyaml")

HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
KINDS = ("listeners", "clusters", "routes", "endpoints", "secrets")

# The management server legate and Envoy would be fed by; the config names it for whatever
# stays dynamic (SDS secrets, say). Nothing listens there: --validate never connects.
ADS_CONFIG = {
    "api_type": "GRPC",
    "transport_api_version": "V3",
    "grpc_services": [{"envoy_grpc": {"cluster_name": "xds_cluster"}}],
}
XDS_CLUSTER = {
    "name": "xds_cluster",
    "type": "STATIC",
    "connect_timeout": "1s",
    "typed_extension_protocol_options": {
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {}},
        }
    },
    "load_assignment": {
        "cluster_name": "xds_cluster",
        "endpoints": [
            {"lb_endpoints": [{"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 18000}}}}]}
        ],
    },
}


def read_yaml(path):
    with open(path) as f:
        return yaml.safe_load(f)


def get(d, *names):
    """A field by its proto name or its JSON (camelCase) name."""
    for n in names:
        if isinstance(d, dict) and n in d:
            return d[n]
    return None


def pop(d, *names):
    for n in names:
        if n in d:
            return d.pop(n)
    return None


def inline_routes(listener, routes_by_name):
    chains = list(get(listener, "filter_chains", "filterChains") or [])
    default = get(listener, "default_filter_chain", "defaultFilterChain")
    if default:
        chains.append(default)
    for chain in chains:
        for f in chain.get("filters") or []:
            tc = get(f, "typed_config", "typedConfig") or {}
            if tc.get("@type") != HCM:
                continue
            rds = get(tc, "rds")
            if not rds:
                continue
            name = get(rds, "route_config_name", "routeConfigName")
            if name in routes_by_name:
                pop(tc, "rds")
                tc["routeConfig"] = copy.deepcopy(routes_by_name[name])


def inline_endpoints(cluster, cla_by_name):
    if get(cluster, "type") != "EDS":
        return
    eds = get(cluster, "eds_cluster_config", "edsClusterConfig") or {}
    name = get(eds, "service_name", "serviceName") or cluster.get("name")
    if name not in cla_by_name:
        return
    pop(cluster, "eds_cluster_config", "edsClusterConfig")
    cluster["type"] = "STATIC"
    cla = copy.deepcopy(cla_by_name[name])
    cla["clusterName"] = cluster.get("name")
    pop(cla, "cluster_name")
    cluster["loadAssignment"] = cla


def needs_ads(value):
    if isinstance(value, dict):
        if "ads" in value:
            return True
        return any(needs_ads(v) for v in value.values())
    if isinstance(value, list):
        return any(needs_ads(v) for v in value)
    return False


def gateway_bootstraps(root):
    """(name, bootstrap) for each translator test output, and the rendered bootstraps."""
    out = os.path.join(root, "internal/xds/translator/testdata/out")
    # (out/ratelimit-config holds the rate-limit service's own config, not xDS.)
    for group in ("xds-ir", "extension-xds-ir"):
        gdir = os.path.join(out, group)
        if not os.path.isdir(gdir):
            continue
        names = sorted({m.group(1) for f in os.listdir(gdir) for m in [re.match(r"(.*)\.(%s)\.yaml$" % "|".join(KINDS), f)] if m})
        for name in names:
            parts = {}
            for kind in KINDS:
                p = os.path.join(gdir, f"{name}.{kind}.yaml")
                parts[kind] = (read_yaml(p) or []) if os.path.exists(p) else []
            if not parts["listeners"] and not parts["clusters"]:
                continue
            routes = {r.get("name"): r for r in parts["routes"]}
            clas = {get(c, "cluster_name", "clusterName"): c for c in parts["endpoints"]}
            for l in parts["listeners"]:
                inline_routes(l, routes)
            for c in parts["clusters"]:
                inline_endpoints(c, clas)
            static = {"listeners": parts["listeners"], "clusters": parts["clusters"]}
            # The translator lists a secret once per listener that uses it; xDS keeps one.
            secrets = list({get(x, "name"): x for x in parts["secrets"]}.values())
            if secrets:
                static["secrets"] = secrets
            boot = {"static_resources": static}
            if needs_ads(static):
                static["clusters"] = static["clusters"] + [XDS_CLUSTER]
                boot["dynamic_resources"] = {"ads_config": ADS_CONFIG}
                boot["node"] = {"id": "corpus", "cluster": "corpus"}
            yield f"gateway/{group}/{name}", boot
    render = os.path.join(root, "internal/xds/bootstrap/testdata/render")
    for f in sorted(os.listdir(render)) if os.path.isdir(render) else []:
        if f.endswith(".yaml"):
            boot = read_yaml(os.path.join(render, f))
            # Envoy Gateway names the node on Envoy's command line (--service-node).
            node = boot.setdefault("node", {}) or {}
            node.setdefault("id", "corpus")
            node.setdefault("cluster", "corpus")
            boot["node"] = node
            yield f"gateway/bootstrap/{f[:-5]}", boot


def example_bootstraps(root):
    for dirpath, _, files in sorted(os.walk(root)):
        for f in sorted(files):
            if not f.endswith((".yaml", ".yml")):
                continue
            path = os.path.join(dirpath, f)
            try:
                doc = read_yaml(path)
            except yaml.YAMLError:
                continue
            if isinstance(doc, dict) and ("static_resources" in doc or "staticResources" in doc or "dynamic_resources" in doc):
                yield "examples/" + os.path.relpath(path, root), doc


def find_envoy(explicit):
    if explicit:
        return explicit
    found = shutil.which("envoy")
    if found:
        return found
    cand = os.path.join(os.path.dirname(sys.executable), "envoy")
    return cand if os.access(cand, os.X_OK) else None


def run(cmd, timeout=60):
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        return p.returncode, p.stdout + p.stderr
    except subprocess.TimeoutExpired:
        return 124, "timed out"


def error_keys(output):
    """The distinct problems legate reports, with indices and names taken out so that the same
    field in two configs counts as one problem."""
    keys = set()
    for line in output.splitlines():
        line = line.strip()
        if not line or line.startswith("[") or line.startswith(("error: ", "legate: ")) and ":" not in line[7:]:
            continue
        if re.match(r"^\d+ errors?", line) or line.startswith("configuration"):
            continue
        k = re.sub(r"\[\d+\]", "[]", line)
        k = re.sub(r"'[^']*'", "'…'", k)
        k = re.sub(r"\"[^\"]*\"", '"…"', k)
        keys.add(k[:200])
    return keys


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gateway")
    ap.add_argument("--envoy-examples")
    ap.add_argument("--legate", default="target/release/legate")
    ap.add_argument("--envoy")
    ap.add_argument("--keep", help="write the assembled bootstraps here")
    ap.add_argument("--show-errors", type=int, default=30)
    ap.add_argument("--list", action="store_true", help="print each config's verdict")
    args = ap.parse_args()

    configs = []
    if args.gateway:
        configs += list(gateway_bootstraps(args.gateway))
    if args.envoy_examples:
        configs += list(example_bootstraps(args.envoy_examples))
    if not configs:
        sys.exit("no configs: give --gateway and/or --envoy-examples")
    envoy = find_envoy(args.envoy)
    workdir = args.keep or tempfile.mkdtemp(prefix="legate-corpus-")
    os.makedirs(workdir, exist_ok=True)

    accepted, envoy_refused, problems, first_only = 0, 0, collections.Counter(), 0
    by_source = collections.Counter()
    ok_by_source = collections.Counter()
    for name, boot in configs:
        path = os.path.join(workdir, name.replace("/", "__") + ".yaml")
        with open(path, "w") as f:
            yaml.safe_dump(boot, f, sort_keys=False)
        if envoy:
            rc, out = run([envoy, "--mode", "validate", "-c", path, "-l", "critical"])
            if rc != 0:
                envoy_refused += 1
                if args.list:
                    print(f"{name}: refused by Envoy too: {out.strip().splitlines()[-1:] }")
                continue
        source = name.split("/")[0]
        by_source[source] += 1
        rc, out = run([args.legate, "--validate", "-c", path])
        if rc == 0:
            accepted += 1
            ok_by_source[source] += 1
            if args.list:
                print(f"{name}: accepted")
            continue
        keys = error_keys(out)
        if len(keys) == 1:
            first_only += 1
        for k in keys:
            problems[k] += 1
        if args.list:
            print(f"{name}: {len(keys)} problems")
            for k in sorted(keys):
                print(f"    {k}")

    total = sum(by_source.values())
    print(f"\nlegate accepts {accepted} of {total} configs Envoy accepts", end="")
    print(f" ({envoy_refused} more refused by Envoy itself, not counted)" if envoy else " (Envoy not found: not cross-checked)")
    for s in sorted(by_source):
        print(f"  {s}: {ok_by_source[s]} of {by_source[s]}")
    print(f"  refused configs reporting a single problem: {first_only} of {total - accepted}")
    print(f"\nproblems blocking the most configs:")
    for k, n in problems.most_common(args.show_errors):
        print(f"{n:5}  {k}")
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
