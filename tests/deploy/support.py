"""What the real-process deployment tests share: checks, deadlines, ports, processes."""

import csv
import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import yaml

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
BINARY = os.path.join(ROOT, "target", "debug", "switchboard")
DEADLINE = 30.0


class Checks:
    def __init__(self, name):
        self.name = name
        self.passed = 0

    def __call__(self, ok, what):
        if not ok:
            raise AssertionError(what)
        self.passed += 1

    def run(self, main):
        """Runs `main(self)`; a failed check or wait exits 1 with its message."""
        try:
            main(self)
        except AssertionError as e:
            print(f"FAIL tests/deploy/{self.name}: {e}", file=sys.stderr)
            sys.exit(1)
        print(f"tests/deploy/{self.name}: {self.passed} checks passed")


def require_binary():
    if not os.access(BINARY, os.X_OK):
        raise AssertionError(f"{BINARY} is missing: run `cargo build -p switchboard` first")


def free_port(addrs=("127.0.0.1",)):
    """A TCP port free on every one of `addrs` right now."""
    for _ in range(100):
        s = socket.socket()
        s.bind((addrs[0], 0))
        port = s.getsockname()[1]
        s.close()
        try:
            for addr in addrs:
                t = socket.socket()
                t.bind((addr, port))
                t.close()
            return port
        except OSError:
            continue
    raise RuntimeError("no free port")


def wait_for(what, condition, deadline=DEADLINE):
    """Polls `condition` until it returns something true, at most `deadline` seconds."""
    end = time.monotonic() + deadline
    last = None
    while time.monotonic() < end:
        try:
            last = condition()
            if last:
                return last
        except (OSError, ValueError) as e:
            # Not listening yet, or not answering properly yet (a server still starting).
            last = e
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


def http(url, data=None, headers=None):
    """(status, body) of a GET, or a POST of `data` (JSON) when given."""
    body = None if data is None else json.dumps(data).encode()
    req = urllib.request.Request(url, data=body, headers=dict(headers or {}, **({"content-type": "application/json"} if body else {})))
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def haproxy_servers(stats_port, backend="switchboard"):
    """A backend's servers from HAProxy's CSV stats: name -> (addr, status)."""
    _, body = http(f"http://127.0.0.1:{stats_port}/stats;csv")
    rows = csv.DictReader(io.StringIO(body.lstrip("# ")))
    return {r["svname"]: (r.get("addr", ""), r["status"]) for r in rows
            if r["pxname"] == backend and r["svname"] not in ("FRONTEND", "BACKEND")}


def render(overlay):
    out = subprocess.run(["kubectl", "kustomize", f"k8s/overlays/{overlay}"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def compose():
    with open(os.path.join(ROOT, "deploy", "docker-compose.yml"), encoding="utf-8") as f:
        return yaml.safe_load(f)


class Processes:
    """Every process a test starts, stopped by pid when the `with` block ends, whatever happens."""

    def __init__(self):
        self.procs = []

    def start(self, args, env=None, log=None):
        out = open(log, "w") if log else subprocess.DEVNULL
        proc = subprocess.Popen(args, env=env, stdout=out, stderr=out)
        self.procs.append(proc)
        return proc

    def redis(self):
        """A redis-server on a free loopback port, without persistence: (URL, process) once it
        answers."""
        port = free_port()
        proc = self.start(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])

        def pong():
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")

        wait_for("redis-server", pong)
        return f"redis://127.0.0.1:{port}", proc

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        return False
