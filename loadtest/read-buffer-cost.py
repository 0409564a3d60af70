#!/usr/bin/env python3
"""What a smaller --read-buffer-size costs a node receiving large client frames.

Usage: loadtest/read-buffer-cost.py [--sizes 1024,2048,4096] [--frames 16384,65536,100]
                                   [--rounds 3] [--secs 10]

For each read buffer size in turn (all sizes once per round, so that the machine's load falls on
all of them alike), starts a fresh release node on loopback (target/release/switchboard, built by
`cargo build --release -p switchboard`), then for each frame size has two publisher connections
send `publish` frames of that size to a room nobody subscribes to, at a held rate, for --secs
seconds. The node's CPU time (utime + stime from /proc) over each such window, divided by the
MiB the publishers sent, is the cost per MiB received; a `ping` answered on every publisher
closes the window, so every frame sent was read. Prints one JSON line per window, then a table of the medians.
Stops each node it started, by pid.
"""
import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request

import websockets

# (frame size in bytes, frames a second over all publishers): 25 MiB/s of large frames (enough
# CPU time per window that /proc's 10 ms ticks do not blur it), and small frames at a rate many
# chatty clients would send together.
SCENARIOS = [(16 * 1024, 1600), (64 * 1024, 400), (100, 4000)]
PUBLISHERS = 2
TICKS = os.sysconf("SC_CLK_TCK")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def start_node(read_buffer_size):
    port, internal = free_port(), free_port()
    node = subprocess.Popen(
        ["target/release/switchboard", "--listen", f"127.0.0.1:{port}",
         "--internal-listen", f"127.0.0.1:{internal}", "--log", "warn",
         # Admission limits and the per-connection rate limit off: the run measures reading.
         "--rate-limit", "0", "--max-connections-per-ip", "0", "--connect-rate-per-ip", "0",
         "--accept-rate", "0", "--read-buffer-size", str(read_buffer_size)])
    for _ in range(100):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{internal}/readyz", timeout=1)
            return node, port
        except OSError:
            if node.poll() is not None:
                break
            time.sleep(0.1)
    node.kill()
    node.wait()
    sys.exit("read-buffer-cost.py: the node never became ready")


async def publisher(url, frame_size, rate, secs):
    """Sends `rate` publishes a second of `frame_size` bytes for `secs` seconds, then a ping
    whose pong proves the node read them all. Returns the bytes sent."""
    frame_head = '{"type":"publish","room":"cost","data":"'
    filler = "x" * (frame_size - len(frame_head) - 2)
    frame = frame_head + filler + '"}'
    async with websockets.connect(url, subprotocols=["switchboard.v1.json"], compression=None,
                                  max_size=None) as ws:
        json.loads(await ws.recv())  # welcome
        sent = 0
        start = time.monotonic()
        count = int(rate * secs)
        for i in range(count):
            delay = start + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            await ws.send(frame)
            sent += len(frame)
        await ws.send('{"type":"ping","id":1}')
        while json.loads(await ws.recv()).get("type") != "pong":
            pass
        return sent


async def window(port, frame_size, rate, secs):
    url = f"ws://127.0.0.1:{port}/ws"
    tasks = [publisher(url, frame_size, rate / PUBLISHERS, secs) for _ in range(PUBLISHERS)]
    return sum(await asyncio.gather(*tasks))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1024,2048,4096")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--secs", type=float, default=10)
    parser.add_argument("--frames", default=",".join(str(f) for f, _ in SCENARIOS),
                        help="the frame sizes to send, of " + ", ".join(str(f) for f, _ in SCENARIOS))
    args = parser.parse_args()
    os.chdir(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    sizes = [int(size) for size in args.sizes.split(",")]
    frames = [int(frame) for frame in args.frames.split(",")]
    scenarios = [(frame, rate) for frame, rate in SCENARIOS if frame in frames]
    results = {}
    for round_ in range(args.rounds):
        for size in sizes:
            node, port = start_node(size)
            try:
                for frame_size, rate in scenarios:
                    before = cpu_seconds(node.pid)
                    sent = asyncio.run(window(port, frame_size, rate, args.secs))
                    cpu = cpu_seconds(node.pid) - before
                    per_mib = cpu / (sent / (1 << 20))
                    results.setdefault((frame_size, size), []).append(per_mib)
                    print(json.dumps({"round": round_ + 1, "read_buffer_size": size,
                                      "frame_bytes": frame_size, "frames_per_sec": rate,
                                      "mib_received": round(sent / (1 << 20), 2),
                                      "node_cpu_secs": round(cpu, 2),
                                      "cpu_ms_per_mib": round(1000 * per_mib, 2)}), flush=True)
            finally:
                node.terminate()
                node.wait()
    print(f"\n{'frame bytes':>12} " + " ".join(f"{f'buffer {s}':>16}" for s in sizes)
          + "   (node CPU-ms per MiB received, median of the rounds; ratio to the last size)")
    for frame_size, _ in scenarios:
        medians = [statistics.median(results[frame_size, s]) for s in sizes]
        cells = " ".join(f"{1000 * m:9.2f} ({m / medians[-1]:.2f})" for m in medians)
        print(f"{frame_size:>12} {cells}")


if __name__ == "__main__":
    main()
