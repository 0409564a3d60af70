// What the demo page's browser tests share: real switchboard nodes and redis-server on loopback
// ports chosen at run time (every process is killed by pid when the test process ends, pass or
// fail), headless Chromium with a fresh profile, and helpers that drive the page.

import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { createHmac } from "node:crypto";
import { mkdtempSync, rmSync } from "node:fs";
import net from "node:net";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { createInterface } from "node:readline";
import { after } from "node:test";
import { fileURLToPath } from "node:url";

import { chromium } from "playwright-core";

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), "../..");
const BINARY = process.env.SWITCHBOARD_BIN ?? join(ROOT, "target/debug/switchboard");
const BROWSER = process.env.CHROMIUM ?? "/usr/bin/chromium";
export const ARTIFACTS = join(ROOT, "target/browser-artifacts");
/** How long any single expected event may take. */
export const DEADLINE_MS = 15000;
/** Short, so that a killed node's sessions leave presence quickly. */
const NODE_TTL_MS = 1500;

const children = new Set();

export function killAll() {
  for (const child of children) {
    if (child.exitCode === null && child.signalCode === null) child.kill("SIGKILL");
  }
  children.clear();
}
process.on("exit", killAll);
after(killAll);

function track(child) {
  children.add(child);
  child.on("exit", () => children.delete(child));
  return child;
}

/** Resolves when `predicate` returns a truthy value, polling; rejects after the deadline. */
export async function waitFor(what, predicate, ms = DEADLINE_MS) {
  const deadline = Date.now() + ms;
  for (;;) {
    const value = await predicate();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((done) => setTimeout(done, 50));
  }
}

function freePort() {
  return new Promise((done, fail) => {
    const server = net.createServer();
    server.on("error", fail);
    server.listen(0, "127.0.0.1", () => {
      const { port } = server.address();
      server.close(() => done(port));
    });
  });
}

function redisPing(port) {
  return new Promise((done) => {
    const socket = net.connect(port, "127.0.0.1");
    let answer = "";
    socket.on("data", (chunk) => {
      answer += chunk;
      if (answer.includes("\r\n")) {
        socket.destroy();
        done(answer.startsWith("+PONG"));
      }
    });
    socket.on("error", () => done(false));
    socket.on("connect", () => socket.write("PING\r\n"));
  });
}

export async function startRedis() {
  const port = await freePort();
  const child = track(
    spawn("redis-server", ["--port", String(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"], {
      stdio: "ignore",
    }),
  );
  await waitFor("redis-server to answer", async () => {
    if (child.exitCode !== null) throw new Error(`redis-server exited with ${child.exitCode}`);
    return redisPing(port);
  });
  return { child, url: `redis://127.0.0.1:${port}` };
}

/** Starts a node (with Redis when `redisUrl` is set) and resolves with its addresses once
 *  /readyz answers 200. */
export async function startNode(id, redisUrl, extraArgs = []) {
  const env = Object.fromEntries(Object.entries(process.env).filter(([key]) => !key.startsWith("SWITCHBOARD_")));
  const child = track(
    spawn(
      BINARY,
      [
        "--listen", "127.0.0.1:0",
        "--internal-listen", "127.0.0.1:0",
        ...(redisUrl ? ["--redis", redisUrl] : []),
        "--node-id", id,
        "--node-ttl-ms", String(NODE_TTL_MS),
        "--room-linger-ms", "200",
        "--log-format", "json",
        ...extraArgs,
      ],
      { env, stdio: ["ignore", "ignore", "pipe"] },
    ),
  );
  const logs = [];
  const started = new Promise((done, fail) => {
    createInterface({ input: child.stderr }).on("line", (line) => {
      logs.push(line);
      try {
        const fields = JSON.parse(line).fields ?? {};
        if (fields.public && fields.internal) done(fields);
      } catch {
        // Not a JSON log line.
      }
    });
    child.on("exit", (code) => fail(new Error(`${id} exited with ${code}: ${logs.join("\n")}`)));
  });
  let timer;
  const fields = await Promise.race([
    started,
    new Promise((_, fail) => {
      timer = setTimeout(() => fail(new Error(`${id} did not start: ${logs.join("\n")}`)), DEADLINE_MS);
    }),
  ]).finally(() => clearTimeout(timer));
  const node = {
    id,
    child,
    logs,
    http: `http://${fields.public}/`,
    ws: `ws://${fields.public}/ws`,
    internal: `http://${fields.internal}`,
  };
  await waitFor(`${id} to be ready`, async () => {
    const response = await fetch(`${node.internal}/readyz`).catch(() => null);
    return response?.ok;
  });
  return node;
}

/** Chromium with a fresh profile; `dispose` closes it and removes the profile. */
export async function launchBrowser() {
  const profile = mkdtempSync(join(tmpdir(), "switchboard-chromium-"));
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: BROWSER,
    headless: true,
    viewport: { width: 1180, height: 760 },
    args: [
      "--headless",
      "--no-sandbox",
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
    ],
  });
  const dispose = async () => {
    await context.close();
    rmSync(profile, { recursive: true, force: true });
  };
  return { context, dispose };
}

/** An HS256 JWT, as a backend would issue for the page. */
export function sign(claims, secret) {
  const encode = (value) => Buffer.from(JSON.stringify(value)).toString("base64url");
  const unsigned = `${encode({ alg: "HS256", typ: "JWT" })}.${encode(claims)}`;
  return `${unsigned}.${createHmac("sha256", secret).update(unsigned).digest("base64url")}`;
}

/** Opens `node`'s page as `name`; the page connects to `others`' nodes in turn, `node` first
 *  unless `via` gives the WebSocket nodes. `query` adds to the page's query (e.g. `transport`);
 *  `init` runs in the page before its scripts. */
export async function openChat(context, node, others, name, via = [node, ...others], { query = {}, init } = {}) {
  const page = await context.newPage();
  if (init) await page.addInitScript(init);
  const errors = [];
  page.on("pageerror", (error) => errors.push(error));
  // Connections to a dead node are expected to fail; a blocked resource never is.
  page.on("console", (message) => {
    if (message.type() === "error" && /Content Security Policy|Refused to|404/.test(message.text())) {
      errors.push(message.text());
    }
  });
  const ws = via.map((each) => each.ws).join(",");
  await page.goto(`${node.http}?${new URLSearchParams({ ws, ...query })}`);
  assert.equal(await page.locator("#chat").isHidden(), true, "the chat waits for a name");
  await page.getByLabel("Your name").fill(name);
  await page.getByRole("button", { name: "Join" }).click();
  assert.equal(await page.locator("#join").isHidden(), true, "the name prompt goes away");
  await page.locator('#status[data-state="connected"]').waitFor({ timeout: DEADLINE_MS });
  page.errors = errors;
  return page;
}

export async function say(page, text) {
  await page.getByRole("textbox", { name: "Message" }).fill(text);
  await page.getByRole("button", { name: "Send" }).click();
}

export function messageIn(page, text) {
  return page.locator("#messages li", { hasText: text }).first().waitFor({ timeout: DEADLINE_MS });
}

export function user(page, name) {
  return page.locator(`#users li[data-user="${name}"]`);
}
