#!/usr/bin/env python3
"""Splits a heaptrack profile of an idle node (loadtest/idle-rss.sh with HEAPTRACK_OUT) into where
its heap goes at the peak, per connection. Usage: heap-breakdown.py PROFILE.zst CONNECTIONS.

Reads the peak-cost stacks `heaptrack_print --flamegraph-cost-type peak` writes and gives each
stack to the first part whose pattern it matches; the rest is listed as "other" with its frames.
"""
import re
import subprocess
import sys
import tempfile
from collections import defaultdict

PARTS = [
    ("WebSocket read buffer (tungstenite, --read-buffer-size)", r"from_raw_socket.*bytes_mut\.rs"),
    ("WebSocket write buffer (tungstenite, grown by the frames written)", r"buffer_frame"),
    ("limiter (Guards: governor rate limiters)", r"guards\.rs"),
    ("session task (tokio task cell holding the connection's future)", r"spawn_inner.*new_task"),
    ("heartbeat interval (its boxed Sleep)", r"interval_at"),
    ("tokio I/O registration (per socket)", r"registration_set\.rs"),
    ("tokio-tungstenite's stream adapter (its waker proxies)", r"compat\.rs"),
    ("hyper upgrade (boxed I/O)", r"upgrade\.rs"),
    ("in-memory broker: session registry and room state", r"memory\.rs"),
    ("hub: room member lists", r"join \(hub\.rs\)"),
    ("hub: sessions and users maps", r"add_session \(hub\.rs\)"),
    # Switchboard's async fns in session/core.rs; tokio's core.rs frames are generic (`<>`).
    ("requests: Core's subscriptions and what subscribing keeps", r"\{async_fn#0\} \(core\.rs\)"),
    ("session state: SessionHandle, its ids, the identity", r"websocket\.rs"),
]


def main():
    profile, connections = sys.argv[1], int(sys.argv[2])
    with tempfile.NamedTemporaryFile(mode="r", suffix=".stacks") as stacks:
        subprocess.run(
            ["heaptrack_print", "-f", profile, "--flamegraph-cost-type", "peak", "-F", stacks.name],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        lines = stacks.read().splitlines()
    parts = defaultdict(int)
    other = defaultdict(int)
    for line in lines:
        stack, cost = line.rsplit(" ", 1)
        for name, pattern in PARTS:
            if re.search(pattern, stack):
                parts[name] += int(cost)
                break
        else:
            frames = [f for f in stack.split(";") if re.search(r"\(\w+\.rs\)", f)]
            other[" > ".join(frames[-3:])] += int(cost)
    for name, cost in sorted(parts.items(), key=lambda part: -part[1]):
        print(f"{cost / connections:8.0f}  {name}")
    print(f"{sum(other.values()) / connections:8.0f}  other, largest first:")
    for frames, cost in sorted(other.items(), key=lambda part: -part[1])[:5]:
        print(f"    {cost / connections:8.1f}  {frames[:160]}")
    total = sum(parts.values()) + sum(other.values())
    print(f"{total / connections:8.0f}  heap at the peak per connection")


if __name__ == "__main__":
    main()
