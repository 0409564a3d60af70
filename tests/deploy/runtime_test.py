#!/usr/bin/env python3
"""The deployment files' node settings and the image's health check, run with the real binary.

No Docker engine and no cluster here, so the parts of the deployments that the node itself reads
are run directly: for the Compose nodes and for the rendered dev and prod overlays, the real
`switchboard` (target/debug) starts with exactly the environment that deployment gives it (only the
listen addresses moved to 127.0.0.1 port 0, Redis pointed at a real redis-server on a free port,
and prod's out-of-git Secrets filled with test values). Each must accept its configuration, become
ready, answer the Dockerfile's HEALTHCHECK command (run with bash, as in the image), and exit 0 on
SIGTERM within the grace its deployment allows; the health check must fail once it is gone.

Every process is stopped by pid, whatever happens; every wait has a deadline.
"""

import base64
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import yaml

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
BINARY = os.path.join(ROOT, "target", "debug", "switchboard")
DEADLINE = 20.0

passed = 0


def check(ok, what):
    global passed
    if not ok:
        raise AssertionError(what)
    passed += 1


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_for(what, condition, deadline=DEADLINE):
    end = time.monotonic() + deadline
    last = None
    while time.monotonic() < end:
        try:
            last = condition()
            if last:
                return last
        except OSError as e:
            last = e
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


def status(url):
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def healthcheck_command():
    text = open(os.path.join(ROOT, "deploy", "Dockerfile"), encoding="utf-8").read().replace("\\\n", " ")
    m = re.search(r"^HEALTHCHECK\b.*?\bCMD\s+(\[.*\])\s*$", text, re.M)
    return json.loads(m.group(1))


def healthcheck(internal_listen):
    cmd = healthcheck_command()
    env = {"PATH": os.environ["PATH"], "SWITCHBOARD_INTERNAL_LISTEN": internal_listen}
    return subprocess.run(cmd, env=env, capture_output=True, timeout=10).returncode


def compose_env():
    compose = yaml.safe_load(open(os.path.join(ROOT, "deploy", "docker-compose.yml"), encoding="utf-8"))
    node = compose["services"]["node1"]
    # ${VAR:-default} as Compose resolves it with VAR unset.
    env = {k: re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", str(v)) for k, v in node["environment"].items()}
    grace = int(re.fullmatch(r"(\d+)s", node["stop_grace_period"]).group(1))
    return env, grace


def overlay_env(overlay, secrets_for_test):
    out = subprocess.run(["kubectl", "kustomize", f"k8s/overlays/{overlay}"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    docs = [d for d in yaml.safe_load_all(out) if d]
    dep = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "switchboard")
    pod = dep["spec"]["template"]["spec"]
    c = next(c for c in pod["containers"] if c["name"] == "switchboard")
    env = {}
    for src in c.get("envFrom", []):
        cm = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == src["configMapRef"]["name"])
        env.update(cm["data"])
    for e in c.get("env", []):
        if "value" in e:
            env[e["name"]] = e["value"]
            continue
        ref = e["valueFrom"]
        if "fieldRef" in ref:
            env[e["name"]] = "switchboard-5c7d9f8b6-x2k4q"  # what a pod name looks like
        elif "secretKeyRef" in ref:
            secret = [d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"] == ref["secretKeyRef"]["name"]]
            if secret:
                env[e["name"]] = base64.b64decode(secret[0]["data"][ref["secretKeyRef"]["key"]]).decode()
            else:
                env[e["name"]] = secrets_for_test[e["name"]]
    pre = c["lifecycle"]["preStop"]["exec"]["command"]
    return env, pod["terminationGracePeriodSeconds"] - int(pre[1])


def run_node(name, env, grace, redis_url):
    env = dict(env)
    configured_internal = env["SWITCHBOARD_INTERNAL_LISTEN"]
    env.update(SWITCHBOARD_LISTEN="127.0.0.1:0", SWITCHBOARD_INTERNAL_LISTEN="127.0.0.1:0",
               SWITCHBOARD_LOG_FORMAT="json", PATH=os.environ["PATH"])
    if "SWITCHBOARD_REDIS" in env:
        env["SWITCHBOARD_REDIS"] = redis_url
    log_path = os.path.join(ROOT, "target", f"deploy-runtime-{name}.log")
    with open(log_path, "w") as log:
        proc = subprocess.Popen([BINARY], env=env, stdout=log, stderr=log)
    try:
        def internal_addr():
            if proc.poll() is not None:
                raise AssertionError(f"{name}: the node exited with {proc.returncode} (log: {log_path})")
            for line in open(log_path, encoding="utf-8"):
                if '"internal"' in line:
                    return json.loads(line)["fields"]["internal"]
            return None

        internal = wait_for(f"{name}: the node's internal address", internal_addr)
        wait_for(f"{name}: /readyz 200", lambda: status(f"http://{internal}/readyz") == 200)
        check(True, f"{name}: starts and becomes ready with its deployment's settings")
        port = internal.rsplit(":", 1)[1]
        # The image's health check, with the internal address as the deployment configures it
        # (0.0.0.0:PORT), on the port the node actually got.
        listen = configured_internal.rsplit(":", 1)[0] + ":" + port
        check(healthcheck(listen) == 0, f"{name}: the Dockerfile's HEALTHCHECK passes against a live node")
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{name}: no exit within the {grace} s its deployment allows after SIGTERM")
        check(code == 0, f"{name}: exit status 0 after SIGTERM, got {code}")
        check(healthcheck(listen) != 0, f"{name}: the HEALTHCHECK fails once the node is gone")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def main():
    if not os.access(BINARY, os.X_OK):
        raise AssertionError(f"{BINARY} is missing: run `cargo build -p switchboard` first")
    redis_port = free_port()
    redis = subprocess.Popen(["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1",
                              "--save", "", "--appendonly", "no"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def redis_up():
            with socket.create_connection(("127.0.0.1", redis_port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")

        wait_for("redis-server", redis_up)
        url = f"redis://127.0.0.1:{redis_port}"
        env, grace = compose_env()
        run_node("compose", env, grace, url)
        env, grace = overlay_env("dev", {})
        run_node("k8s-dev", env, grace, url)
        env, grace = overlay_env("prod", {
            "SWITCHBOARD_JWT_SECRET": "test-secret-0123456789abcdef",
            "SWITCHBOARD_API_KEY": "test-api-key",
            "SWITCHBOARD_REDIS": url,
        })
        run_node("k8s-prod", env, grace, url)
    finally:
        redis.kill()
        redis.wait()
    print(f"tests/deploy/runtime_test.py: {passed} checks passed")


if __name__ == "__main__":
    try:
        main()
    except AssertionError as e:
        print(f"FAIL tests/deploy/runtime_test.py: {e}", file=sys.stderr)
        sys.exit(1)
