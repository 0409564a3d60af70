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
import subprocess

from support import BINARY, ROOT, Checks, Processes, compose, http, render, require_binary, wait_for


def healthcheck(internal_listen):
    """Runs the Dockerfile's HEALTHCHECK command as the image would; its exit status."""
    with open(os.path.join(ROOT, "deploy", "Dockerfile"), encoding="utf-8") as f:
        text = f.read().replace("\\\n", " ")
    cmd = json.loads(re.search(r"^HEALTHCHECK\b.*?\bCMD\s+(\[.*\])\s*$", text, re.M).group(1))
    env = {"PATH": os.environ["PATH"], "SWITCHBOARD_INTERNAL_LISTEN": internal_listen}
    return subprocess.run(cmd, env=env, capture_output=True, timeout=10).returncode


def compose_env():
    node = compose()["services"]["node1"]
    # ${VAR:-default} as Compose resolves it with VAR unset.
    env = {k: re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", str(v)) for k, v in node["environment"].items()}
    return env, int(re.fullmatch(r"(\d+)s", node["stop_grace_period"]).group(1))


def overlay_env(overlay, secrets_for_test):
    docs = render(overlay)
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


def run_node(check, procs, name, env, grace, redis_url):
    env = dict(env)
    configured_internal = env["SWITCHBOARD_INTERNAL_LISTEN"]
    env.update(SWITCHBOARD_LISTEN="127.0.0.1:0", SWITCHBOARD_INTERNAL_LISTEN="127.0.0.1:0",
               SWITCHBOARD_LOG_FORMAT="json", PATH=os.environ["PATH"])
    if "SWITCHBOARD_REDIS" in env:
        env["SWITCHBOARD_REDIS"] = redis_url
    log_path = os.path.join(ROOT, "target", f"deploy-runtime-{name}.log")
    proc = procs.start([BINARY], env=env, log=log_path)

    def internal_addr():
        if proc.poll() is not None:
            raise AssertionError(f"{name}: the node exited with {proc.returncode} (log: {log_path})")
        with open(log_path, encoding="utf-8") as log:
            for line in log:
                if '"internal"' in line:
                    return json.loads(line)["fields"]["internal"]
        return None

    internal = wait_for(f"{name}: the node's internal address", internal_addr)
    wait_for(f"{name}: /readyz 200", lambda: http(f"http://{internal}/readyz")[0] == 200)
    check(True, f"{name}: starts and becomes ready with its deployment's settings")
    # The image's health check, with the internal address as the deployment configures it
    # (0.0.0.0:PORT), on the port the node actually got.
    listen = configured_internal.rsplit(":", 1)[0] + ":" + internal.rsplit(":", 1)[1]
    check(healthcheck(listen) == 0, f"{name}: the Dockerfile's HEALTHCHECK passes against a live node")
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"{name}: no exit within the {grace} s its deployment allows after SIGTERM")
    check(code == 0, f"{name}: exit status 0 after SIGTERM, got {code}")
    check(healthcheck(listen) != 0, f"{name}: the HEALTHCHECK fails once the node is gone")


def main(check):
    require_binary()
    with Processes() as procs:
        url, _ = procs.redis()
        run_node(check, procs, "compose", *compose_env(), url)
        run_node(check, procs, "k8s-dev", *overlay_env("dev", {}), url)
        run_node(check, procs, "k8s-prod", *overlay_env("prod", {
            "SWITCHBOARD_JWT_SECRET": "test-secret-0123456789abcdef",
            "SWITCHBOARD_API_KEY": "test-api-key",
            "SWITCHBOARD_REDIS": url,
        }), url)


if __name__ == "__main__":
    Checks("runtime_test.py").run(main)
