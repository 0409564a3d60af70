#!/usr/bin/env python3
"""Offline validation of everything under deploy/ and k8s/ (run by tests/deploy/validate.sh).

No Docker engine or Kubernetes cluster is needed. What is checked, and with what:

- deploy/Dockerfile: two stages, a non-root numeric USER, EXPOSE of the documented default ports,
  a HEALTHCHECK on /healthz, and ENV names that are real options; .dockerignore keeps every
  workspace manifest and every file the crates compile in;
- deploy/docker-compose.yml: parsed with PyYAML; services, node variables against
  docs/configuration.md and `switchboard --help`, HAProxy variables against
  deploy/haproxy/haproxy.cfg, every mounted file present, scrape targets matching the services;
- deploy/prometheus: `promtool check config`, `promtool check rules`, `promtool test rules`
  (tests/deploy/alerts_test.yml), every metric and label in the rules and the Grafana dashboard
  against docs/metrics.md and the metric definitions in the source, runbook links into
  docs/operations.md;
- k8s/overlays/*: rendered with `kubectl kustomize`, every object validated with the PyPI package
  kubernetes-validate in strict mode against KUBERNETES_VERSION. ServiceMonitor is a CRD that
  kubernetes-validate has no schema for: it is checked here instead (selector and port against
  the Service it scrapes). Any other kind without a schema is an error. Then the things that
  matter: probe paths and ports, preStop + drain within the termination grace period, non-root
  and read-only containers, Secret and ConfigMap references, HAProxy's config (`haproxy -c`, and
  the same settings as deploy/haproxy/haproxy.cfg).

Exits 1 listing every failed check.
"""

import fnmatch
import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

import yaml
import kubernetes_validate

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
KUBERNETES_VERSION = "1.32.0"
OVERLAYS = ["dev", "prod"]
# Kinds kubernetes-validate cannot know (CRDs), checked by check_service_monitors instead.
CRD_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}
# Secrets the prod overlay expects to be created outside git (docs/operations.md).
EXTERNAL_SECRETS = {"prod": {"switchboard-secrets", "switchboard-redis"}, "dev": set()}
# Prometheus' own series, usable in rules besides the documented metrics.
PROMETHEUS_SERIES = {"up"}

failures = []
passed = 0


def check(ok, what):
    global passed
    if ok:
        passed += 1
    else:
        failures.append(what)
    return ok


def path(*parts):
    return os.path.join(ROOT, *parts)


def read(*parts):
    with open(path(*parts), encoding="utf-8") as f:
        return f.read()


def run(cmd, env=None, cwd=ROOT):
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)


# --- what the node documents ---------------------------------------------------------------------


def documented_options():
    """Environment variables and defaults from docs/configuration.md's option tables."""
    env = {}
    for line in read("docs", "configuration.md").splitlines():
        m = re.match(r"\|\s*`--([a-z0-9-]+)[^`]*`\s*\|\s*`(SWITCHBOARD_[A-Z0-9_]+)`\s*\|[^|]*\|\s*([^|]*)\|", line)
        if m:
            env[m.group(2)] = {"flag": m.group(1), "default": m.group(3).strip()}
    return env


def help_env_vars():
    """Environment variables `switchboard --help` names, or None without a built binary."""
    binary = path("target", "debug", "switchboard")
    if not os.access(binary, os.X_OK):
        return None
    out = run([binary, "--help"]).stdout
    return set(re.findall(r"\[env: (SWITCHBOARD_[A-Z0-9_]+)", out))


def documented_metrics():
    """metric name -> set of labels, from the summary table of docs/metrics.md."""
    metrics = {}
    for line in read("docs", "metrics.md").splitlines():
        m = re.match(r"\|\s*`((?:switchboard|process)_[a-z0-9_]+)`\s*\|\s*(\w+)\s*\|\s*([^|]*)\|", line)
        if m:
            labels = set(re.findall(r"`(\w+)`", m.group(3)))
            metrics[m.group(1)] = {"type": m.group(2), "labels": labels}
    # The process collector's metrics are listed in their own table, without labels.
    for m in re.finditer(r"\|\s*`(process_[a-z_]+)`\s*\|\s*(gauge|counter)", read("docs", "metrics.md")):
        metrics.setdefault(m.group(1), {"type": m.group(2), "labels": set()})
    return metrics


def source_metric_names():
    names = set()
    for rel in ["crates/switchboard/src/metrics.rs", "crates/switchboard-redis/src/metrics.rs"]:
        names |= set(re.findall(r'"(switchboard_[a-z0-9_]+)"', read(*rel.split("/"))))
    return names


def github_anchors(markdown):
    anchors = set()
    for line in markdown.splitlines():
        m = re.match(r"#{1,6}\s+(.*)", line)
        if m:
            slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
            anchors.add(slug)
    return anchors


OPTIONS = documented_options()
HELP_ENV = help_env_vars()
METRICS = documented_metrics()
SOURCE_METRICS = source_metric_names()


def check_env_name(name, where):
    check(name in OPTIONS, f"{where}: {name} is not an option in docs/configuration.md")
    if HELP_ENV is not None:
        check(name in HELP_ENV, f"{where}: {name} is not listed by `switchboard --help`")


def default_port(var):
    return int(OPTIONS[var]["default"].strip("`").rsplit(":", 1)[1])


# --- PromQL --------------------------------------------------------------------------------------

PROMQL_WORDS = {
    "sum", "by", "without", "rate", "irate", "increase", "histogram_quantile", "and", "or",
    "unless", "on", "ignoring", "group_left", "group_right", "max", "min", "avg", "count",
    "clamp_min", "vector", "offset", "bool", "label_values", "topk", "abs", "delta", "deriv",
    "changes", "resets",
}


def check_promql(expr, where):
    """Every series is a documented metric (and defined in the source); every label it uses is one
    of that metric's labels, or instance/job (added by Prometheus) or le (histogram buckets)."""
    stripped = re.sub(r'"[^"]*"', '""', expr)
    stripped = re.sub(r"\[[^\]]*\]", "", stripped)
    stripped = re.sub(r"\$\w+", "", stripped)
    used = []
    for m in re.finditer(r"(?<![\w.])([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(\{[^}]*\})?", stripped):
        name, selector = m.group(1), m.group(2) or ""
        if name in PROMQL_WORDS or not re.match(r"(switchboard|process)_|up$", name):
            continue
        base = re.sub(r"_(bucket|count|sum)$", "", name)
        if name in PROMETHEUS_SERIES:
            labels = {"job", "instance"}
        elif check(base in METRICS, f"{where}: {name} is not in docs/metrics.md"):
            if base.startswith("switchboard_"):
                check(base in SOURCE_METRICS, f"{where}: {base} is not defined in the source")
            if base != name:
                check(METRICS[base]["type"] == "histogram", f"{where}: {name}: {base} is not a histogram")
            labels = METRICS[base]["labels"] | {"job", "instance"} | ({"le"} if name.endswith("_bucket") else set())
        else:
            continue
        used.append(labels)
        for label in re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", selector):
            check(label in labels, f"{where}: {name} has no label {label}")
    check(used, f"{where}: no metric found in {expr!r}")
    allowed = set().union(*used) if used else set()
    for group in re.findall(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", stripped):
        for label in filter(None, (l.strip() for l in group.split(","))):
            check(label in allowed, f"{where}: grouping by {label}, which none of its metrics has")
    return {re.sub(r"_(bucket|count|sum)$", "", n) for n in re.findall(r"\b((?:switchboard|process)_\w+|up)\b", stripped)}


# --- deploy/Dockerfile ---------------------------------------------------------------------------


def check_dockerfile():
    text = read("deploy", "Dockerfile").replace("\\\n", " ")
    lines = [l.strip() for l in text.splitlines() if l.strip() and not l.strip().startswith("#")]
    instr = [(l.split(None, 1)[0].upper(), l.split(None, 1)[1] if " " in l else "") for l in lines]
    froms = [arg for op, arg in instr if op == "FROM"]
    check(len(froms) == 2, f"Dockerfile: expected 2 FROM (builder and runtime), found {len(froms)}")
    check(froms and froms[0].startswith("rust:") and " AS " in froms[0].upper(), "Dockerfile: first stage is a named rust builder")
    check(any(op == "RUN" and "cargo build --release" in arg and "-p switchboard" in arg for op, arg in instr),
          "Dockerfile: builds with cargo build --release -p switchboard")
    runtime = instr[[i for i, (op, _) in enumerate(instr) if op == "FROM"][-1]:]
    copies = [arg for op, arg in runtime if op == "COPY"]
    check(len(copies) == 1 and "--from=" in copies[0] and copies[0].split()[-1].endswith("/switchboard"),
          "Dockerfile: the runtime stage copies only the binary")
    users = [arg for op, arg in runtime if op == "USER"]
    uid = users[-1].split(":")[0] if users else ""
    check(uid.isdigit() and int(uid) > 0, f"Dockerfile: runtime USER must be a numeric non-root uid, got {users}")
    exposed = {int(p.split("/")[0]) for op, arg in runtime if op == "EXPOSE" for p in arg.split()}
    want = {default_port("SWITCHBOARD_LISTEN"), default_port("SWITCHBOARD_INTERNAL_LISTEN")}
    check(exposed == want, f"Dockerfile: EXPOSE {sorted(exposed)}, the documented default ports are {sorted(want)}")
    envs = {}
    for op, arg in runtime:
        if op == "ENV":
            envs.update(dict(re.findall(r"(\w+)=(\S+)", arg)))
    for name in envs:
        check_env_name(name, "Dockerfile ENV")
    for var in ["SWITCHBOARD_LISTEN", "SWITCHBOARD_INTERNAL_LISTEN"]:
        port = int(envs.get(var, OPTIONS[var]["default"].strip("`")).rsplit(":", 1)[1])
        check(port in exposed, f"Dockerfile: {var} port {port} is not exposed")
        check(envs.get(var, "").startswith("0.0.0.0:"), f"Dockerfile: {var} must listen on 0.0.0.0 in a container")
    health = [arg for op, arg in runtime if op == "HEALTHCHECK"]
    check(len(health) == 1 and "/healthz" in health[0], "Dockerfile: a HEALTHCHECK on /healthz")
    if health:
        cmd = json.loads(health[0][health[0].index("CMD") + 3:].strip())
        check(cmd[0] in ("bash", "/bin/bash") and "SWITCHBOARD_INTERNAL_LISTEN" in cmd[-1],
              "Dockerfile: the health check uses bash (present in the runtime image) and the internal port's variable")
    entry = [arg for op, arg in runtime if op == "ENTRYPOINT"]
    check(entry and json.loads(entry[-1])[0] == "/usr/local/bin/switchboard", "Dockerfile: ENTRYPOINT is the binary")
    return int(uid) if uid.isdigit() else None


def check_docker_context():
    """Nothing the build needs is left out of the build context by .dockerignore: every
    workspace member's manifest and every file the crates compile in (include_str!/include_bytes!)."""
    patterns = [l.strip() for l in read(".dockerignore").splitlines() if l.strip() and not l.startswith("#")]

    def ignored(rel):
        parts = rel.split("/")
        for pat in patterns:
            pat = pat.strip("/")
            for i in range(1, len(parts) + 1):
                prefix = "/".join(parts[:i])
                if fnmatch.fnmatch(prefix, pat) or (pat.startswith("**/") and fnmatch.fnmatch(parts[i - 1], pat[3:])):
                    return True
        return False

    needed = {"Cargo.toml", "Cargo.lock"}
    members = re.search(r"members\s*=\s*\[(.*?)\]", read("Cargo.toml"), re.S).group(1)
    needed |= {f"{m}/Cargo.toml" for m in re.findall(r'"([^"]+)"', members)}
    for dirpath, _, files in os.walk(path("crates")):
        for f in files:
            if f.endswith(".rs"):
                src = os.path.join(dirpath, f)
                with open(src, encoding="utf-8") as fh:
                    for inc in re.findall(r'include_(?:str|bytes)!\(\s*"([^"]+)"', fh.read()):
                        needed.add(os.path.relpath(os.path.normpath(os.path.join(dirpath, inc)), ROOT))
    for rel in sorted(needed):
        check(os.path.exists(path(rel)), f"docker context: {rel} does not exist")
        check(not ignored(rel), f".dockerignore leaves out {rel}, which the build needs")


# --- deploy/docker-compose.yml -------------------------------------------------------------------


def haproxy_variables(cfg_text):
    """Variables the HAProxy config reads: all of them, and those it needs (no default, not
    guarded by `.if defined(...)`)."""
    names, required, guarded = set(), set(), set(re.findall(r"\.if defined\((\w+)\)", cfg_text))
    for name, has_default in re.findall(r"\$\{(\w+)(-)?", cfg_text):
        names.add(name)
        if not has_default and name not in guarded:
            required.add(name)
    return names, required


def check_compose():
    compose = yaml.safe_load(read("deploy", "docker-compose.yml"))
    services = compose.get("services", {})
    want = {"redis", "node1", "node2", "node3", "haproxy", "prometheus", "grafana"}
    check(want <= set(services), f"compose: services {sorted(want - set(services))} missing")
    nodes = {n: s for n, s in services.items() if n.startswith("node")}
    node_ids, redis_lists, listen_ports, internal_ports, addresses = set(), set(), {}, {}, []
    for name, svc in nodes.items():
        env = svc.get("environment", {})
        check(isinstance(env, dict), f"compose {name}: environment must be a mapping")
        for var in env:
            check_env_name(var, f"compose {name}")
        build = svc.get("build", {})
        check(os.path.isfile(path("deploy", build.get("context", ""), build.get("dockerfile", ""))),
              f"compose {name}: build.dockerfile does not exist")
        node_ids.add(env.get("SWITCHBOARD_NODE_ID"))
        redis_lists.add(env.get("SWITCHBOARD_REDIS"))
        listen_ports[name] = int(env["SWITCHBOARD_LISTEN"].rsplit(":", 1)[1])
        internal_ports[name] = int(env["SWITCHBOARD_INTERNAL_LISTEN"].rsplit(":", 1)[1])
        check(env["SWITCHBOARD_LISTEN"].startswith("0.0.0.0:") and env["SWITCHBOARD_INTERNAL_LISTEN"].startswith("0.0.0.0:"),
              f"compose {name}: must listen on 0.0.0.0 to be reachable from other containers")
        grace = re.fullmatch(r"(\d+)s", str(svc.get("stop_grace_period", "")))
        drain = (int(env.get("SWITCHBOARD_DRAIN_DELAY_MS", 0)) + int(env.get("SWITCHBOARD_DRAIN_GRACE_MS", 10000))) / 1000
        check(grace and int(grace.group(1)) >= drain + 5,
              f"compose {name}: stop_grace_period must cover drain-delay-ms + drain-grace-ms ({drain} s) + 5 s")
        # HAProxy polls /readyz: without a preStop, the delay must outlast its fall x inter + inter.
        cfg = read("deploy", "haproxy", "haproxy.cfg")
        inter_s = re.search(r"\binter \"\$\{SB_CHECK_INTER-(\d+)s\}\"", cfg)
        fall = re.search(r"\bfall (\d+)", cfg)
        inter = int(re.fullmatch(r"(\d+)s", services["haproxy"]["environment"].get("SB_CHECK_INTER", f"{inter_s.group(1)}s")).group(1))
        needed = (int(fall.group(1)) + 1) * inter * 1000
        check(int(env.get("SWITCHBOARD_DRAIN_DELAY_MS", 0)) >= needed,
              f"compose {name}: SWITCHBOARD_DRAIN_DELAY_MS must cover HAProxy's fall x inter + inter ({needed} ms)")
        check("ports" not in svc, f"compose {name}: nodes are reached through HAProxy; publish no ports")
        # HAProxy resolves the node names once, at start: a recreated node must keep its address.
        addresses.append(svc.get("networks", {}).get("default", {}).get("ipv4_address"))
    check(len(node_ids) == len(nodes) and None not in node_ids, "compose: every node needs its own SWITCHBOARD_NODE_ID")
    subnets = [c["subnet"] for c in compose.get("networks", {}).get("default", {}).get("ipam", {}).get("config", [])]
    check(None not in addresses and len(set(addresses)) == len(nodes)
          and all(any(ipaddress.ip_address(a) in ipaddress.ip_network(s) for s in subnets) for a in addresses),
          f"compose: every node needs its own fixed ipv4_address in the default network's subnet, got {addresses}")
    check(len(redis_lists) == 1 and None not in redis_lists, "compose: every node must list the same SWITCHBOARD_REDIS")
    if redis_lists and None not in redis_lists:
        hosts = {re.match(r"rediss?://(?:[^@]*@)?([^:/]+)", u).group(1) for u in next(iter(redis_lists)).split(",")}
        check(hosts <= set(services), f"compose: Redis hosts {hosts} are not services")

    haproxy = services.get("haproxy", {})
    cfg_mounts = [v for v in haproxy.get("volumes", []) if v.split(":")[1] == "/usr/local/etc/haproxy/haproxy.cfg"]
    check(cfg_mounts and os.path.normpath(cfg_mounts[0].split(":")[0]) == "haproxy/haproxy.cfg",
          "compose haproxy: mounts deploy/haproxy/haproxy.cfg as the image's config")
    if os.path.isfile(path("deploy", "haproxy", "haproxy.cfg")):
        names, required = haproxy_variables(read("deploy", "haproxy", "haproxy.cfg"))
        env = haproxy.get("environment", {})
        for var in env:
            check(var in names, f"compose haproxy: {var} is not read by deploy/haproxy/haproxy.cfg")
        for var in required:
            check(var in env, f"compose haproxy: deploy/haproxy/haproxy.cfg needs {var}")
        published = {int(str(p).rsplit(":", 1)[1]) for p in haproxy.get("ports", [])}
        for var, default in (("SB_PUBLIC_BIND", "*:8080"), ("SB_STATS_BIND", "*:8404")):
            port = int(str(env.get(var, default)).rsplit(":", 1)[1])
            check(port in published, f"compose haproxy: the {var} port {port} is not published")
        servers = {v for k, v in env.items() if re.fullmatch(r"SB_NODE\d+", k)}
        check(servers == {f"{n}:{p}" for n, p in listen_ports.items()},
              f"compose haproxy: SB_NODEn must be every node's public address, got {sorted(servers)}")
        # haproxy -c with Compose's values; the service names resolve only inside Compose, so
        # the node addresses are checked on 127.0.0.1 with the same ports.
        haproxy_bin = shutil.which("haproxy")
        if check(haproxy_bin, "haproxy is not installed (tests/deploy/validate.sh installs it)"):
            run_env = {k: re.sub(r"^[^:]+:(\d+)$", r"127.0.0.1:\1", str(v)) if re.fullmatch(r"SB_NODE\d+", k) else str(v)
                       for k, v in env.items()}
            run_env["PATH"] = os.environ["PATH"]
            res = run([haproxy_bin, "-c", "-f", path("deploy", "haproxy", "haproxy.cfg")], env=run_env)
            check(res.returncode == 0, f"compose haproxy: haproxy -c with Compose's variables: {res.stdout}{res.stderr}")
        for k, v in env.items():
            m = re.fullmatch(r"SB_(NODE\d+)_CHECK_PORT", k)
            if m:
                check(int(v) == internal_ports.get(m.group(1).lower()), f"compose haproxy: {k} is not that node's internal port")
        if not any(re.fullmatch(r"SB_NODE\d+_CHECK_PORT", k) for k in env):
            check(set(internal_ports.values()) == {9090}, "compose haproxy: nodes' internal port differs from the config's check port default")
    else:
        check(False, "deploy/haproxy/haproxy.cfg does not exist")

    # Every bind-mounted file or directory exists (relative to deploy/, where the compose file is).
    for name, svc in services.items():
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0]
            if src.startswith((".", "/")):
                check(os.path.exists(path("deploy", src)), f"compose {name}: mounted {src} does not exist")

    # Prometheus scrapes the nodes' internal ports and HAProxy's stats port.
    prom = yaml.safe_load(read("deploy", "prometheus", "prometheus.yml"))
    jobs = {j["job_name"]: [t for sc in j.get("static_configs", []) for t in sc["targets"]] for j in prom["scrape_configs"]}
    check(set(jobs.get("switchboard", [])) == {f"{n}:{p}" for n, p in internal_ports.items()},
          "prometheus.yml: the switchboard job must scrape every node's internal port")
    stats_port = re.search(r":(\d+)$", str(haproxy.get("environment", {}).get("SB_STATS_BIND", "*:8404"))).group(1)
    check(jobs.get("haproxy") == [f"haproxy:{stats_port}"], "prometheus.yml: the haproxy job must scrape HAProxy's stats port")
    prom_mounts = {v.split(":")[1]: v.split(":")[0] for v in services.get("prometheus", {}).get("volumes", [])}
    for rule_file in prom.get("rule_files", []):
        in_container = os.path.normpath(os.path.join("/etc/prometheus", rule_file))
        check(in_container in prom_mounts, f"compose prometheus: rule file {in_container} is not mounted")

    grafana_mounts = {v.split(":")[1]: v.split(":")[0] for v in services.get("grafana", {}).get("volumes", [])}
    check(grafana_mounts.get("/etc/grafana/provisioning") == "./prometheus/grafana/provisioning",
          "compose grafana: provisioning directory mounted")
    provider = yaml.safe_load(read("deploy", "prometheus", "grafana", "provisioning", "dashboards", "switchboard.yml"))
    dash_dir = provider["providers"][0]["options"]["path"]
    check(grafana_mounts.get(dash_dir) == "./prometheus/grafana/dashboards",
          f"compose grafana: the dashboards directory must be mounted at the provider's path {dash_dir}")


# --- deploy/prometheus ---------------------------------------------------------------------------


def check_promtool():
    promtool = shutil.which("promtool")
    if not check(promtool, "promtool is not installed (tests/deploy/validate.sh installs it)"):
        return
    for cmd in (["check", "config", "deploy/prometheus/prometheus.yml"],
                ["check", "rules", "deploy/prometheus/alerts.yml"],
                ["test", "rules", "tests/deploy/alerts_test.yml"]):
        res = run([promtool, *cmd])
        check(res.returncode == 0, f"promtool {' '.join(cmd)}:\n{res.stdout}{res.stderr}")


def check_alerts():
    rules = yaml.safe_load(read("deploy", "prometheus", "alerts.yml"))
    anchors = github_anchors(read("docs", "operations.md")) if os.path.isfile(path("docs", "operations.md")) else set()
    check(anchors, "docs/operations.md is missing")
    by_metric = {}
    for group in rules["groups"]:
        for rule in group["rules"]:
            name = rule.get("alert", rule.get("record"))
            metrics = check_promql(rule["expr"], f"alert {name}")
            for m in metrics:
                by_metric.setdefault(m, []).append(name)
            ann = rule.get("annotations", {})
            for key in ("summary", "description", "runbook_url"):
                check(ann.get(key), f"alert {name}: no {key}")
            check(rule.get("labels", {}).get("severity") in ("page", "ticket"), f"alert {name}: severity page or ticket")
            m = re.fullmatch(r"https://github\.com/[^/]+/[^/]+/blob/main/docs/operations\.md#([\w-]+)", ann.get("runbook_url", ""))
            check(m and m.group(1) in anchors, f"alert {name}: runbook_url {ann.get('runbook_url')} is not a heading of docs/operations.md")
    for metric, what in [("up", "node down"), ("switchboard_redis_shard_up", "Redis shard down"),
                         ("switchboard_slow_consumer_closes_total", "slow-consumer closes"),
                         ("switchboard_handshakes_total", "handshake failures"),
                         ("switchboard_publish_duration_seconds", "p99 latency")]:
        check(metric in by_metric, f"alerts.yml: no {what} alert ({metric})")


def check_grafana():
    datasource = yaml.safe_load(read("deploy", "prometheus", "grafana", "provisioning", "datasources", "prometheus.yml"))
    uid = datasource["datasources"][0]["uid"]
    check(datasource["datasources"][0]["url"] == "http://prometheus:9090", "grafana datasource: the compose Prometheus")
    dash = json.loads(read("deploy", "prometheus", "grafana", "dashboards", "switchboard.json"))
    covered = set()
    for panel in dash["panels"]:
        if panel["type"] == "row":
            continue
        title = panel["title"]
        check(panel.get("datasource", {}).get("uid") == uid, f"dashboard panel {title}: datasource uid {uid}")
        for target in panel["targets"]:
            check(target.get("datasource", {}).get("uid") == uid, f"dashboard panel {title}: target datasource uid")
            covered |= check_promql(target["expr"], f"dashboard panel {title}")
            check("by (instance" in target["expr"] or "{{instance}}" in target.get("legendFormat", ""),
                  f"dashboard panel {title}: shown per node")
    for var in dash["templating"]["list"]:
        check_promql(var["definition"].replace("label_values(", "").replace(", instance)", ""), "dashboard variable")
    for metric in ["switchboard_connections", "switchboard_publish_duration_seconds", "switchboard_frames_out_total",
                   "switchboard_slow_consumer_closes_total", "switchboard_redis_shard_up",
                   "switchboard_redis_reconnects_total", "switchboard_handshakes_total"]:
        check(metric in covered, f"dashboard: no panel shows {metric}")


# --- k8s -----------------------------------------------------------------------------------------


def render(overlay):
    res = run(["kubectl", "kustomize", f"k8s/overlays/{overlay}"])
    check(res.returncode == 0, f"kubectl kustomize k8s/overlays/{overlay}: {res.stderr}")
    return [d for d in yaml.safe_load_all(res.stdout) if d] if res.returncode == 0 else []


def find(docs, kind, name=None):
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    return found


def by_name(docs, kind, prefix):
    """A generated ConfigMap or Secret (name-hash) or a plain one."""
    return [d for d in docs if d["kind"] == kind and re.fullmatch(re.escape(prefix) + r"(-[a-z0-9]{10})?", d["metadata"]["name"])]


def labels_match(selector, labels):
    return all(labels.get(k) == v for k, v in selector.items())


def container_env(docs, container):
    """The container's environment as Kubernetes builds it: envFrom first, env overriding."""
    env = {}
    for src in container.get("envFrom", []):
        ref = src.get("configMapRef") or src.get("secretRef")
        kind = "ConfigMap" if "configMapRef" in src else "Secret"
        objs = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == ref["name"]]
        if objs:
            env.update(objs[0].get("data", {}))
    for e in container.get("env", []):
        env[e["name"]] = e.get("value", e.get("valueFrom"))
    return env


def check_overlay(overlay, dockerfile_uid):
    docs = render(overlay)
    if not docs:
        return
    where = f"k8s/{overlay}"
    for d in docs:
        key = (d["apiVersion"], d["kind"])
        if key in CRD_KINDS:
            continue
        try:
            kubernetes_validate.validate(d, KUBERNETES_VERSION, strict=True)
            check(True, "")
        except kubernetes_validate.SchemaNotFoundError:
            check(False, f"{where}: no schema for {key}: add it to CRD_KINDS only if it is a CRD checked here")
        except kubernetes_validate.ValidationError as e:
            check(False, f"{where}: {d['kind']}/{d['metadata']['name']}: {e.message} at {list(e.path)}")

    namespaces = find(docs, "Namespace")
    check(len(namespaces) == 1 and all(d["metadata"].get("namespace") == namespaces[0]["metadata"]["name"]
                                      for d in docs if d["kind"] != "Namespace"),
          f"{where}: one Namespace, and every object in it")

    deployments = find(docs, "Deployment")
    for dep in deployments:
        pod = dep["spec"]["template"]["spec"]
        name = dep["metadata"]["name"]
        check(labels_match(dep["spec"]["selector"]["matchLabels"], dep["spec"]["template"]["metadata"]["labels"]),
              f"{where}: {name}: selector matches the pod labels")
        psc = pod.get("securityContext", {})
        check(psc.get("runAsNonRoot") is True and psc.get("runAsUser", 0) > 0, f"{where}: {name}: pod runs as non-root")
        check(pod.get("automountServiceAccountToken") is False, f"{where}: {name}: no service account token")
        for c in pod["containers"]:
            sc = c.get("securityContext", {})
            check(sc.get("allowPrivilegeEscalation") is False and sc.get("readOnlyRootFilesystem") is True
                  and sc.get("runAsNonRoot") is True and sc.get("capabilities", {}).get("drop") == ["ALL"],
                  f"{where}: {name}/{c['name']}: allowPrivilegeEscalation false, readOnlyRootFilesystem, runAsNonRoot, drop ALL")
            res = c.get("resources", {})
            check(all(res.get(k, {}).get(r) for k in ("requests", "limits") for r in ("cpu", "memory")),
                  f"{where}: {name}/{c['name']}: cpu and memory requests and limits")
            check("readinessProbe" in c and "livenessProbe" in c, f"{where}: {name}/{c['name']}: readiness and liveness probes")
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef") or e.get("valueFrom", {}).get("configMapKeyRef")
                if not ref:
                    continue
                kind = "Secret" if "secretKeyRef" in e["valueFrom"] else "ConfigMap"
                objs = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == ref["name"]]
                if objs:
                    check(ref["key"] in objs[0].get("data", {}) or ref["key"] in objs[0].get("stringData", {}),
                          f"{where}: {name}: {kind} {ref['name']} has no key {ref['key']}")
                else:
                    check(kind == "Secret" and ref["name"] in EXTERNAL_SECRETS[overlay],
                          f"{where}: {name}: {kind} {ref['name']} is not in the overlay")
            for src in c.get("envFrom", []):
                ref = src.get("configMapRef") or src.get("secretRef")
                check(any(d["metadata"]["name"] == ref["name"] for d in docs), f"{where}: {name}: envFrom {ref['name']} is not in the overlay")
        if name in ("switchboard", "haproxy"):
            pdbs = [p for p in find(docs, "PodDisruptionBudget")
                    if labels_match(p["spec"]["selector"]["matchLabels"], dep["spec"]["template"]["metadata"]["labels"])]
            check(len(pdbs) == 1, f"{where}: {name}: one PodDisruptionBudget selects it")

    node = find(docs, "Deployment", "switchboard")
    if not check(len(node) == 1, f"{where}: Deployment switchboard"):
        return
    node = node[0]
    pod = node["spec"]["template"]["spec"]
    c = next(c for c in pod["containers"] if c["name"] == "switchboard")
    env = container_env(docs, c)
    for var in env:
        if var.startswith("SWITCHBOARD_"):
            check_env_name(var, f"{where} switchboard env")
    for cm in by_name(docs, "ConfigMap", "switchboard-config"):
        for var in cm["data"]:
            check_env_name(var, f"{where} ConfigMap switchboard-config")
    check("SWITCHBOARD_REDIS" in env, f"{where}: SWITCHBOARD_REDIS is set (nodes of one Deployment must share Redis)")
    if isinstance(env.get("SWITCHBOARD_REDIS"), str):
        # Shards given in the overlay itself must be Services of the overlay.
        for url in env["SWITCHBOARD_REDIS"].split(","):
            m = re.match(r"rediss?://(?:[^@]*@)?([^:/]+):?(\d+)?", url)
            svc = find(docs, "Service", m.group(1))
            check(svc and int(m.group(2) or 6379) in [p["port"] for p in svc[0]["spec"]["ports"]],
                  f"{where}: Redis shard {url} is not a Service port of the overlay")
    check(env.get("SWITCHBOARD_NODE_ID", {}).get("fieldRef", {}).get("fieldPath") == "metadata.name"
          if isinstance(env.get("SWITCHBOARD_NODE_ID"), dict) else False, f"{where}: SWITCHBOARD_NODE_ID is the pod name")
    check(pod["securityContext"].get("runAsUser") == dockerfile_uid, f"{where}: runAsUser is the Dockerfile's USER {dockerfile_uid}")

    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    listen = int(str(env.get("SWITCHBOARD_LISTEN", "")).rsplit(":", 1)[-1] or 0)
    internal = int(str(env.get("SWITCHBOARD_INTERNAL_LISTEN", "")).rsplit(":", 1)[-1] or 0)
    check(ports == {"ws": listen, "internal": internal}, f"{where}: container ports {ports} match SWITCHBOARD_LISTEN/INTERNAL_LISTEN")

    def probe_port(probe):
        p = probe["httpGet"]["port"]
        return ports.get(p) if isinstance(p, str) else p

    check(c["readinessProbe"]["httpGet"]["path"] == "/readyz" and probe_port(c["readinessProbe"]) == internal,
          f"{where}: readinessProbe is /readyz on the internal port")
    check(c["livenessProbe"]["httpGet"]["path"] == "/healthz" and probe_port(c["livenessProbe"]) == internal,
          f"{where}: livenessProbe is /healthz on the internal port")
    pre = c.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
    pre_secs = int(pre[1]) if len(pre) == 2 and pre[0] == "sleep" and pre[1].isdigit() else None
    check(pre_secs and pre_secs > 0, f"{where}: preStop sleeps before the drain")
    drain = (int(env.get("SWITCHBOARD_DRAIN_DELAY_MS", 0)) + int(env.get("SWITCHBOARD_DRAIN_GRACE_MS", 10000))) / 1000
    grace = pod.get("terminationGracePeriodSeconds", 30)
    check(pre_secs is not None and grace > pre_secs + drain + 5,
          f"{where}: terminationGracePeriodSeconds {grace} must exceed preStop {pre_secs} s + drain delay and grace {drain} s + 5 s")
    check(pre_secs is not None and node["spec"].get("minReadySeconds", 0) >= pre_secs + drain,
          f"{where}: minReadySeconds must be at least preStop + drain, so that a rollout drains one node at a time")
    ann = node["spec"]["template"]["metadata"].get("annotations", {})
    check(ann.get("prometheus.io/scrape") == "true" and ann.get("prometheus.io/port") == str(internal)
          and ann.get("prometheus.io/path") == "/metrics", f"{where}: scrape annotations on the internal port")
    check(len(pod.get("topologySpreadConstraints", [])) >= 1, f"{where}: topologySpreadConstraints")
    check(node["spec"]["strategy"]["rollingUpdate"].get("maxUnavailable") == 0, f"{where}: rolling update keeps every node until its replacement is ready")

    services = {s["metadata"]["name"]: s for s in find(docs, "Service")}
    pod_labels = node["spec"]["template"]["metadata"]["labels"]

    def svc_ports(name):
        s = services.get(name)
        if not check(s, f"{where}: Service {name}"):
            return set()
        check(labels_match(s["spec"]["selector"], pod_labels), f"{where}: Service {name} selects the switchboard pods")
        return {ports.get(p["targetPort"], p["targetPort"]) for p in s["spec"]["ports"]}

    check(svc_ports("switchboard") == {listen}, f"{where}: the public Service exposes the WebSocket port only")
    check(svc_ports("switchboard-headless") == {listen}, f"{where}: the headless Service lists the WebSocket port")
    check(services.get("switchboard-headless", {}).get("spec", {}).get("clusterIP") == "None", f"{where}: switchboard-headless is headless")
    check(svc_ports("switchboard-internal") == {internal}, f"{where}: the internal Service exposes the internal port only")

    hpa = find(docs, "HorizontalPodAutoscaler", "switchboard")
    if check(len(hpa) == 1, f"{where}: HorizontalPodAutoscaler switchboard"):
        hpa = hpa[0]["spec"]
        check(hpa["scaleTargetRef"]["name"] == "switchboard", f"{where}: the HPA scales switchboard")
        check(hpa["minReplicas"] == node["spec"]["replicas"], f"{where}: HPA minReplicas equals the Deployment's replicas")

    check_network_policy(docs, where, pod_labels, listen, internal)
    check_service_monitors(docs, where)
    check_haproxy(docs, where, node, hpa if isinstance(hpa, dict) else None, listen, internal)


def check_network_policy(docs, where, pod_labels, listen, internal):
    policies = [p for p in find(docs, "NetworkPolicy") if labels_match(p["spec"]["podSelector"]["matchLabels"], pod_labels)]
    if not check(len(policies) == 1, f"{where}: one NetworkPolicy for the switchboard pods"):
        return
    by_port = {}
    for rule in policies[0]["spec"]["ingress"]:
        for p in rule.get("ports", []):
            by_port.setdefault(p["port"], []).extend(rule.get("from", [{}]))
    check(set(by_port) == {"ws", "internal"}, f"{where}: NetworkPolicy opens exactly the ws and internal ports")
    check(by_port.get("ws") == [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "haproxy"}}}],
          f"{where}: NetworkPolicy: the WebSocket port from HAProxy only")
    sources = by_port.get("internal", [])
    check({"podSelector": {}} in sources and any("namespaceSelector" in s for s in sources),
          f"{where}: NetworkPolicy: the internal port from the namespace and from Prometheus' namespace")


def check_service_monitors(docs, where):
    monitors = [d for d in docs if (d["apiVersion"], d["kind"]) in CRD_KINDS]
    check({m["metadata"]["name"] for m in monitors} == {"switchboard", "haproxy"}, f"{where}: ServiceMonitors switchboard and haproxy")
    for m in monitors:
        spec = m["spec"]
        check(set(m) <= {"apiVersion", "kind", "metadata", "spec"} and set(spec) <= {"selector", "endpoints", "namespaceSelector"},
              f"{where}: ServiceMonitor {m['metadata']['name']}: unexpected fields")
        matched = [s for s in find(docs, "Service") if labels_match(spec["selector"]["matchLabels"], s["metadata"].get("labels", {}))]
        if check(len(matched) == 1, f"{where}: ServiceMonitor {m['metadata']['name']} selects exactly one Service, got {len(matched)}"):
            names = {p["name"] for p in matched[0]["spec"]["ports"]}
            for ep in spec["endpoints"]:
                check(ep["port"] in names and ep.get("path") == "/metrics",
                      f"{where}: ServiceMonitor {m['metadata']['name']}: port {ep['port']} /metrics on {matched[0]['metadata']['name']}")


def normalized_haproxy(text):
    """HAProxy settings without comments, blank lines and the node discovery, which is what
    legitimately differs between deploy/haproxy/haproxy.cfg and the Kubernetes one."""
    out, skipping, in_resolvers = [], False, False
    for line in text.splitlines():
        s = line.split("#", 1)[0].strip() if not line.strip().startswith("#") else ""
        if not s:
            continue
        if s.startswith(".if defined(SB_NODE"):
            skipping = True
            continue
        if skipping:
            skipping = s != ".endif"
            continue
        if re.match(r"^(global|defaults|frontend|backend|listen|resolvers)\b", s):
            in_resolvers = s.startswith("resolvers")
        if in_resolvers or s.startswith(("server-template", "server ")):
            continue
        out.append(s)
    return out


def check_haproxy(docs, where, node, hpa, listen, internal):
    dep = find(docs, "Deployment", "haproxy")
    if not check(len(dep) == 1, f"{where}: Deployment haproxy"):
        return
    dep = dep[0]
    pod = dep["spec"]["template"]["spec"]
    c = pod["containers"][0]
    env = {e["name"]: e.get("value") for e in c.get("env", [])}
    cms = by_name(docs, "ConfigMap", "haproxy-config")
    if not check(len(cms) == 1 and "haproxy.cfg" in cms[0]["data"], f"{where}: ConfigMap haproxy-config with haproxy.cfg"):
        return
    cfg = cms[0]["data"]["haproxy.cfg"]
    mounted = {v["name"]: v["configMap"]["name"] for v in pod["volumes"] if "configMap" in v}
    mounts = {m["mountPath"]: mounted.get(m["name"]) for m in c["volumeMounts"]}
    check(mounts.get("/usr/local/etc/haproxy") == cms[0]["metadata"]["name"], f"{where}: haproxy.cfg mounted where the image reads it")

    names, required = haproxy_variables(cfg)
    for var in env:
        check(var in names or var == "POD_NAMESPACE", f"{where}: haproxy env {var} is not read by haproxy.cfg")
    for var in required:
        check(var in env, f"{where}: haproxy.cfg needs {var}")
    headless = "switchboard-headless.$(POD_NAMESPACE).svc.cluster.local"
    check(env.get("SB_NODES_DNS") == headless, f"{where}: SB_NODES_DNS is the headless Service ({headless})")
    check(int(env.get("SB_NODE_PORT", 8080)) == listen and int(env.get("SB_CHECK_PORT", 9090)) == internal,
          f"{where}: HAProxy sends clients to the nodes' public port and checks their internal port")
    check(re.search(r"^\s*server-template\s.*\bresolvers\s+\w+", cfg, re.M) and re.search(r"^resolvers\s", cfg, re.M),
          f"{where}: haproxy.cfg discovers nodes with server-template and a resolvers section")
    if hpa:
        check(int(env.get("SB_NODE_SLOTS", 32)) >= hpa["maxReplicas"], f"{where}: SB_NODE_SLOTS must be at least the HPA's maxReplicas")
    max_conn = int(container_env(docs, next(x for x in node["spec"]["template"]["spec"]["containers"] if x["name"] == "switchboard"))
                   .get("SWITCHBOARD_MAX_CONNECTIONS", 0))
    check(int(env.get("SB_SERVER_MAXCONN", 50000)) == max_conn, f"{where}: SB_SERVER_MAXCONN matches SWITCHBOARD_MAX_CONNECTIONS")

    if os.path.isfile(path("deploy", "haproxy", "haproxy.cfg")):
        check(normalized_haproxy(cfg) == normalized_haproxy(read("deploy", "haproxy", "haproxy.cfg")),
              f"{where}: the Kubernetes haproxy.cfg has drifted from deploy/haproxy/haproxy.cfg (beyond node discovery)")
    haproxy = shutil.which("haproxy")
    if check(haproxy, "haproxy is not installed (tests/deploy/validate.sh installs it)"):
        with tempfile.TemporaryDirectory() as tmp:
            f = os.path.join(tmp, "haproxy.cfg")
            with open(f, "w") as out:
                out.write(cfg)
            run_env = {k: v for k, v in env.items() if v is not None}
            run_env.update(PATH=os.environ["PATH"], SB_NODES_DNS="localhost")
            res = run([haproxy, "-c", "-f", f], env=run_env)
            check(res.returncode == 0, f"{where}: haproxy -c of the Kubernetes haproxy.cfg: {res.stdout}{res.stderr}")

    lb = find(docs, "Service", "haproxy")
    if check(len(lb) == 1, f"{where}: Service haproxy"):
        check(lb[0]["spec"]["type"] == "LoadBalancer" and [p["targetPort"] for p in lb[0]["spec"]["ports"]] == ["ws"],
              f"{where}: HAProxy's LoadBalancer Service exposes its WebSocket port only")


def check_docs():
    ops = read("docs", "operations.md") if os.path.isfile(path("docs", "operations.md")) else ""
    for heading in ["## HAProxy", "## Local cluster", "## Sizing", "## Rolling upgrades", "## Scaling out and in",
                    "## Adding a Redis shard", "## Alerts and runbooks", "## File limits and kernel settings",
                    "## Kubernetes", "## Docker Compose"]:
        check(re.search(rf"^{re.escape(heading)}\s*$", ops, re.M), f"docs/operations.md: no section {heading!r}")
    check("docs/operations.md" in read("README.md"), "README.md links docs/operations.md")


def main():
    uid = check_dockerfile()
    check_docker_context()
    check_compose()
    check_promtool()
    check_alerts()
    check_grafana()
    for overlay in OVERLAYS:
        check_overlay(overlay, uid)
    check_docs()
    for f in failures:
        print(f"FAIL {f}")
    print(f"tests/deploy/validate.py: {passed} checks passed, {len(failures)} failed")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
