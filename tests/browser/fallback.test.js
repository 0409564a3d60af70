// The demo page over the fallback transports in real headless Chromium against a real cluster
// (one redis-server and two switchboard nodes, target/debug/switchboard, on loopback ports chosen
// at run time): a page whose `window.WebSocket` is removed by an init script (as if nothing
// WebSocket could pass) falls back to SSE by itself on one node, and chats both ways with a page
// on WebSocket on the other node; a page forced to long polling with `?transport=poll` chats with
// both. Each page's status line names its transport. A page served by one node and pointed at
// another with `?ws=` chats over SSE (cross-origin: the node's CORS, the page's CSP). Every process
// this starts is killed by pid at the end, pass or fail. Screenshot:
// target/browser-artifacts/demo-sse.png.
//
// Run: tests/run.sh (after the cargo build), or `npm test` here once target/debug/switchboard
// exists. SWITCHBOARD_BIN and CHROMIUM override the binary and browser paths.

import assert from "node:assert/strict";
import { mkdirSync } from "node:fs";
import { join } from "node:path";
import { test } from "node:test";

import {
  ARTIFACTS,
  DEADLINE_MS,
  killAll,
  launchBrowser,
  messageIn,
  openChat,
  say,
  startNode,
  startRedis,
  user,
  waitFor,
} from "./demo-page.js";

/** @param {import("playwright-core").Page} page */
const status = (page) => page.locator("#status").textContent();

test("without WebSocket the page falls back to SSE; SSE, WebSocket and polling pages chat", { timeout: 180000 }, async () => {
  mkdirSync(ARTIFACTS, { recursive: true });
  const redis = await startRedis();
  const node = await startNode("node-f", redis.url);
  const other = await startNode("node-w", redis.url);
  const { context, dispose } = await launchBrowser();
  let sse;
  let ws;
  let poll;
  try {
    sse = await openChat(context, node, [], "sara", undefined, {
      init: () => {
        delete window.WebSocket;
      },
    });
    assert.equal(await sse.evaluate(() => typeof window.WebSocket), "undefined", "the init script ran");
    await sse.locator('#status[data-transport="sse"]').waitFor({ timeout: DEADLINE_MS });
    assert.match(await status(sse), /node-f as sara over sse/);

    ws = await openChat(context, other, [], "walt");
    await ws.locator('#status[data-transport="websocket"]').waitFor({ timeout: DEADLINE_MS });
    assert.match(await status(ws), /node-w as walt over websocket/);

    // Presence crosses the transports, and so does the chat, both ways.
    await user(sse, "walt").waitFor({ timeout: DEADLINE_MS });
    await user(ws, "sara").waitFor({ timeout: DEADLINE_MS });
    await say(sse, "hello over SSE");
    await messageIn(ws, "hello over SSE");
    await messageIn(sse, "hello over SSE");
    await say(ws, "hi over WebSocket");
    await messageIn(sse, "hi over WebSocket");

    poll = await openChat(context, node, [], "polly", undefined, { query: { transport: "poll" } });
    await poll.locator('#status[data-transport="poll"]').waitFor({ timeout: DEADLINE_MS });
    assert.match(await status(poll), /node-f as polly over poll/);
    await user(sse, "polly").waitFor({ timeout: DEADLINE_MS });
    await messageIn(poll, "hi over WebSocket");
    await say(poll, "and over long polling");
    await messageIn(sse, "and over long polling");
    await messageIn(ws, "and over long polling");
    await say(sse, "polly, do you read?");
    await messageIn(poll, "polly, do you read?");

    // The nodes count their sessions by transport.
    const sessions = async (where, name) => {
      const metrics = await (await fetch(`${where.internal}/metrics`)).text();
      return metrics.includes(`switchboard_sessions{transport="${name}"} 1`);
    };
    await waitFor("the sessions of each transport", async () =>
      (await sessions(node, "sse")) && (await sessions(node, "poll")) && (await sessions(other, "websocket")),
    );

    // A page that leaves is seen leaving by the others (its stream ends its session).
    assert.deepEqual(sse.errors, [], "no script errors on the SSE page");
    await sse.close();
    await user(ws, "sara").waitFor({ state: "detached", timeout: DEADLINE_MS });
    await user(poll, "sara").waitFor({ state: "detached", timeout: DEADLINE_MS });

    for (const page of [ws, poll]) assert.deepEqual(page.errors, [], "no script errors");
    await poll.screenshot({ path: join(ARTIFACTS, "demo-sse.png") });
  } catch (error) {
    for (const [name, page] of [["sse", sse], ["ws", ws], ["poll", poll]]) {
      if (page && !page.isClosed()) await page.screenshot({ path: join(ARTIFACTS, `failure-fallback-${name}.png`) }).catch(() => {});
    }
    throw error;
  } finally {
    await dispose();
    killAll();
  }
});

test("?transport= forces one transport; an unknown one is reported on the page", { timeout: 60000 }, async () => {
  const node = await startNode("node-g", null);
  const { context, dispose } = await launchBrowser();
  try {
    const forced = await openChat(context, node, [], "sid", undefined, { query: { transport: "sse" } });
    await forced.locator('#status[data-transport="sse"]').waitFor({ timeout: DEADLINE_MS });
    await say(forced, "forced to SSE");
    await messageIn(forced, "forced to SSE");

    const page = await context.newPage();
    await page.goto(`${node.http}?transport=pigeon`);
    await page.getByLabel("Your name").fill("carl");
    await page.getByRole("button", { name: "Join" }).click();
    await page.locator('#status[data-state="disconnected"]', { hasText: "Cannot connect" }).waitFor({ timeout: DEADLINE_MS });
    assert.match(await status(page), /"pigeon" is not one of/);
  } finally {
    await dispose();
    killAll();
  }
});

test("a page served by one node chats over SSE with another node (cross-origin)", { timeout: 60000 }, async () => {
  // Two standalone nodes: different ports, so different origins; the page comes from the first
  // and talks only to the second.
  const home = await startNode("node-home", null);
  const far = await startNode("node-far", null);
  const { context, dispose } = await launchBrowser();
  try {
    const crossing = await openChat(context, home, [], "cora", [far], { query: { transport: "sse" } });
    await crossing.locator('#status[data-transport="sse"]').waitFor({ timeout: DEADLINE_MS });
    assert.match(await status(crossing), /node-far as cora over sse/);
    const local = await openChat(context, far, [], "luke");
    await user(crossing, "luke").waitFor({ timeout: DEADLINE_MS });
    await user(local, "cora").waitFor({ timeout: DEADLINE_MS });
    // POSTs from the other origin (preflighted: they carry the session key) and the stream.
    await say(crossing, "hello from another origin");
    await messageIn(local, "hello from another origin");
    await say(local, "heard you");
    await messageIn(crossing, "heard you");
    const metrics = await (await fetch(`${home.internal}/metrics`)).text();
    assert.match(metrics, /^switchboard_connections 0$/m, "the page's own node holds no session");
    for (const page of [crossing, local]) assert.deepEqual(page.errors, [], "no blocked request, no script error");
  } finally {
    await dispose();
    killAll();
  }
});
