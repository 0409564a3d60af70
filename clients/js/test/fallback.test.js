// Falling back from WebSocket to SSE to long polling, through the scripted node
// (`test/scripted.js`): which transport each attempt uses, what the page remembers, and what the
// fallback transports do on the wire (POST batching, the event-stream parser, the node's HTTP
// answers). The order of the tests matters: what a client found working is remembered for the
// whole process (this file runs in its own), as it is for a page.

import assert from "node:assert/strict";
import { test } from "node:test";

import { connect } from "../switchboard.js";
import { next, waitUntil } from "./harness.js";
import { ScriptedSocket, refusals, requests, scriptedFetch, settle, welcome } from "./scripted.js";

/** Options for the scripted node over the default transports. */
const scripted = () => ({ WebSocket: /** @type {any} */ (ScriptedSocket), fetch: scriptedFetch, random: () => 0 });

/** @param {number} count */
async function opened(count) {
  await waitUntil(`connection ${count}`, () => ScriptedSocket.opened.length >= count);
  return ScriptedSocket.opened[count - 1];
}

/**
 * What each connection's transport was, in order.
 */
const transports = () => ScriptedSocket.opened.map((connection) => connection.transport);

test("a refused WebSocket falls back to SSE at once; the next client starts there", async () => {
  ScriptedSocket.opened = [];
  const client = connect("ws://switchboard.test/ws", { user: "u", ...scripted() });
  /** @type {any[]} */
  const retries = [];
  client.on("reconnecting", (event) => retries.push(event));
  try {
    assert.equal(client.transport, "websocket");
    assert.deepEqual(client.transports, ["websocket", "sse", "poll"]);
    await (await opened(1)).refuse();
    const sse = await opened(2);
    assert.equal(sse.transport, "sse");
    assert.equal(sse.url, "http://switchboard.test/sse?user=u");
    const connected = next(client, "connected");
    await sse.receive(welcome("s1"));
    assert.deepEqual(await connected, {
      session: "s1", user: "u", node: "n1", url: "ws://switchboard.test/ws", transport: "sse", protocol: "switchboard.v1.json", reconnected: false,
    });
    assert.equal(client.transport, "sse");
    assert.equal(client.session?.transport, "sse");
    assert.deepEqual(retries, [], "falling back is part of the attempt, with no back-off");

    // Requests go as POSTs to /sse/{session} with the session's key; answers come down the stream.
    const pong = client.ping();
    assert.deepEqual(sse.last, { type: "ping", id: 1 });
    assert.ok(requests.includes("POST /sse/s1"));
    await sse.receive({ type: "pong", id: 1 });
    assert.ok((await pong) >= 0);

    // A reconnect after a lost stream starts with SSE, the transport that worked.
    await sse.drop(1006, "");
    const again = await opened(3);
    assert.equal(again.transport, "sse");
    assert.equal(retries[0].transport, "sse");
    await again.receive(welcome("s2"));
    assert.equal(client.transport, "sse");
  } finally {
    client.close();
  }

  // So does a new client of the same page.
  ScriptedSocket.opened = [];
  const second = connect("ws://switchboard.test/ws", scripted());
  try {
    await (await opened(1)).receive(welcome("s3"));
    assert.deepEqual(transports(), ["sse"]);
    assert.equal((await second.ready()).transport, "sse");
  } finally {
    second.close();
  }
});

test("a remembered transport that fails is forgotten: the next attempt starts over, and SSE refused falls back to polling", async () => {
  ScriptedSocket.opened = [];
  const client = connect("ws://switchboard.test/ws", scripted());
  /** @type {any[]} */
  const retries = [];
  client.on("reconnecting", (event) => retries.push(event));
  try {
    // SSE, remembered, fails before its welcome: one failed attempt, then from the first.
    await (await opened(1)).drop(1006, "");
    await waitUntil("the next attempt", () => retries.length === 1);
    assert.deepEqual(retries.map(({ attempt, transport }) => [attempt, transport]), [[1, "websocket"]]);
    // The WebSocket opens and is closed before a welcome (a proxy that breaks the upgrade), and
    // this node serves no SSE (404): polling it is.
    refusals.sse = 404;
    const ws = await opened(2);
    assert.equal(ws.transport, "websocket");
    await ws.drop(1006, "");
    const poll = await opened(3);
    assert.deepEqual(transports(), ["sse", "websocket", "poll"]);
    assert.ok(requests.includes("GET /sse"), "SSE was tried");
    assert.equal(poll.url, "http://switchboard.test/poll");
    await poll.receive(welcome("p1"));
    assert.equal((await client.ready()).transport, "poll");
    assert.equal(retries.length, 1);

    // Frames come in poll answers, and requests go as POSTs to /poll/{session}.
    const history = client.history("r", { limit: 1 });
    assert.deepEqual(poll.last, { type: "history", room: "r", limit: 1, id: 1 });
    assert.ok(requests.includes("POST /poll/p1"));
    await waitUntil("a poll", () => poll.polls === 1);
    await poll.receive({ type: "reply", id: 1, messages: [], offset: 0, epoch: "e" });
    assert.deepEqual(await history, { messages: [], offset: 0, epoch: "e", more: false });
    // An empty answer (the node's poll timeout) is followed by the next poll.
    await waitUntil("the next poll", () => poll.polls === 2);
    await poll.timeout();
    await waitUntil("the poll after it", () => poll.polls === 3);
    assert.equal(client.state, "connected");
  } finally {
    client.close();
    delete refusals.sse;
  }
});

test("a refusal by the node ends the attempt: the next transport is not tried", async () => {
  // What was remembered (polling) is tried first; forced to WebSocket and SSE, it is not.
  ScriptedSocket.opened = [];
  requests.length = 0;
  refusals.sse = 401;
  const client = connect("ws://switchboard.test/ws", {
    ...scripted(),
    transports: ["websocket", "sse"],
    reconnect: { maxAttempts: 1 },
  });
  try {
    const final = next(client, "disconnected");
    await (await opened(1)).refuse();
    await (await opened(2)).refuse();
    const { code, reason, willReconnect } = await final;
    assert.deepEqual({ code, willReconnect }, { code: 1006, willReconnect: false });
    assert.equal(reason, "GET /sse answered 401");
    assert.deepEqual(requests, ["GET /sse", "GET /sse"], "each attempt: WebSocket, then SSE, refused");
    assert.deepEqual(transports(), ["websocket", "websocket"]);
  } finally {
    client.close();
    delete refusals.sse;
  }
});

test("frames queued while a POST is in flight go in the next one, in order", async () => {
  ScriptedSocket.opened = [];
  const client = connect("ws://switchboard.test/ws", { ...scripted(), transports: ["sse"] });
  try {
    const sse = await opened(1);
    await sse.receive(welcome("s1"));
    for (let n = 1; n <= 5; n++) client.publish("r", n).catch(() => {});
    await settle();
    assert.deepEqual(sse.posts.map((frames) => frames.map((frame) => frame.data)), [[1], [2, 3, 4, 5]]);
    // At most 100 frames per POST (the node's bound).
    for (let n = 0; n < 250; n++) client.publish("r", n).catch(() => {});
    await settle();
    assert.deepEqual(sse.posts.slice(2).map((frames) => frames.length), [1, 100, 100, 49]);
    assert.deepEqual(
      sse.sent.map((frame) => frame.id),
      Array.from({ length: 255 }, (_, i) => i + 1),
    );
  } finally {
    client.close();
  }
});

test("POST answers: 413 splits a batch, then closes with 1009 as on a WebSocket; 429 is retried", async () => {
  ScriptedSocket.opened = [];
  const client = connect("ws://switchboard.test/ws", {
    ...scripted(),
    transports: ["poll"],
    reconnect: { initialDelayMs: 10 },
  });
  try {
    const poll = await opened(1);
    await poll.receive(welcome("p1"));
    client.publish("r", "a").catch(() => {});
    // The first POST is under way: the next two are batched; the node finds them too large together.
    client.publish("r", "b").catch(() => {});
    client.publish("r", "c").catch(() => {});
    poll.postStatuses.push(413);
    await settle();
    assert.deepEqual(poll.posts.map((frames) => frames.map((frame) => frame.data)), [["a"], ["b"], ["c"]]);

    // 429: the same frames again after Retry-After (1 s by default), nothing else meanwhile.
    poll.postStatuses.push(429);
    client.publish("r", "d").catch(() => {});
    client.publish("r", "e").catch(() => {});
    await settle();
    assert.equal(poll.posts.length, 3);
    await waitUntil("the retry", () => poll.posts.length === 5);
    assert.deepEqual(poll.posts.slice(3).map((frames) => frames.map((frame) => frame.data)), [["d"], ["e"]]);

    // One frame over the limit: the connection is closed with 1009 and the client reconnects.
    poll.postStatuses.push(413);
    const dropped = next(client, "disconnected");
    const lost = assert.rejects(client.publish("r", "x".repeat(100)), { code: "disconnected" });
    assert.deepEqual(await dropped, {
      code: 1009, reason: "a frame is over the node's size limit", willReconnect: true,
    });
    await lost;
    await opened(2);
  } finally {
    client.close();
  }
});

test("a close frame is a close: 1008 is not retried, over SSE and polling", async () => {
  for (const transport of ["sse", "poll"]) {
    ScriptedSocket.opened = [];
    const client = connect("ws://switchboard.test/ws", { ...scripted(), transports: [transport] });
    try {
      const connection = await opened(1);
      await connection.receive(welcome(`banned-${transport}`));
      const pending = assert.rejects(client.ping(), { code: "disconnected" });
      const closed = next(client, "disconnected");
      await connection.drop(1008, "banned");
      assert.deepEqual(await closed, { code: 1008, reason: "banned", willReconnect: false });
      await pending;
      assert.equal(client.state, "closed");
      assert.equal(ScriptedSocket.opened.length, 1);
    } finally {
      client.close();
    }
  }
});

test("the event stream: split chunks, CRLF, comments as heartbeats, several data lines", async () => {
  ScriptedSocket.opened = [];
  const client = connect("ws://switchboard.test/ws", { ...scripted(), transports: ["sse"] });
  /** @type {any[]} */
  const broadcasts = [];
  /** @type {any[]} */
  const errors = [];
  client.on("broadcast", (event) => broadcasts.push(event.data));
  client.on("error", (error) => errors.push(error));
  try {
    const sse = await opened(1);
    await sse.receive(welcome("s1"));
    await sse.write(':\n\ndata: {"type":"broad');
    await sse.write('cast","data":1}\r\n\r\n: a comment\nevent: ignored\nid: 7\ndata: {"type":"broadcast",\ndata:"data":2}\n');
    assert.deepEqual(broadcasts, [1]);
    // Two data lines are one event, joined by a newline (JSON allows it between tokens).
    await sse.write("\n");
    assert.deepEqual(broadcasts, [1, 2]);
    await sse.write("data: not json\n\n");
    assert.equal(errors.length, 1);
    assert.equal(errors[0].code, "bad_frame");
    assert.equal(client.state, "connected");
  } finally {
    client.close();
  }
});

test("a poll answered 429 is made again after Retry-After; one answered 404 reconnects", async () => {
  ScriptedSocket.opened = [];
  const client = connect("ws://switchboard.test/ws", {
    ...scripted(),
    transports: ["poll"],
    reconnect: { initialDelayMs: 10 },
  });
  try {
    const poll = await opened(1);
    await poll.receive(welcome("gone"));
    await waitUntil("a poll", () => poll.polls === 1);
    // Too many polls from this address: the next one waits Retry-After (1 s), the session stays.
    poll.pollStatuses.push(429);
    await poll.timeout();
    await waitUntil("the refused poll", () => poll.polls === 2);
    const refusedAt = Date.now();
    await waitUntil("the poll after Retry-After", () => poll.polls === 3);
    assert.ok(Date.now() - refusedAt >= 900, "it waited");
    assert.equal(client.state, "connected");
    // The session is reaped: the pending poll gets nothing, the next one 404.
    poll.ended = "closed";
    const dropped = next(client, "disconnected");
    await poll.timeout();
    assert.deepEqual(await dropped, {
      code: 1006, reason: "the node no longer has the session (404)", willReconnect: true,
    });
    const back = next(client, "connected");
    await (await opened(2)).receive(welcome("again"));
    assert.equal((await back).reconnected, true);
  } finally {
    client.close();
  }
});

test("a client without WebSocket in its environment goes straight to SSE; none of any transport throws", () => {
  ScriptedSocket.opened = [];
  const host = /** @type {any} */ (globalThis);
  const { WebSocket } = host;
  delete host.WebSocket;
  try {
    const client = connect("ws://switchboard.test/ws", { fetch: scriptedFetch });
    client.close();
    assert.deepEqual(client.transports, ["sse", "poll"]);
    assert.throws(() => connect("ws://switchboard.test/ws", { transports: ["websocket"] }), {
      name: "TypeError",
      message: /no WebSocket/,
    });
  } finally {
    host.WebSocket = WebSocket;
  }
  const bad = /** @type {[unknown, RegExp][]} */ ([
    [[], /non-empty array/],
    ["sse", /non-empty array/],
    [["sse", "carrier-pigeon"], /"carrier-pigeon" is not one of/],
    [["poll", "poll"], /"poll" is listed twice/],
  ]);
  for (const [transports, message] of bad) {
    assert.throws(() => connect("ws://switchboard.test/ws", { ...scripted(), transports: /** @type {any} */ (transports) }), {
      name: "TypeError",
      message,
    });
  }
  assert.equal(ScriptedSocket.opened.length, 1);
});

test("a remembered WebSocket that fails ends the attempt: its node went away, not the path to it", async () => {
  ScriptedSocket.opened = [];
  requests.length = 0;
  const client = connect("ws://switchboard.test/ws", { ...scripted(), transports: ["websocket", "sse"] });
  /** @type {any[]} */
  const retries = [];
  client.on("reconnecting", (event) => retries.push(event));
  try {
    await (await opened(1)).receive(welcome("w1"));
    assert.equal((await client.ready()).transport, "websocket");
    await (await opened(1)).drop(1006, "");
    // The attempt on the remembered WebSocket fails: no SSE on that node, the next attempt.
    await (await opened(2)).refuse();
    await waitUntil("the second attempt", () => retries.length === 2);
    assert.deepEqual(requests, [], "SSE was not tried");
    assert.deepEqual(retries.map(({ attempt, transport }) => [attempt, transport]), [[1, "websocket"], [2, "websocket"]]);
    // Forgotten: this attempt falls back.
    await (await opened(3)).refuse();
    const sse = await opened(4);
    assert.equal(sse.transport, "sse");
    await sse.receive(welcome("s4"));
    assert.equal((await client.ready()).transport, "sse");
  } finally {
    client.close();
  }
});

test("a fetch that throws at once is a failed transport like any other", async () => {
  ScriptedSocket.opened = [];
  const client = connect("ws://switchboard.test/ws", {
    ...scripted(),
    transports: ["sse", "poll"],
    requestTimeoutMs: 300,
    fetch: (input, init) => {
      if (new URL(input).pathname === "/sse") throw new TypeError("refused by a content security policy");
      return scriptedFetch(input, init);
    },
  });
  try {
    const poll = await opened(1);
    assert.equal(poll.transport, "poll");
    await poll.receive(welcome("p9"));
    assert.equal((await client.ready()).transport, "poll");
    // No welcome timer of the failed attempt is left to cut the connection that worked.
    await new Promise((done) => setTimeout(done, 500));
    assert.equal(client.state, "connected");
  } finally {
    client.close();
  }
});

test("an event stream that never ends its event is cut at 64 MiB with 1009", async () => {
  ScriptedSocket.opened = [];
  const client = connect("ws://switchboard.test/ws", { ...scripted(), transports: ["sse"] });
  try {
    const sse = await opened(1);
    await sse.receive(welcome("s1"));
    const dropped = next(client, "disconnected");
    const chunk = "x".repeat(8 * 1024 * 1024);
    await sse.write(`data: ${chunk}`);
    for (let n = 0; n < 8 && client.state === "connected"; n++) await sse.write(chunk);
    const { code, reason } = await dropped;
    assert.deepEqual({ code, reason }, { code: 1009, reason: "an event-stream event over 64 MiB" });
  } finally {
    client.close();
  }
});
