// The demo page's compressed codec in real headless Chromium against a real node
// (target/debug/switchboard on a loopback port chosen at run time): a page opened as is offers
// `switchboard.v1.json+deflate` and its WebSocket negotiates it, so the node's frames arrive as
// binary messages (flag byte 0 stored, 1 raw DEFLATE) that the SDK inflates with
// `DecompressionStream("deflate-raw")`; a page opened with `?codec=json` speaks plain JSON text.
// The two chat both ways, a ~1.5 KiB message included, which reaches the compressed page
// compressed. An init script wraps `window.WebSocket` to record what each socket negotiated and
// received. Every process this starts is killed by pid at the end, pass or fail. Screenshot:
// target/browser-artifacts/demo-deflate.png.
//
// Run: tests/run.sh (after the cargo build), or `npm test` here once target/debug/switchboard
// exists. SWITCHBOARD_BIN and CHROMIUM override the binary and browser paths.

import assert from "node:assert/strict";
import { mkdirSync } from "node:fs";
import { join } from "node:path";
import { test } from "node:test";

import { ARTIFACTS, DEADLINE_MS, killAll, launchBrowser, messageIn, openChat, say, startNode, user } from "./demo-page.js";

/** Runs in the page before its scripts: every WebSocket's protocol and the frames it received. */
function recordSockets() {
  const Native = window.WebSocket;
  window.sockets = [];
  window.WebSocket = class extends Native {
    constructor(...args) {
      super(...args);
      const record = { socket: this, frames: [] };
      window.sockets.push(record);
      this.addEventListener("message", (event) => {
        record.frames.push(typeof event.data === "string" ? "text" : `flag ${new Uint8Array(event.data)[0]}`);
      });
    }
  };
}

/** What each socket of `page` negotiated, and how its frames came (`text`, `flag 0`, `flag 1`). */
const sockets = (page) =>
  page.evaluate(() => window.sockets.map(({ socket, frames }) => ({ protocol: socket.protocol, frames })));

test("the page negotiates json+deflate by default and chats with a ?codec=json page", { timeout: 180000 }, async () => {
  mkdirSync(ARTIFACTS, { recursive: true });
  const node = await startNode("node-z", null);
  const { context, dispose } = await launchBrowser();
  let zip;
  let plain;
  try {
    zip = await openChat(context, node, [], "zoe", undefined, { init: recordSockets });
    await zip.locator('#status[data-protocol="switchboard.v1.json+deflate"]').waitFor({ timeout: DEADLINE_MS });
    assert.match(await zip.locator("#status").textContent(), /node-z as zoe over websocket, compressed/);
    plain = await openChat(context, node, [], "jay", undefined, { init: recordSockets, query: { codec: "json" } });
    await plain.locator('#status[data-protocol="switchboard.v1.json"]').waitFor({ timeout: DEADLINE_MS });
    assert.doesNotMatch(await plain.locator("#status").textContent(), /compressed/);

    await user(zip, "jay").waitFor({ timeout: DEADLINE_MS });
    await user(plain, "zoe").waitFor({ timeout: DEADLINE_MS });
    await say(zip, "hello from the compressed page");
    await messageIn(plain, "hello from the compressed page");
    await say(plain, "hello from the JSON page");
    await messageIn(zip, "hello from the JSON page");
    // 490 three-byte characters: a room message frame of about 1.5 KiB.
    const big = `big:${"€".repeat(490)}`;
    await say(plain, big);
    await messageIn(zip, big);
    await messageIn(plain, big);

    const [zipped] = await sockets(zip);
    assert.equal(zipped.protocol, "switchboard.v1.json+deflate");
    assert.ok(zipped.frames.every((kind) => kind === "flag 0" || kind === "flag 1"), zipped.frames.join(" "));
    assert.ok(zipped.frames.includes("flag 1"), `a compressed frame among ${zipped.frames.join(" ")}`);
    const [json] = await sockets(plain);
    assert.equal(json.protocol, "switchboard.v1.json");
    assert.ok(json.frames.length > 0 && json.frames.every((kind) => kind === "text"), json.frames.join(" "));

    assert.deepEqual(zip.errors, [], "no script errors on the compressed page");
    assert.deepEqual(plain.errors, [], "no script errors on the JSON page");
    await zip.screenshot({ path: join(ARTIFACTS, "demo-deflate.png") });
  } catch (error) {
    for (const [name, page] of [["zoe", zip], ["jay", plain]]) {
      if (page && !page.isClosed()) await page.screenshot({ path: join(ARTIFACTS, `failure-deflate-${name}.png`) }).catch(() => {});
    }
    throw error;
  } finally {
    await dispose();
    killAll();
  }
});
