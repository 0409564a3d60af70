// Persisted direct messages, acks and idempotency keys against the real switchboard binary, over
// each transport: offline delivery, automatic acks the server records, keyed publishes, and a
// publish retried with its key through a connection the client gave up on while the node was
// stopped.

import assert from "node:assert/strict";
import { describe, test } from "node:test";

import { Node, TRANSPORTS, next, waitUntil, within } from "./harness.js";
import { nodeForSuite, opener } from "./node-suite.js";

for (const transport of TRANSPORTS) {
  const open = opener(transport);

  describe(`a node with inboxes, over ${transport}`, () => {
    /** @type {Node} */
    let node;
    nodeForSuite((started) => {
      node = started;
    });

    test("an offline user gets what was sent meanwhile, in order; acked messages are not sent again", async () => {
      const alice = open(node.wsUrl, { user: "alice" });
      await within(alice.ready(), "alice connected");
      for (let n = 1; n <= 3; n++) {
        const sent = await alice.send("bob", { n }, { persist: true });
        assert.deepEqual(sent, { sessions: 0, seq: n, duplicate: false });
      }

      const bob = open(node.wsUrl, { user: "bob", autoAck: true });
      /** @type {any[]} */
      const received = [];
      bob.on("direct", (event) => received.push(event));
      const connected = await within(bob.ready(), "bob connected");
      assert.equal(connected.inbox.seq, 3);
      assert.equal(connected.inbox.acked, 0);
      await waitUntil("the inbox", () => received.length === 3);
      assert.deepEqual(
        received.map(({ data, from, seq }) => [data.n, from.user, seq]),
        [[1, "alice", 1], [2, "alice", 2], [3, "alice", 3]],
      );
      await waitUntil("the automatic ack", async () => (await node.api("/api/inbox/bob")).acked === 3);
      bob.close();

      // Another device of bob: nothing pending, and live persisted messages carry their seq.
      const phone = open(node.wsUrl, { user: "bob" });
      const again = await within(phone.ready(), "bob's phone connected");
      assert.deepEqual(again.inbox, { seq: 3, acked: 3, epoch: connected.inbox.epoch });
      const live = next(phone, "direct");
      assert.equal((await alice.send("bob", { n: 4 }, { persist: true })).seq, 4);
      assert.deepEqual(await live, { data: { n: 4 }, from: (await live).from, seq: 4 });
      await phone.ack(4);
      assert.equal((await node.api("/api/inbox/bob")).acked, 4);
      await assert.rejects(phone.ack(5), { code: "bad_frame" });
    });

    test("a publish repeated with its key is answered with the first result", async () => {
      const client = open(node.wsUrl, { user: "keyed" });
      await within(client.ready(), "connected");
      const first = await client.publish("keyed-room", "once", { key: "k-1" });
      assert.equal(first.duplicate, false);
      const second = await client.publish("keyed-room", "once", { key: "k-1" });
      assert.deepEqual(second, { ...first, duplicate: true });
      assert.equal((await client.history("keyed-room")).messages.length, 1);
    });

    test("a publish cut off by a reconnect is retried with its key and lands once", async () => {
      const subscriber = open(node.wsUrl, { user: "reader", pingIntervalMs: 0 });
      await within(subscriber.ready(), "subscriber connected");
      /** @type {any[]} */
      const messages = [];
      await subscriber.subscribe("retried", (message) => messages.push(message));

      const publisher = open(node.wsUrl, {
        user: "writer",
        retry: true,
        requestTimeoutMs: 1500,
        pingIntervalMs: 200,
        reconnect: { initialDelayMs: 50, maxDelayMs: 200 },
      });
      await within(publisher.ready(), "publisher connected");
      const dropped = next(publisher, "disconnected");

      // The node stops; the client's ping goes first, then the publish; the unanswered ping makes
      // the client give the connection up while the publish waits for its answer.
      await node.pause();
      await new Promise((done) => setTimeout(done, 400));
      let settled = 0;
      const publishing = publisher.publish("retried", "exactly once").finally(() => settled++);
      assert.equal((await dropped).code, 1006);
      node.signal("SIGCONT");

      const answer = await within(publishing, "the retried publish's answer");
      await node.api("/api/publish", { room: "retried", data: "marker" });
      await waitUntil("the marker", () => messages.some((message) => message.data === "marker"));
      const once = messages.filter((message) => message.data === "exactly once");
      assert.equal(once.length, 1, JSON.stringify(messages));
      assert.equal(answer.offset, once[0].offset);
      assert.equal(settled, 1);
    });
  });
}
