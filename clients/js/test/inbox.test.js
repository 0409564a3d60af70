// Persisted direct messages, acks and retry with an idempotency key, against a scripted server over
// each transport: the test decides when the connection drops (after the server read a request, before it
// answered) and what the next node answers, which a real server cannot be made to do on cue.

import assert from "node:assert/strict";
import { describe, test } from "node:test";

import { connect } from "../switchboard.js";
import { TRANSPORTS, waitUntil } from "./harness.js";
import { ScriptedSocket, over, settle, welcome } from "./scripted.js";

/**
 * A welcome that announces the user's inbox.
 * @param {string} session
 * @param {{seq: number, acked: number, epoch: string}} inbox
 */
const welcomeWith = (session, inbox) => ({ ...welcome(session), inbox });

/**
 * A persisted direct message.
 * @param {number} seq
 */
const direct = (seq) => ({ type: "direct", data: `m${seq}`, from: { user: "v", session: "s9" }, seq });

/** @param {number} count */
async function socket(count) {
  await waitUntil(`socket ${count}`, () => ScriptedSocket.opened.length === count);
  return ScriptedSocket.opened[count - 1];
}

/**
 * Records how a promise settled, and how often.
 * @param {Promise<unknown>} promise
 */
function track(promise) {
  /** @type {{settled: number, value?: unknown, error?: any}} */
  const outcome = { settled: 0 };
  promise.then(
    (value) => {
      outcome.settled++;
      outcome.value = value;
    },
    (error) => {
      outcome.settled++;
      outcome.error = error;
    },
  );
  return outcome;
}

for (const transport of TRANSPORTS) {
  describe(`inboxes and retries, over ${transport}`, () => {
    test("a publish and a persisted send dropped before their answer are re-sent once with the same key", async () => {
      ScriptedSocket.opened = [];
      const client = connect("ws://switchboard.test/ws", {
        ...over(transport),
        random: () => 0,
        retry: true,
      });
      try {
        const first = await socket(1);
        await first.receive(welcome("s1"));
        const publish = track(client.publish("r", { n: 1 }));
        const send = track(client.send("bob", "hi", { persist: true, key: "mine-1" }));
        await settle();
        const [sentPublish, sentSend] = first.sent;
        assert.match(sentPublish.key, /^[0-9a-f]{32}$/);
        assert.deepEqual(sentPublish, { type: "publish", room: "r", data: { n: 1 }, key: sentPublish.key, id: 1 });
        assert.deepEqual(sentSend, { type: "send", to: "bob", data: "hi", persist: true, key: "mine-1", id: 2 });

        // The server read both, then the connection dropped before it answered.
        await first.drop(1006, "");
        await settle();
        assert.equal(publish.settled, 0, "a retried request waits for the next connection");
        assert.equal(send.settled, 0);

        const second = await socket(2);
        await second.receive(welcome("s2"));
        assert.deepEqual(second.sent, [
          { ...sentPublish, id: 3 },
          { ...sentSend, id: 4 },
        ]);
        // The first publish had landed; the send had not.
        await second.receive({ type: "reply", id: 3, offset: 7, epoch: "e1", duplicate: true });
        await second.receive({ type: "reply", id: 4, sessions: 2, seq: 5 });
        // A stray answer to an id of the dead connection changes nothing.
        await second.receive({ type: "reply", id: 1, offset: 8, epoch: "e1" });
        await settle();
        assert.deepEqual(publish, { settled: 1, value: { offset: 7, epoch: "e1", duplicate: true } });
        assert.deepEqual(send, { settled: 1, value: { sessions: 2, seq: 5, duplicate: false } });
        assert.equal(second.sent.length, 2, "each request was re-sent exactly once");
      } finally {
        client.close();
      }
    });

    test("retries survive failed attempts, stop at the window or on close, and are off by default", async () => {
      ScriptedSocket.opened = [];
      const client = connect("ws://switchboard.test/ws", {
        ...over(transport),
        random: () => 0,
        retryWindowMs: 200,
      });
      try {
        const first = await socket(1);
        await first.receive(welcome("s1"));
        const plain = track(client.publish("r", 1));
        const keyed = track(client.publish("r", 2, { key: "k2" }));
        const retried = track(client.publish("r", 3, { retry: true }));
        await settle();
        assert.equal(first.sent[0].key, undefined, "no key unless asked for");
        assert.equal(first.sent[1].key, "k2");
        await first.drop(1006, "");
        await settle();
        // Without retry, the outcome is the caller's to find out (with its key, if it gave one).
        assert.equal(plain.error?.code, "disconnected");
        assert.equal(keyed.error?.code, "disconnected");
        assert.equal(retried.settled, 0);

        // A failed attempt keeps it waiting; the window running out while still away fails it.
        await (await socket(2)).drop(1006, "");
        await waitUntil("the retry window to end", () => retried.settled === 1);
        assert.equal(retried.error.code, "disconnected");
        assert.match(retried.error.message, /retryWindowMs \(200 ms\)/);

        const third = await socket(3);
        await third.receive(welcome("s3"));
        assert.equal(third.sent.length, 0, "nothing is re-sent past its window");
        const closing = track(client.publish("r", 4, { retry: true }));
        await third.drop(1006, "");
        await settle();
        client.close();
        await settle();
        assert.equal(closing.error?.code, "disconnected");
        assert.match(closing.error.message, /stopped before publish could be retried/);
      } finally {
        client.close();
      }
    });

    test("bad keys and keys on plain sends are refused before anything is sent", async () => {
      ScriptedSocket.opened = [];
      const client = connect("ws://switchboard.test/ws", {
        ...over(transport),
        random: () => 0,
      });
      try {
        const first = await socket(1);
        await first.receive(welcome("s1"));
        await assert.rejects(client.publish("r", 1, { key: "" }), { name: "TypeError", message: /1 to 64 bytes.*not 0/ });
        // 22 three-byte characters: 66 bytes.
        await assert.rejects(client.publish("r", 1, { key: "€".repeat(22) }), { name: "TypeError", message: /not 66/ });
        await assert.rejects(client.send("u", 1, { key: "k" }), { name: "TypeError", message: /need persist: true/ });
        await assert.rejects(client.send("u", 1, { persist: true, key: /** @type {any} */ (7) }), TypeError);
        await assert.rejects(client.ack(-1), TypeError);
        assert.equal(first.sent.length, 0);
        // 64 bytes is allowed.
        track(client.publish("r", 1, { key: "k".repeat(64) }));
        assert.equal(first.last.key, "k".repeat(64));
      } finally {
        client.close();
      }
    });

    test("the inbox after welcome arrives as direct events with seq, each once, and autoAck coalesces", async () => {
      ScriptedSocket.opened = [];
      const client = connect("ws://switchboard.test/ws", {
        ...over(transport),
        random: () => 0,
        autoAck: true,
      });
      /** @type {any[]} */
      const directs = [];
      /** @type {any[]} */
      const connected = [];
      /** @type {any[]} */
      const errors = [];
      client.on("direct", (event) => directs.push(event));
      client.on("connected", (event) => connected.push(event));
      client.on("error", (error) => errors.push(error));
      /** @param {ScriptedSocket} ws */
      const acks = (ws) => ws.sent.filter((frame) => frame.type === "ack");
      try {
        const first = await socket(1);
        await first.receive(welcomeWith("s1", { seq: 3, acked: 1, epoch: "i1" }));
        assert.deepEqual(connected[0].inbox, { seq: 3, acked: 1, epoch: "i1" });
        assert.equal(acks(first).length, 0, "nothing to acknowledge yet");

        // The two unacknowledged, then a live one, then a plain direct and a repeat.
        await first.receive(direct(2));
        await first.receive(direct(3));
        await first.receive(direct(4));
        await first.receive({ type: "direct", data: "plain" });
        await first.receive(direct(3));
        assert.deepEqual(directs, [
          { data: "m2", from: { user: "v", session: "s9" }, seq: 2 },
          { data: "m3", from: { user: "v", session: "s9" }, seq: 3 },
          { data: "m4", from: { user: "v", session: "s9" }, seq: 4 },
          { data: "plain" },
        ]);
        // One ack in flight; 3 and 4 wait for it and go as one.
        assert.deepEqual(acks(first), [{ type: "ack", seq: 2, id: 1 }]);
        await first.receive({ type: "reply", id: 1 });
        assert.deepEqual(acks(first).slice(1), [{ type: "ack", seq: 4, id: 2 }]);
        assert.deepEqual(client.inbox, { seq: 4, acked: 2, epoch: "i1" });

        // The connection drops before that ack's answer: the server still has 3 and 4 pending.
        await first.drop(1006, "");
        const second = await socket(2);
        await second.receive(welcomeWith("s2", { seq: 4, acked: 2, epoch: "i1" }));
        assert.deepEqual(acks(second), [{ type: "ack", seq: 4, id: 3 }], "the ack that did not land is sent again");
        await second.receive(direct(3));
        await second.receive(direct(4));
        assert.equal(directs.length, 4, "the redelivered messages were already delivered");
        await second.receive({ type: "reply", id: 3 });
        assert.deepEqual(client.inbox, { seq: 4, acked: 4, epoch: "i1" });

        // An ack the server refuses is an error event.
        await second.receive(direct(5));
        await second.receive({ type: "error", id: 4, code: "bad_frame", message: "ack 5 beyond the inbox's seq 4" });
        assert.equal(errors.length, 1);
        assert.equal(errors[0].code, "bad_frame");

        // The inbox lost its history: a new epoch starts over from its own acked.
        await second.drop(1006, "");
        const third = await socket(3);
        await third.receive(welcomeWith("s3", { seq: 1, acked: 0, epoch: "i2" }));
        assert.deepEqual(connected[2].inbox, { seq: 1, acked: 0, epoch: "i2" });
        assert.equal(acks(third).length, 0, "an ack of the old epoch means nothing in the new one");
        await third.receive(direct(1));
        assert.deepEqual(directs.at(-1), { data: "m1", from: { user: "v", session: "s9" }, seq: 1 });
        assert.deepEqual(acks(third), [{ type: "ack", seq: 1, id: 5 }]);
      } finally {
        client.close();
      }
    });

    test("ack is cumulative and manual without autoAck", async () => {
      ScriptedSocket.opened = [];
      const client = connect("ws://switchboard.test/ws", {
        ...over(transport),
        random: () => 0,
      });
      try {
        const first = await socket(1);
        await first.receive(welcomeWith("s1", { seq: 2, acked: 0, epoch: "i1" }));
        await first.receive(direct(1));
        await first.receive(direct(2));
        assert.equal(first.sent.length, 0, "no automatic ack");
        const acked = client.ack(2);
        assert.deepEqual(first.last, { type: "ack", seq: 2, id: 1 });
        await first.receive({ type: "reply", id: 1 });
        assert.equal(await acked, undefined);
        assert.deepEqual(client.inbox, { seq: 2, acked: 2, epoch: "i1" });

        const sent = client.send("bob", { hi: 1 }, { persist: true });
        assert.deepEqual(first.last, { type: "send", to: "bob", data: { hi: 1 }, persist: true, id: 2 });
        await first.receive({ type: "reply", id: 2, sessions: 0, seq: 9 });
        assert.deepEqual(await sent, { sessions: 0, seq: 9, duplicate: false });
      } finally {
        client.close();
      }
    });
  });
}
