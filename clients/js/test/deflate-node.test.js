// The json+deflate codec against the real switchboard binary: a ~1 KiB chat message published
// into a room reaches a subscriber on `codec: "json+deflate"` compressed (a binary frame with
// flag 1, inflated by `DecompressionStream("deflate-raw")`) and one on plain JSON as text, and
// both receive the same message; requests and their answers work over the compressed codec.

import assert from "node:assert/strict";
import { describe, test } from "node:test";

import { Node, waitUntil, within } from "./harness.js";
import { nodeForSuite, open } from "./node-suite.js";

/** @type {{url: string, protocol: string, frames: string[]}[]} every socket a recording client opened */
const recorded = [];

/** The global WebSocket, recording what each socket negotiated and how its frames came. */
class RecordingWebSocket extends /** @type {any} */ (globalThis).WebSocket {
  /** @param {any[]} args */
  constructor(...args) {
    super(...args);
    /** @type {{url: string, protocol: string, frames: string[]}} */
    const record = { url: String(args[0]), protocol: "", frames: [] };
    recorded.push(record);
    this.addEventListener("open", () => {
      record.protocol = this.protocol;
    });
    this.addEventListener("message", (/** @type {any} */ event) => {
      record.frames.push(typeof event.data === "string" ? "text" : `flag ${new Uint8Array(event.data)[0]}`);
    });
  }
}

/** A realistic chat message of about 1 KiB. */
function chatMessage() {
  const words = ["market", "open", "bid", "ask", "spread", "volume", "€", "naïve", "報告", "ok"];
  const text = Array.from({ length: 160 }, (_, i) => words[(i * 7) % words.length]).join(" ");
  return {
    kind: "chat",
    id: "3f9c2a7e-5b1d-4c0a-9e8f-1a2b3c4d5e6f",
    author: { id: "u-1842", name: "Ada Lovelace", avatar: "https://cdn.example.com/a/u-1842.png" },
    sent_at: "2026-12-05T17:00:00.000Z",
    text,
    mentions: ["u-7", "u-99"],
    reactions: { "👍": 3, "🎉": 1 },
  };
}

describe("the json+deflate codec against a node", () => {
  /** @type {Node} */
  let node;
  nodeForSuite((started) => {
    node = started;
  });

  test("a ~1 KiB room message reaches a compressed and a JSON subscriber identical", async () => {
    const zipped = open(node.wsUrl, { user: "zip", transports: ["websocket"], codec: "json+deflate", WebSocket: RecordingWebSocket });
    const plain = open(node.wsUrl, { user: "plain", transports: ["websocket"], WebSocket: RecordingWebSocket });
    const [zipConnected, plainConnected] = await within(Promise.all([zipped.ready(), plain.ready()]), "both connected");
    assert.equal(zipConnected.protocol, "switchboard.v1.json+deflate");
    assert.equal(plainConnected.protocol, "switchboard.v1.json");
    const socketOf = (/** @type {string} */ user) => {
      const found = recorded.find((record) => new URL(record.url).searchParams.get("user") === user);
      assert.ok(found, `a socket of ${user}`);
      return found;
    };
    const zipSocket = socketOf("zip");
    const plainSocket = socketOf("plain");
    assert.equal(zipSocket.protocol, "switchboard.v1.json+deflate");
    assert.equal(plainSocket.protocol, "switchboard.v1.json");

    /** @type {any[]} */
    const zipGot = [];
    /** @type {any[]} */
    const plainGot = [];
    await zipped.subscribe("chat", (message) => zipGot.push(message));
    await plain.subscribe("chat", (message) => plainGot.push(message));
    const data = chatMessage();
    const size = new TextEncoder().encode(JSON.stringify(data)).length;
    assert.ok(size > 900 && size < 1300, `about 1 KiB, not ${size} bytes`);
    const compressedBefore = zipSocket.frames.filter((kind) => kind === "flag 1").length;
    const published = await node.api("/api/publish", { room: "chat", data });
    // A small frame too, published by a client over the compressed codec.
    const small = await zipped.publish("chat", { text: "hi" });
    await waitUntil("both messages at both subscribers", () => zipGot.length === 2 && plainGot.length === 2);

    assert.deepEqual(zipGot, plainGot);
    assert.deepEqual(zipGot[0].data, data);
    assert.equal(zipGot[0].offset, published.offset);
    assert.deepEqual(zipGot[1].data, { text: "hi" });
    assert.equal(zipGot[1].offset, small.offset);
    assert.ok(
      zipSocket.frames.filter((kind) => kind === "flag 1").length > compressedBefore,
      `the large message came compressed: ${zipSocket.frames.join(" ")}`,
    );
    assert.ok(zipSocket.frames.every((kind) => kind === "flag 0" || kind === "flag 1"), zipSocket.frames.join(" "));
    assert.ok(plainSocket.frames.every((kind) => kind === "text"), plainSocket.frames.join(" "));
    assert.ok((await zipped.ping()) >= 0);
  });
});
