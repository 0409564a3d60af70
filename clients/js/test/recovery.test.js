// Reconnect and recovery against real nodes sharing a real redis-server, so room history
// survives a node restart, over each transport: missed messages arrive in order exactly once, or
// the room is reported `recovered: false` when its history was lost.

import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";

import { connect } from "../switchboard.js";
import { Node, Redis, TRANSPORTS, next, waitUntil, within } from "./harness.js";

for (const transport of TRANSPORTS) {
  describe(`a drained node restarts, over ${transport}`, () => {
    /** @type {Redis} */
    let redis;
    /** @type {Node} */
    let nodeA;
    /** @type {Node} */
    let nodeB;

    before(async () => {
      redis = await Redis.start();
      const args = ["--redis", redis.url, "--drain-grace-ms", "0"];
      [nodeA, nodeB] = await Promise.all([Node.start(args), Node.start(args)]);
      await Promise.all([nodeA.ready(), nodeB.ready()]);
    });

    after(async () => {
      await Promise.all([nodeA?.kill(), nodeB?.kill()]);
      redis?.kill();
    });

    test("after the node restarts, each room resumes with since: recovered or reported", async () => {
      const client = connect(nodeA.wsUrl, {
        transports: [transport],
        user: "resumer",
        reconnect: { initialDelayMs: 20, drainingDelayMs: 20, maxDelayMs: 200 },
      });
      try {
        const first = await within(client.ready(), "connected");

        /** @type {any[]} */
        const kept = [];
        /** @type {any[]} */
        const gapped = [];
        const keptRoom = await client.subscribe("kept", (message) => kept.push(message));
        const gappedRoom = await client.subscribe("gapped", (message) => gapped.push(message));
        await nodeA.api("/api/publish", { room: "kept", data: 1 });
        await nodeA.api("/api/publish", { room: "kept", data: 2 });
        // The client has seen the gapped room's epoch (a room's epoch is made by its first publish).
        await nodeA.api("/api/publish", { room: "gapped", data: "seen" });
        await waitUntil("the live messages", () => kept.length === 2 && gapped.length === 1);
        const epochBefore = gapped[0].epoch;

        // SIGTERM drains the node: its sessions are closed with 1001, then it exits.
        const dropped = next(client, "disconnected");
        nodeA.signal("SIGTERM");
        assert.deepEqual(await dropped, {
          code: 1001,
          reason: "node draining: reconnect",
          willReconnect: true,
        });
        await within(nodeA.exited, "the drained node to exit");

        // While the client is away, publish through the other node.
        for (const data of [3, 4, 5]) await nodeB.api("/api/publish", { room: "kept", data });
        await nodeB.api("/api/publish", { room: "gapped", data: "lost" });
        // The room's stream and history are wiped (see docs/architecture.md for the keys): its
        // epoch changes, so the missed message cannot be recovered.
        assert.equal(await redis.cli("DEL", "sb:r:gapped:meta", "sb:r:gapped:log"), "2");

        /** @type {Map<string, any>} */
        const resubscribed = new Map();
        client.on("resubscribed", (event) => resubscribed.set(event.room, event));
        const gapReported = next(gappedRoom, "resubscribed");
        const back = next(client, "connected");
        nodeA = await nodeA.restart();
        const again = await back;
        assert.equal(again.reconnected, true);
        assert.notEqual(again.session, first.session);

        await waitUntil("both rooms resubscribed", () => resubscribed.size === 2);
        assert.deepEqual(resubscribed.get("kept"), {
          room: "kept",
          recovered: true,
          offset: 5,
          epoch: keptRoom.epoch,
        });
        const gap = await gapReported;
        assert.equal(gap.recovered, false);
        assert.equal(gap.offset, 0);
        assert.notEqual(gap.epoch, epochBefore);
        assert.equal(gappedRoom.recovered, false);
        assert.deepEqual(gappedRoom.position, { offset: 0, epoch: gap.epoch });

        // Live messages after the recovered ones, on the restarted node.
        await nodeA.api("/api/publish", { room: "kept", data: 6 });
        await nodeA.api("/api/publish", { room: "gapped", data: "after" });
        await waitUntil("the live messages after the reconnect", () => kept.length >= 6 && gapped.length >= 2);
        assert.deepEqual(
          kept.map((message) => [message.offset, message.data]),
          [[1, 1], [2, 2], [3, 3], [4, 4], [5, 5], [6, 6]],
        );
        // Only what came after the reply, in the new epoch.
        const after = gapped.slice(1);
        assert.deepEqual(
          after.map((message) => [message.offset, message.data]),
          [[1, "after"]],
        );
        assert.notEqual(after[0].epoch, epochBefore);
        assert.deepEqual(keptRoom.position, { offset: 6, epoch: keptRoom.epoch });
      } finally {
        client.close();
      }
    });
  });
}
