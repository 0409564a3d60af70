#!/usr/bin/env python3
"""The Compose cluster's monitoring, run without Docker: real nodes, HAProxy, Redis and Prometheus.

What deploy/docker-compose.yml would start, as local processes with its settings: three
`switchboard` nodes with the Compose nodes' environment, HAProxy with deploy/haproxy/haproxy.cfg
and the Compose HAProxy variables, one redis-server, and Prometheus (Debian's `prometheus`) with
deploy/prometheus/prometheus.yml and alerts.yml. Only addresses change: every service gets a
loopback port chosen at run time, the scrape targets are mapped to them, and Prometheus scrapes
and evaluates every second instead of every 15 s.

Checks: Prometheus scrapes every node and HAProxy's exporter; every alert rule evaluates without
error on real series; every Grafana dashboard query runs, and the panels that traffic feeds
(connections, messages in and out, publish latency, handshake failures, Redis shards) show data;
then a node killed with SIGKILL makes SwitchboardNodeDown pending (and HAProxy's exporter count
one server fewer), and Redis stopped makes SwitchboardRedisShardDown and SwitchboardNodeNotReady
pending on the remaining nodes.

Every process is stopped by pid, whatever happens; every wait has a deadline.
"""

import json
import os
import re
import shutil
import tempfile
import time
import urllib.parse

import jwt
import yaml
from websockets.sync.client import connect

from support import BINARY, ROOT, Checks, Processes, compose, free_port, haproxy_servers, http, require_binary, wait_for

# Dashboard panels that the traffic below must fill.
PANELS_WITH_DATA = {
    "Connections per node", "Messages in per second", "Messages out per second",
    "Publish latency quantiles", "Handshake failures per second", "Redis shard up",
}


def resolved(value):
    """A Compose value as Compose resolves it with the referenced variable unset."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", str(value))


def prom_query(prom, expr):
    status, body = http(f"http://127.0.0.1:{prom}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
    reply = json.loads(body)
    if status != 200 or reply["status"] != "success":
        raise AssertionError(f"query {expr!r} failed: {body}")
    return reply["data"]["result"]


def pending_or_firing(prom, alertname):
    """instance -> labels of the alert's active instances."""
    _, body = http(f"http://127.0.0.1:{prom}/api/v1/alerts")
    return {a["labels"].get("instance"): a["labels"] for a in json.loads(body)["data"]["alerts"]
            if a["labels"]["alertname"] == alertname}


def main(check):
    require_binary()
    for tool in ("prometheus", "haproxy", "redis-server"):
        check(shutil.which(tool), f"{tool} is not installed (tests/deploy/validate.sh installs it)")
    spec = compose()["services"]
    tmp = tempfile.mkdtemp(prefix="switchboard-monitoring-")
    try:
        with Processes() as procs:
            run(check, procs, spec, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run(check, procs, spec, tmp):
    redis_url, redis = procs.redis()

    # The nodes, with the Compose nodes' environment.
    nodes = {}
    for name in sorted(n for n in spec if n.startswith("node")):
        env = {k: resolved(v) for k, v in spec[name]["environment"].items()}
        public, internal = free_port(), free_port()
        env.update(PATH=os.environ["PATH"], SWITCHBOARD_LISTEN=f"127.0.0.1:{public}",
                   SWITCHBOARD_INTERNAL_LISTEN=f"127.0.0.1:{internal}", SWITCHBOARD_REDIS=redis_url)
        proc = procs.start([BINARY], env=env, log=os.path.join(ROOT, "target", f"deploy-monitoring-{name}.log"))
        nodes[name] = {"public": public, "internal": internal, "env": env, "proc": proc}
    for name, node in nodes.items():
        wait_for(f"{name} ready", lambda node=node: http(f"http://127.0.0.1:{node['internal']}/readyz")[0] == 200)

    # HAProxy with deploy/haproxy/haproxy.cfg and the Compose HAProxy variables.
    lb, stats = free_port(), free_port()
    henv = {k: resolved(v) for k, v in spec["haproxy"]["environment"].items()}
    for name, node in nodes.items():
        compose_port = resolved(spec[name]["environment"]["SWITCHBOARD_LISTEN"]).rsplit(":", 1)[1]
        check(henv.get(f"SB_{name.upper()}") == f"{name}:{compose_port}", f"Compose's HAProxy sends clients to {name}")
        henv[f"SB_{name.upper()}"] = f"127.0.0.1:{node['public']}"
        henv[f"SB_{name.upper()}_CHECK_PORT"] = str(node["internal"])
    henv.update(PATH=os.environ["PATH"], SB_PUBLIC_BIND=f"127.0.0.1:{lb}", SB_STATS_BIND=f"127.0.0.1:{stats}",
                SB_CHECK_INTER="200ms", SB_MAXCONN="2000", SB_FRONTEND_MAXCONN="1900")
    procs.start(["haproxy", "-db", "-f", os.path.join(ROOT, "deploy", "haproxy", "haproxy.cfg")], env=henv)
    wait_for("HAProxy seeing every node UP", lambda: len(haproxy_servers(stats)) == len(nodes)
             and all(s.startswith("UP") for _, s in haproxy_servers(stats).values()))

    # Prometheus with the Compose configuration and rules, targets mapped to the ports above.
    prom = free_port()
    with open(os.path.join(ROOT, "deploy", "prometheus", "prometheus.yml"), encoding="utf-8") as f:
        config = yaml.safe_load(f)
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    mapping = {f"{name}:9090": f"127.0.0.1:{node['internal']}" for name, node in nodes.items()}
    mapping.update({"haproxy:8404": f"127.0.0.1:{stats}", "localhost:9090": f"127.0.0.1:{prom}"})
    for job in config["scrape_configs"]:
        for sc in job["static_configs"]:
            check(all(t in mapping for t in sc["targets"]), f"scrape targets {sc['targets']} are Compose services")
            sc["targets"] = [mapping[t] for t in sc["targets"]]
    for rule_file in config["rule_files"]:
        shutil.copy(os.path.join(ROOT, "deploy", "prometheus", rule_file), os.path.join(tmp, rule_file))
    with open(os.path.join(tmp, "prometheus.yml"), "w") as f:
        yaml.safe_dump(config, f)
    procs.start(["prometheus", f"--config.file={tmp}/prometheus.yml", f"--storage.tsdb.path={tmp}/data",
                 f"--web.listen-address=127.0.0.1:{prom}"], log=os.path.join(ROOT, "target", "deploy-monitoring-prometheus.log"))

    # Every target scraped.
    def targets_up():
        _, body = http(f"http://127.0.0.1:{prom}/api/v1/targets")
        active = json.loads(body)["data"]["activeTargets"]
        return len(active) == len(mapping) and all(t["health"] == "up" for t in active)

    wait_for("Prometheus scraping every node and HAProxy", targets_up)
    check(True, "Prometheus scrapes every node's internal port and HAProxy's exporter")

    # Traffic through HAProxy: authorised clients in a room, one refused handshake, publishes.
    secret = nodes["node1"]["env"]["SWITCHBOARD_JWT_SECRET"]
    token = jwt.encode({"sub": "alice", "exp": int(time.time()) + 600, "rooms": ["*"], "publish": ["*"]}, secret, algorithm="HS256")
    clients = []
    for i in range(3):
        ws = connect(f"ws://127.0.0.1:{lb}/ws?token={token}", subprotocols=["switchboard.v1.json"], open_timeout=5)
        check(json.loads(ws.recv(timeout=5))["type"] == "welcome", "a client with a token is welcomed")
        ws.send(json.dumps({"type": "subscribe", "room": "lobby", "id": 1}))
        check(json.loads(ws.recv(timeout=5))["type"] == "reply", "subscribed")
        clients.append(ws)
    try:
        connect(f"ws://127.0.0.1:{lb}/ws", subprotocols=["switchboard.v1.json"], open_timeout=5).close()
        raise AssertionError("a handshake without a token was accepted")
    except Exception as e:
        check("401" in str(e), f"a handshake without a token is refused with 401: {e}")
    # Publishes from a client and from the server API, spread over a few scrapes so that rates
    # and quantiles have something to show.
    api_key = nodes["node1"]["env"]["SWITCHBOARD_API_KEY"]
    for i in range(20):
        if i % 2:
            clients[0].send(json.dumps({"type": "publish", "room": "lobby", "data": i, "id": 100 + i}))
        else:
            status, body = http(f"http://127.0.0.1:{nodes['node1']['internal']}/api/publish", {"room": "lobby", "data": i},
                                {"authorization": f"Bearer {api_key}"})
            check(status == 200, f"POST /api/publish: {status} {body}")
        time.sleep(0.15)
    for n, ws in enumerate(clients):
        # The publisher also gets a reply per publish.
        frames = [json.loads(ws.recv(timeout=5)) for _ in range(30 if n == 0 else 20)]
        check(sum(f["type"] == "message" for f in frames) == 20, "every client receives the room's messages")

    # Every rule evaluated without error.
    def rules_ok():
        _, body = http(f"http://127.0.0.1:{prom}/api/v1/rules")
        rules = [r for g in json.loads(body)["data"]["groups"] for r in g["rules"]]
        bad = [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"]
        if bad:
            raise AssertionError(f"rules failing: {bad}")
        return rules and all(r.get("lastEvaluation", "0001").startswith("2") for r in rules) and rules

    rules = wait_for("every alert rule evaluated", rules_ok)
    with open(os.path.join(ROOT, "deploy", "prometheus", "alerts.yml"), encoding="utf-8") as f:
        check(len(rules) == sum(len(g["rules"]) for g in yaml.safe_load(f)["groups"]), "Prometheus loaded every rule")

    # Every dashboard query runs; the panels fed by the traffic show data.
    with open(os.path.join(ROOT, "deploy", "prometheus", "grafana", "dashboards", "switchboard.json"), encoding="utf-8") as f:
        dashboard = json.load(f)
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"].replace("$instance", ".*").replace("$__rate_interval", "1m")
            if panel["title"] in PANELS_WITH_DATA:
                wait_for(f"data in panel {panel['title']!r}", lambda expr=expr: prom_query(prom, expr))
            else:
                prom_query(prom, expr)
            check(True, f"dashboard query of {panel['title']!r} runs")
    check(prom_query(prom, 'haproxy_backend_active_servers{proxy="switchboard"}')[0]["value"][1] == "3",
          "HAProxy's exporter counts three active nodes")

    # A node killed: SwitchboardNodeDown pending for it; HAProxy takes it out.
    node3 = nodes["node3"]
    node3["proc"].kill()
    node3["proc"].wait()
    instance = f"127.0.0.1:{node3['internal']}"
    alert = wait_for("SwitchboardNodeDown for the killed node", lambda: pending_or_firing(prom, "SwitchboardNodeDown").get(instance))
    check(alert["severity"] == "page" and set(pending_or_firing(prom, "SwitchboardNodeDown")) == {instance},
          "SwitchboardNodeDown fires for the killed node only")
    wait_for("HAProxy's exporter counting two active nodes",
             lambda: prom_query(prom, 'haproxy_backend_active_servers{proxy="switchboard"} == 2'))

    # Redis gone: the remaining nodes report the shard down and are not ready.
    redis.kill()
    redis.wait()
    remaining = {f"127.0.0.1:{n['internal']}" for name, n in nodes.items() if name != "node3"}
    wait_for("SwitchboardRedisShardDown on the remaining nodes",
             lambda: set(pending_or_firing(prom, "SwitchboardRedisShardDown")) == remaining)
    check(all(a["shard"] == "0" for a in pending_or_firing(prom, "SwitchboardRedisShardDown").values()),
          "SwitchboardRedisShardDown names shard 0")
    wait_for("SwitchboardNodeNotReady on the remaining nodes",
             lambda: set(pending_or_firing(prom, "SwitchboardNodeNotReady")) == remaining)
    check(True, "a Redis outage makes the nodes not ready")
    for ws in clients:
        ws.close()


if __name__ == "__main__":
    Checks("monitoring_test.py").run(main)
