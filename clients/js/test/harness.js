// Test harness: starts the real switchboard binary (and redis-server) on ports the OS picks,
// and kills every process it started, by pid, when the test process ends.

import { spawn } from "node:child_process";
import { createHmac } from "node:crypto";
import { existsSync, readFileSync, readdirSync } from "node:fs";
import { createServer } from "node:net";
import { dirname, resolve } from "node:path";
import { createInterface } from "node:readline";
import { fileURLToPath } from "node:url";

/** How long any single expected event may take before a test fails. */
export const DEADLINE_MS = 10_000;

/** Every transport, for the suites that run over each. */
export const TRANSPORTS = /** @type {const} */ (["websocket", "sse", "poll"]);

const root = resolve(dirname(fileURLToPath(import.meta.url)), "../../..");
const binary = process.env.SWITCHBOARD_BIN ?? resolve(root, "target/debug/switchboard");

/** @type {Set<import("node:child_process").ChildProcess>} */
const running = new Set();
process.on("exit", () => {
  for (const child of running) child.kill("SIGKILL");
});
for (const signal of /** @type {const} */ (["SIGINT", "SIGTERM"])) {
  process.once(signal, () => process.exit(130));
}

/**
 * Rejects after `ms` with `what` unless `promise` settles first.
 * @template T
 * @param {Promise<T>} promise
 * @param {string} what
 * @param {number} [ms]
 * @returns {Promise<T>}
 */
export function within(promise, what, ms = DEADLINE_MS) {
  /** @type {ReturnType<typeof setTimeout> | undefined} */
  let timer;
  const deadline = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms waiting for ${what}`)), ms);
  });
  return Promise.race([promise, deadline]).finally(() => clearTimeout(timer));
}

/**
 * Polls `condition` until it returns true, failing after the deadline.
 * @param {string} what
 * @param {() => boolean | Promise<boolean>} condition
 */
export async function waitUntil(what, condition) {
  const deadline = Date.now() + DEADLINE_MS;
  while (!(await condition())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((done) => setTimeout(done, 10));
  }
}

/**
 * The next `event` emitted by `emitter` that satisfies `filter`.
 * @param {any} emitter a client or a subscription
 * @param {string} event
 * @param {(value: any) => boolean} [filter]
 */
export function next(emitter, event, filter = () => true) {
  let off = () => {};
  const seen = new Promise((done) => {
    off = emitter.on(event, (/** @type {any} */ value) => {
      if (filter(value)) done(value);
    });
  });
  return within(seen, `${event} event`).finally(() => off());
}

/** A free loopback TCP port (for processes that must be restarted on the same port). */
export function freePort() {
  return new Promise((done, fail) => {
    const server = createServer();
    server.once("error", fail);
    server.listen(0, "127.0.0.1", () => {
      const { port } = /** @type {import("node:net").AddressInfo} */ (server.address());
      server.close(() => done(port));
    });
  });
}

/**
 * @param {string} command
 * @param {string[]} args
 */
function start(command, args) {
  const child = spawn(command, args, { stdio: ["ignore", "ignore", "pipe"] });
  running.add(child);
  child.once("exit", () => running.delete(child));
  return child;
}

/** A running switchboard node. */
export class Node {
  /**
   * @param {import("node:child_process").ChildProcess} child
   * @param {string[]} args
   * @param {string} publicAddress
   * @param {string} internalAddress
   * @param {string[]} logs
   */
  constructor(child, args, publicAddress, internalAddress, logs) {
    this.child = child;
    this.args = args;
    this.public = publicAddress;
    this.internal = internalAddress;
    this.logs = logs;
    this.exited = new Promise((done) => {
      if (child.exitCode !== null || child.signalCode !== null) done(undefined);
      else child.once("exit", () => done(undefined));
    });
  }

  /**
   * Starts `target/debug/switchboard` with `args` on free ports (unless `args` name them) and
   * waits for the log line that announces its bound ports.
   * @param {string[]} [args]
   */
  static async start(args = []) {
    if (!existsSync(binary)) {
      throw new Error(`${binary} is missing: run \`cargo build -p switchboard\` first`);
    }
    const listen = args.includes("--listen") ? [] : ["--listen", "127.0.0.1:0"];
    const internal = args.includes("--internal-listen") ? [] : ["--internal-listen", "127.0.0.1:0"];
    const fullArgs = [...listen, ...internal, "--log-format", "json", "--log", "info", ...args];
    const child = start(binary, fullArgs);
    /** @type {string[]} */
    const logs = [];
    const started = new Promise((done, fail) => {
      const lines = createInterface({ input: /** @type {any} */ (child.stderr) });
      lines.on("line", (line) => {
        logs.push(line);
        try {
          const fields = JSON.parse(line).fields ?? {};
          if (fields.public && fields.internal && fields.node) done(fields);
        } catch {
          // Not every line is JSON (e.g. a panic message).
        }
      });
      child.once("exit", (code, signal) => {
        fail(new Error(`switchboard exited (${code ?? signal}):\n${logs.join("\n")}`));
      });
    });
    try {
      const fields = await within(started, "switchboard to announce its ports");
      return new Node(child, args, fields.public, fields.internal, logs);
    } catch (error) {
      child.kill("SIGKILL");
      throw error;
    }
  }

  get pid() {
    return /** @type {number} */ (this.child.pid);
  }

  get wsUrl() {
    return `ws://${this.public}/ws`;
  }

  /**
   * Calls the server API on the internal port.
   * @param {string} path
   * @param {unknown} [body]
   */
  async api(path, body) {
    const response = await fetch(`http://${this.internal}${path}`, {
      method: body === undefined ? "GET" : "POST",
      headers: { "content-type": "application/json" },
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    const text = await response.text();
    if (!response.ok) throw new Error(`${path}: ${response.status} ${text}`);
    return JSON.parse(text);
  }

  /**
   * The value of one metric sample, e.g. `switchboard_closes_total{code="1013"}`; 0 if absent.
   * @param {string} sample
   */
  async metric(sample) {
    const text = await (await fetch(`http://${this.internal}/metrics`)).text();
    const line = text.split("\n").find((candidate) => candidate.startsWith(`${sample} `));
    return line ? Number(line.slice(sample.length + 1)) : 0;
  }

  /** Waits until /readyz answers 200 (with Redis: every shard connected). */
  async ready() {
    await waitUntil("the node to be ready", async () => {
      try {
        return (await fetch(`http://${this.internal}/readyz`)).ok;
      } catch {
        return false;
      }
    });
  }

  /** @param {NodeJS.Signals} signal */
  signal(signal) {
    if (this.child.exitCode === null && this.child.signalCode === null) this.child.kill(signal);
  }

  /** Stops the process (SIGSTOP) and waits until every thread of it is stopped. */
  async pause() {
    this.signal("SIGSTOP");
    const tasks = `/proc/${this.pid}/task`;
    await waitUntil("every thread to stop", () =>
      readdirSync(tasks).every((task) => {
        const stat = readFileSync(`${tasks}/${task}/stat`, "utf8");
        // The state follows the parenthesised command name.
        return stat.slice(stat.lastIndexOf(")") + 2).startsWith("T");
      }),
    );
  }

  /** Kills the process (SIGKILL, as a crash would) and waits for it to exit. */
  async kill() {
    this.signal("SIGCONT");
    this.signal("SIGKILL");
    await within(this.exited, `switchboard ${this.pid} to exit`);
  }

  /** Starts the same node again on the same ports (the port may take a moment to be free). */
  async restart() {
    await this.kill();
    const args = [...this.args, "--listen", this.public, "--internal-listen", this.internal];
    const deadline = Date.now() + DEADLINE_MS;
    for (;;) {
      try {
        return await Node.start(args);
      } catch (error) {
        if (Date.now() > deadline) throw error;
        await new Promise((done) => setTimeout(done, 50));
      }
    }
  }
}

/** A redis-server without persistence on a free loopback port. */
export class Redis {
  /**
   * @param {import("node:child_process").ChildProcess} child
   * @param {number} port
   */
  constructor(child, port) {
    this.child = child;
    this.port = port;
  }

  /** Starts redis-server; another process may take the free port first, so it tries a few. */
  static async start() {
    for (let tries = 1; ; tries++) {
      const port = await freePort();
      const child = start("redis-server", [
        "--port", String(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
      ]);
      const redis = new Redis(child, port);
      let exited = false;
      child.once("exit", () => (exited = true));
      child.once("error", () => (exited = true));
      await waitUntil("redis-server to answer", async () => exited || (await redis.cli("PING")) === "PONG");
      if (!exited) return redis;
      if (tries === 5) throw new Error("redis-server did not start (is it installed?)");
    }
  }

  get url() {
    return `redis://127.0.0.1:${this.port}`;
  }

  /**
   * Runs redis-cli against this server; resolves with its trimmed output ("" on failure).
   * @param {...string} args
   */
  cli(...args) {
    return new Promise((done) => {
      const child = spawn("redis-cli", ["-h", "127.0.0.1", "-p", String(this.port), ...args], {
        stdio: ["ignore", "pipe", "ignore"],
      });
      let output = "";
      child.stdout.on("data", (chunk) => (output += chunk));
      child.once("exit", (code) => done(code === 0 ? output.trim() : ""));
      child.once("error", () => done(""));
    });
  }

  kill() {
    this.child.kill("SIGKILL");
  }
}

/**
 * An HS256 JWT.
 * @param {string} secret
 * @param {Record<string, unknown>} claims
 */
export function jwt(secret, claims) {
  const encode = (/** @type {unknown} */ value) =>
    Buffer.from(JSON.stringify(value)).toString("base64url");
  const unsigned = `${encode({ alg: "HS256", typ: "JWT" })}.${encode(claims)}`;
  const signature = createHmac("sha256", secret).update(unsigned).digest("base64url");
  return `${unsigned}.${signature}`;
}

/** Seconds since the Unix epoch. */
export function now() {
  return Math.floor(Date.now() / 1000);
}
