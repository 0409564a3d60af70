// The compressed codec (`switchboard.v1.json+deflate`) through a scripted node: what the client
// offers, stored and compressed frames, the order frames are handed on in when one inflates
// slower than the next, frames that cannot be decoded, and a frame that inflates past the bound.

import assert from "node:assert/strict";
import { afterEach, describe, test } from "node:test";
import { deflateRawSync } from "node:zlib";

import { connect } from "../switchboard.js";
import { next, waitUntil } from "./harness.js";
import { ScriptedSocket, deflated, over, settle, welcome } from "./scripted.js";

/**
 * @param {number} offset
 * @param {string} [text]
 */
const message = (offset, text = "") => ({ type: "message", room: "r", data: { offset, text }, offset, epoch: "e1" });

/** The first scripted socket, welcomed, with the client subscribed to room "r" at offset 0. */
async function subscribed(/** @type {import("../switchboard.js").Client} */ client) {
  const [socket] = ScriptedSocket.opened;
  await socket.receive(welcome("s1"));
  /** @type {any[]} */
  const delivered = [];
  const subscribing = client.subscribe("r", (m) => delivered.push(m.data));
  await socket.receiveDeflated({ type: "reply", id: 1, room: "r", offset: 0, epoch: "e1" });
  await subscribing;
  return { socket, delivered };
}

const Original = globalThis.DecompressionStream;
afterEach(() => {
  globalThis.DecompressionStream = Original;
  ScriptedSocket.supported = ["switchboard.v1.json", "switchboard.v1.json+deflate"];
});

describe("the json+deflate codec", () => {
  test("offers the compressed subprotocol, then JSON, and reads stored and compressed frames", async () => {
    ScriptedSocket.opened = [];
    const client = connect("ws://switchboard.test/ws", { user: "u", ...deflated() });
    try {
      const connected = next(client, "connected");
      const { socket, delivered } = await subscribed(client);
      assert.deepEqual(socket.offered, ["switchboard.v1.json+deflate", "switchboard.v1.json"]);
      assert.equal(socket.binaryType, "arraybuffer");
      assert.equal((await connected).protocol, "switchboard.v1.json+deflate");
      assert.equal(client.session?.protocol, "switchboard.v1.json+deflate");

      const big = "é€ a chat line that repeats ".repeat(40);
      await socket.receive(message(1, "stored"));
      await socket.receiveDeflated(message(2, big));
      // Text frames stay readable on the compressed codec (the protocol allows either).
      socket.onmessage({ data: JSON.stringify(message(3, "text")) });
      await waitUntil("three messages", () => delivered.length === 3);
      assert.deepEqual(delivered, [{ offset: 1, text: "stored" }, { offset: 2, text: big }, { offset: 3, text: "text" }]);

      // Requests go as JSON text frames.
      const pong = client.ping();
      assert.deepEqual(socket.last, { type: "ping", id: 2 });
      await socket.receiveDeflated({ type: "pong", id: 2 });
      assert.ok((await pong) >= 0);
    } finally {
      client.close();
    }
  });

  test("a node that knows only JSON is spoken to in JSON", async () => {
    ScriptedSocket.opened = [];
    ScriptedSocket.supported = ["switchboard.v1.json"];
    const client = connect("ws://switchboard.test/ws", { user: "u", ...deflated() });
    try {
      const [socket] = ScriptedSocket.opened;
      const connected = next(client, "connected");
      await socket.receive(welcome("s1"));
      assert.equal((await connected).protocol, "switchboard.v1.json");
      // On plain JSON a binary frame is unreadable, as it always was.
      const error = next(client, "error");
      await socket.receiveBinary(1, deflateRawSync("{}"));
      assert.match((await error).message, /binary frame on the JSON subprotocol/);
    } finally {
      client.close();
    }
  });

  test("the default codec offers only JSON", async () => {
    ScriptedSocket.opened = [];
    const client = connect("ws://switchboard.test/ws", { user: "u", ...over("websocket") });
    try {
      assert.equal(ScriptedSocket.opened[0].offered, "switchboard.v1.json");
      assert.equal(ScriptedSocket.opened[0].protocol, "switchboard.v1.json");
    } finally {
      client.close();
    }
    assert.throws(() => connect("ws://switchboard.test/ws", { ...over("websocket"), codec: /** @type {any} */ ("msgpack") }), {
      name: "TypeError",
      message: 'codec "msgpack": expected "json" or "json+deflate"',
    });
  });

  test("frames are inflated one at a time and handed on in arrival order", async () => {
    ScriptedSocket.opened = [];
    const client = connect("ws://switchboard.test/ws", { user: "u", ...deflated() });
    try {
      const { socket, delivered } = await subscribed(client);
      // The next stream made (message 1's) holds its output until released.
      /** @type {() => void} */
      let release = () => {};
      const held = new Promise((done) => {
        release = () => done(undefined);
      });
      let made = 0;
      globalThis.DecompressionStream = class {
        /** @param {any} format */
        constructor(format) {
          const inner = new Original(format);
          const slow = made++ === 0;
          this.writable = inner.writable;
          this.readable = inner.readable.pipeThrough(
            new TransformStream({
              async transform(chunk, controller) {
                if (slow) await held;
                controller.enqueue(chunk);
              },
            }),
          );
        }
      };
      await socket.receiveDeflated(message(1, "slow"));
      await socket.receiveDeflated(message(2, "fast"));
      await socket.receive(message(3, "stored"));
      await socket.receive(message(4, "stored"));
      await waitUntil("message 1's stream", () => made === 1);
      await settle();
      assert.equal(made, 1, "message 2 waits for message 1 before it inflates");
      assert.deepEqual(delivered, [], "nothing overtakes message 1");
      release();
      await waitUntil("four messages", () => delivered.length === 4);
      assert.deepEqual(delivered.map((data) => data.offset), [1, 2, 3, 4]);
      assert.equal(made, 2);
      // With the queue empty again, a stored frame is handed on at once.
      socket.onmessage({ data: new Uint8Array([0, ...new TextEncoder().encode(JSON.stringify(message(5)))]).buffer });
      assert.equal(delivered.length, 5);
    } finally {
      client.close();
    }
  });

  test("a recovery over compressed frames resubscribes with since and delivers each offset once", async () => {
    ScriptedSocket.opened = [];
    const client = connect("ws://switchboard.test/ws", { user: "u", ...deflated(), random: () => 0 });
    try {
      const { socket, delivered } = await subscribed(client);
      for (const offset of [1, 2]) await socket.receiveDeflated(message(offset, "live"));
      await waitUntil("two messages", () => delivered.length === 2);
      await socket.drop(1006, "");
      await waitUntil("a second socket", () => ScriptedSocket.opened.length === 2);
      const second = ScriptedSocket.opened[1];
      await second.receive(welcome("s2"));
      assert.deepEqual(second.last.since, { offset: 2, epoch: "e1" });
      await second.receiveDeflated({ type: "reply", id: second.last.id, room: "r", offset: 4, epoch: "e1", recovered: true });
      // The replay overlaps what was delivered, and the live stream overlaps the replay.
      for (const offset of [2, 3, 4, 4, 5]) second.receiveDeflated(message(offset, "again"));
      await waitUntil("five messages", () => delivered.length === 5);
      assert.deepEqual(delivered.map((data) => data.offset), [1, 2, 3, 4, 5]);
    } finally {
      client.close();
    }
  });

  test("a close waits for the frames before it", async () => {
    ScriptedSocket.opened = [];
    const client = connect("ws://switchboard.test/ws", { user: "u", ...deflated(), reconnect: { enabled: false } });
    try {
      const { socket, delivered } = await subscribed(client);
      /** @type {string[]} */
      const seen = [];
      client.on("disconnected", ({ code }) => seen.push(`closed ${code}`));
      const subscription = client.subscriptions.get("r");
      subscription?.on("message", (m) => seen.push(`message ${m.offset}`));
      socket.receiveDeflated(message(1, "x".repeat(5000)));
      await socket.drop(1001, "draining");
      await waitUntil("the close", () => seen.length === 2);
      assert.deepEqual(seen, ["message 1", "closed 1001"]);
      assert.equal(delivered.length, 1);
    } finally {
      client.close();
    }
  });

  test("a frame that cannot be decoded is reported and skipped; the connection goes on", async () => {
    ScriptedSocket.opened = [];
    const client = connect("ws://switchboard.test/ws", { user: "u", ...deflated() });
    try {
      const { socket, delivered } = await subscribed(client);
      /** @type {string[]} */
      const errors = [];
      client.on("error", (error) => errors.push(`${error.code}: ${error.message}`));
      const corrupt = deflateRawSync(JSON.stringify(message(9)));
      await socket.receiveBinary(1, Uint8Array.of(0xff, 0xfe, 0x00, 0x12));
      await socket.receiveBinary(1, corrupt.subarray(0, corrupt.length - 4));
      await socket.receiveBinary(7, "{}");
      await socket.receiveBinary(undefined, new Uint8Array(0));
      await socket.receiveBinary(0, Uint8Array.of(0x22, 0xc3, 0x28, 0x22));
      await socket.receiveBinary(1, deflateRawSync("{not json"));
      await socket.receiveDeflated(message(1, "after"));
      await waitUntil("the message after", () => delivered.length === 1);
      assert.deepEqual(delivered, [{ offset: 1, text: "after" }]);
      assert.equal(errors.length, 6, errors.join("\n"));
      for (const error of errors) assert.match(error, /^bad_frame: unreadable frame: /);
      assert.match(errors[0], /compressed frame/);
      assert.match(errors[1], /compressed frame/);
      assert.match(errors[2], /flag byte 7 on the compressed subprotocol/);
      assert.match(errors[3], /an empty binary frame on the compressed subprotocol/);
      assert.match(errors[4], /stored frame/);
      assert.equal(client.state, "connected");
    } finally {
      client.close();
    }
  });

  test("a frame that inflates past 64 MiB ends the connection with 1009, and the client reconnects", async () => {
    ScriptedSocket.opened = [];
    const client = connect("ws://switchboard.test/ws", { user: "u", ...deflated(), random: () => 0 });
    try {
      const { socket } = await subscribed(client);
      const disconnected = next(client, "disconnected");
      // 65 MiB of spaces in a JSON string: about 65 KiB compressed.
      const bomb = deflateRawSync(Buffer.concat([Buffer.from('{"type":"message","data":"'), Buffer.alloc(65 << 20, 0x20), Buffer.from('"}')]));
      assert.ok(bomb.length < 1 << 20);
      await socket.receiveBinary(1, bomb);
      const event = await disconnected;
      assert.equal(event.code, 1009);
      assert.match(event.reason, /over 64 MiB once inflated/);
      assert.equal(event.willReconnect, true);
      assert.equal(socket.readyState, 3, "the socket is closed");
      await waitUntil("a second socket", () => ScriptedSocket.opened.length === 2);
      // Exactly 64 MiB is within the bound.
      const second = ScriptedSocket.opened[1];
      await second.receive(welcome("s2"));
      const pong = client.ping();
      const { id } = second.last;
      const padding = (64 << 20) - JSON.stringify({ type: "pong", id, pad: "" }).length;
      await second.receiveBinary(1, deflateRawSync(JSON.stringify({ type: "pong", id, pad: " ".repeat(padding) })));
      assert.ok((await pong) >= 0);
    } finally {
      client.close();
    }
  });
});
