#!/usr/bin/env python3
"""The Kubernetes HAProxy config (k8s/base/haproxy.cfg) finds the nodes in DNS, for real.

Kubernetes is replaced by what HAProxy sees of it: a DNS server (dnslib) answering for the
headless Service's name with one A record per ready pod. Three real switchboard nodes listen on
127.0.0.2, .3 and .4 (the same ports, as pods would), and a real HAProxy runs the config from the
rendered ConfigMap with only its `parse-resolv-conf` pointed at the test's DNS server instead.

Checks: the server-template fills one slot per A record and health-checks each on the internal
port; WebSocket clients through HAProxy reach every node; a record that leaves the answers (a pod
that terminates or stops being ready) takes its node out of rotation for new clients, soon enough
for the nodes' preStop sleep to cover it with the cluster DNS's cache on top, while the
WebSocket tunnel already open to it stays open (the draining node, not HAProxy, closes it); and
a record that comes back brings its node back without a reload.

Ports are chosen at run time; every process is stopped by pid, whatever happens; every wait has a
deadline.
"""

import json
import os
import tempfile
import threading
import time

from dnslib import QTYPE, RR, A
from dnslib.server import BaseResolver, DNSLogger, DNSServer
from websockets.sync.client import connect

from support import BINARY, Checks, Processes, free_port, haproxy_servers, http, render, require_binary, wait_for

NAME = "switchboard-headless.test.svc.cluster.local."
NODE_ADDRS = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
# The cluster DNS's own cache in a real cluster (CoreDNS: the records' 5 s TTL).
CLUSTER_DNS_CACHE_SECS = 5


class Headless(BaseResolver):
    """The headless Service: one A record per address in `ready`."""

    def __init__(self):
        self.ready = list(NODE_ADDRS)
        self.lock = threading.Lock()

    def resolve(self, request, handler):
        reply = request.reply()
        q = request.q
        if str(q.qname) == NAME and q.qtype == QTYPE.A:
            with self.lock:
                for addr in self.ready:
                    reply.add_answer(RR(q.qname, QTYPE.A, rdata=A(addr), ttl=1))
        elif str(q.qname) != NAME:
            reply.header.rcode = 3  # NXDOMAIN
        return reply


def dev_overlay():
    """The rendered dev overlay's haproxy.cfg, and the nodes' preStop sleep in seconds."""
    docs = render("dev")
    cfg = next(d["data"]["haproxy.cfg"] for d in docs
               if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("haproxy-config"))
    node = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "switchboard")
    container = next(c for c in node["spec"]["template"]["spec"]["containers"] if c["name"] == "switchboard")
    return cfg, int(container["lifecycle"]["preStop"]["exec"]["command"][1])


def up_addrs(stats_port):
    return {addr.rsplit(":", 1)[0] for addr, status in haproxy_servers(stats_port).values() if status.startswith("UP")}


def welcome_node(ws):
    frame = json.loads(ws.recv(timeout=5))
    assert frame["type"] == "welcome", frame
    return frame["node"]


def main(check):
    require_binary()
    resolver = Headless()
    dns_port = free_port()
    dns = DNSServer(resolver, port=dns_port, address="127.0.0.1", logger=DNSLogger(logf=lambda _: None))
    dns.start_thread()
    try:
        with Processes() as procs, tempfile.TemporaryDirectory() as tmp:
            run(check, procs, resolver, dns_port, tmp)
    finally:
        dns.stop()


def run(check, procs, resolver, dns_port, tmp):
    public = free_port(NODE_ADDRS)
    internal = free_port(NODE_ADDRS)
    while internal == public:
        internal = free_port(NODE_ADDRS)
    node_ids = {}
    for i, addr in enumerate(NODE_ADDRS):
        node_ids[addr] = f"dns-test-{i + 1}"
        env = dict(os.environ, SWITCHBOARD_DEMO="false", SWITCHBOARD_LOG="warn")
        procs.start([BINARY, "--listen", f"{addr}:{public}", "--internal-listen", f"{addr}:{internal}",
                     "--node-id", node_ids[addr]], env=env)
    for addr in NODE_ADDRS:
        wait_for(f"{addr} ready", lambda addr=addr: http(f"http://{addr}:{internal}/readyz")[0] == 200)

    cfg, pre_stop = dev_overlay()
    check("    parse-resolv-conf\n" in cfg, "the Kubernetes haproxy.cfg reads the cluster DNS from resolv.conf")
    cfg = cfg.replace("    parse-resolv-conf\n", f"    nameserver test 127.0.0.1:{dns_port}\n")
    lb_port, stats_port = free_port(), free_port()
    cfg_path = os.path.join(tmp, "haproxy.cfg")
    with open(cfg_path, "w") as f:
        f.write(cfg)
    procs.start(["haproxy", "-db", "-f", cfg_path], env={
        "PATH": os.environ["PATH"],
        "SB_NODES_DNS": NAME.rstrip("."),
        "SB_NODE_SLOTS": "4",
        "SB_NODE_PORT": str(public),
        "SB_CHECK_PORT": str(internal),
        "SB_PUBLIC_BIND": f"127.0.0.1:{lb_port}",
        "SB_STATS_BIND": f"127.0.0.1:{stats_port}",
        "SB_CHECK_INTER": "100ms",
        # Within this machine's open-files limit (HAProxy needs two per connection).
        "SB_MAXCONN": "2000",
        "SB_FRONTEND_MAXCONN": "1900",
    })

    # One slot per A record, each UP after its /readyz checks; the spare slot unused.
    wait_for("three nodes UP from DNS", lambda: up_addrs(stats_port) == set(NODE_ADDRS))
    check(len(haproxy_servers(stats_port)) == 4, "SB_NODE_SLOTS server slots")

    url = f"ws://127.0.0.1:{lb_port}/ws"
    clients = [connect(url, subprotocols=["switchboard.v1.json"], open_timeout=5) for _ in range(6)]
    seen = {welcome_node(ws) for ws in clients}
    check(seen == set(node_ids.values()), f"leastconn spreads clients over every node found in DNS: {seen}")

    # The third pod leaves the headless Service's answers.
    with resolver.lock:
        resolver.ready = NODE_ADDRS[:2]
    left = time.monotonic()
    wait_for("the third node out of rotation", lambda: NODE_ADDRS[2] not in up_addrs(stats_port))
    took = time.monotonic() - left
    check(took + CLUSTER_DNS_CACHE_SECS < pre_stop,
          f"HAProxy drops a node {took:.1f} s after DNS does, + {CLUSTER_DNS_CACHE_SECS} s of cluster DNS cache: not within preStop ({pre_stop} s)")
    later = [connect(url, subprotocols=["switchboard.v1.json"], open_timeout=5) for _ in range(6)]
    later_nodes = {welcome_node(ws) for ws in later}
    check(later_nodes and node_ids[NODE_ADDRS[2]] not in later_nodes, f"new clients go only to nodes still in DNS: {later_nodes}")
    # Tunnels already open to the node that left DNS are not cut by HAProxy.
    for ws in clients:
        check(ws.ping().wait(5), "open tunnels survive their node leaving DNS")

    # The pod comes back (ready again): picked up without a reload.
    with resolver.lock:
        resolver.ready = list(NODE_ADDRS)
    wait_for("the third node back", lambda: up_addrs(stats_port) == set(NODE_ADDRS))
    check(True, "a node back in DNS is back in rotation")
    for ws in clients + later:
        ws.close()


if __name__ == "__main__":
    Checks("haproxy_dns_test.py").run(main)
