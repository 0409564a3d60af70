// Falling back against the real switchboard binary, behind a proxy of the kind the fallback is
// for: an HTTP proxy (node:http, on a loopback port chosen at run time) that passes plain
// requests through to the node, streaming, but answers every WebSocket upgrade with 400, and,
// when told to, answers `/sse` with 404 as a proxy that does not route it would. The client,
// given the proxy's URL and the default transports, ends up on SSE, then on long polling, and
// works there; what it found is where its next attempt starts.

import assert from "node:assert/strict";
import { createServer, request } from "node:http";
import { test } from "node:test";

import { connect } from "../switchboard.js";
import { next, waitUntil, within } from "./harness.js";
import { nodeForSuite } from "./node-suite.js";

/** @type {import("./harness.js").Node} */
let node;
nodeForSuite((started) => {
  node = started;
});

/**
 * Starts the proxy in front of the node; `blocked` lists the paths it answers 404.
 * @param {Set<string>} blocked
 */
async function startProxy(blocked) {
  const [host, port] = node.public.split(":");
  let upgrades = 0;
  const server = createServer((incoming, answer) => {
    const path = new URL(incoming.url ?? "/", "http://proxy").pathname;
    if (blocked.has(path)) {
      answer.writeHead(404, { "content-type": "text/plain" }).end("not routed here");
      return;
    }
    const upstream = request({ host, port, path: incoming.url, method: incoming.method, headers: incoming.headers }, (response) => {
      answer.writeHead(response.statusCode ?? 502, response.headers);
      response.pipe(answer);
    });
    upstream.on("error", () => answer.destroy());
    incoming.pipe(upstream);
  });
  server.on("upgrade", (_request, socket) => {
    upgrades++;
    socket.end("HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
  });
  await new Promise((done) => server.listen(0, "127.0.0.1", () => done(undefined)));
  const { port: proxyPort } = /** @type {import("node:net").AddressInfo} */ (server.address());
  return {
    url: `ws://127.0.0.1:${proxyPort}/ws`,
    upgrades: () => upgrades,
    close: () => {
      server.closeAllConnections();
      server.close();
    },
  };
}

test("behind a proxy that refuses WebSocket, then SSE, the client falls back to SSE, then to polling", async () => {
  const blocked = new Set();
  const proxy = await startProxy(blocked);
  const clients = [];
  try {
    const client = connect(proxy.url, { user: "behind-proxy", reconnect: { initialDelayMs: 20, maxDelayMs: 100 } });
    clients.push(client);
    const connected = await within(client.ready(), "connected over SSE");
    assert.equal(connected.transport, "sse");
    assert.equal(proxy.upgrades(), 1);
    /** @type {any[]} */
    const received = [];
    await client.subscribe("proxied", (message) => received.push(message.data));
    assert.equal((await client.publish("proxied", "through the proxy")).offset, 1);
    await waitUntil("the message", () => received.length === 1);
    assert.equal(await node.metric('switchboard_sessions{transport="sse"}'), 1);

    // The proxy stops routing /sse. The session's stream ends with the node's 1000 close; the
    // next attempt starts with SSE (remembered), which fails: forgotten, and the attempt after
    // tries WebSocket, SSE, then polling, which works; the room is resubscribed with since.
    blocked.add("/sse");
    const back = next(client, "connected", (event) => event.transport === "poll");
    const resubscribed = next(client, "resubscribed");
    /** @type {any[]} */
    const attempts = [];
    client.on("reconnecting", (event) => attempts.push(event));
    await node.api("/api/publish", { room: "proxied", data: "while away" });
    await node.api("/api/disconnect", { user: "behind-proxy" });
    const again = await back;
    assert.equal(again.reconnected, true);
    assert.deepEqual(attempts.map(({ attempt, transport }) => [attempt, transport]), [[1, "sse"], [2, "websocket"]]);
    assert.equal((await resubscribed).recovered, true);
    await client.publish("proxied", "over polling");
    await waitUntil("the messages", () => received.length === 3);
    assert.deepEqual(received, ["through the proxy", "while away", "over polling"]);

    // A new client of this process starts where the last one got through: polling.
    const upgrades = proxy.upgrades();
    const another = connect(proxy.url, { user: "second" });
    clients.push(another);
    assert.equal(another.transport, "poll");
    assert.equal((await within(another.ready(), "the second client")).transport, "poll");
    assert.equal(proxy.upgrades(), upgrades, "no WebSocket tried");
  } finally {
    for (const client of clients) client.close();
    proxy.close();
  }
});

// The suite's node keeps its default 60 s idle timeout: a session left to it would stay in
// presence far longer than the 10 s these tests wait.
for (const transport of /** @type {const} */ (["poll", "sse"])) {
  test(`close() ends a ${transport} session at the node at once: the others see it leave`, async () => {
    const room = `leaving-${transport}`;
    const watcher = connect(node.wsUrl, { user: `watcher-${transport}`, transports: ["websocket"] });
    const leaver = connect(node.wsUrl, { user: `leaver-${transport}`, transports: [transport] });
    try {
      /** @type {any[]} */
      const events = [];
      await within(watcher.ready(), "the watcher connected");
      await watcher.subscribe(room, () => {}, { onPresence: (event) => events.push(event) });
      const { session } = await within(leaver.ready(), `connected over ${transport}`);
      assert.equal(leaver.transport, transport);
      await leaver.subscribe(room, () => {});
      await waitUntil("the join", () => events.some((e) => e.type === "join" && e.session === session));
      const deletes = await node.metric('switchboard_fallback_requests_total{endpoint="delete",result="ok"}');
      // Sessions of the tests before (behind their proxy, gone) may still be waiting to be reaped.
      const sessions = await node.metric(`switchboard_sessions{transport="${transport}"}`);
      leaver.close();
      await waitUntil("the leave", () => events.some((e) => e.type === "leave" && e.session === session));
      const { members } = await node.api(`/api/presence/${room}`);
      assert.deepEqual(members.map((/** @type {any} */ m) => m.user), [`watcher-${transport}`]);
      await waitUntil(`the ${transport} session gone`, async () =>
        (await node.metric(`switchboard_sessions{transport="${transport}"}`)) === sessions - 1);
      // A poll session is ended by DELETE; an SSE one by its aborted stream (no DELETE).
      const expected = transport === "poll" ? deletes + 1 : deletes;
      await waitUntil("the DELETE counted", async () =>
        (await node.metric('switchboard_fallback_requests_total{endpoint="delete",result="ok"}')) === expected);
    } finally {
      watcher.close();
      leaver.close();
    }
  });
}
