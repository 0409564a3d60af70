// Failover across URLs against real nodes sharing a real redis-server, over each transport: the
// client is given both nodes' URLs; when the node it is on (holding its WebSocket, its SSE stream
// or its long-poll session) dies (SIGKILL), the next attempt goes to the other node over the same
// transport, which resubscribes the room with `since` and replays what was published meanwhile,
// once each.

import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";

import { connect } from "../switchboard.js";
import { Node, Redis, TRANSPORTS, next, waitUntil, within } from "./harness.js";

for (const transport of TRANSPORTS) {
  describe(`two nodes, one dies, over ${transport}`, () => {
    /** @type {Redis} */
    let redis;
    /** @type {Node} */
    let nodeA;
    /** @type {Node} */
    let nodeB;

    before(async () => {
      redis = await Redis.start();
      const args = ["--redis", redis.url];
      [nodeA, nodeB] = await Promise.all([Node.start(args), Node.start(args)]);
      await Promise.all([nodeA.ready(), nodeB.ready()]);
    });

    after(async () => {
      await Promise.all([nodeA?.kill(), nodeB?.kill()]);
      redis?.kill();
    });

    test("when its node dies, the client moves to the next URL and recovers the room there", async () => {
      const urls = [nodeA.wsUrl, nodeB.wsUrl];
      const client = connect(urls, {
        transports: [transport],
        user: "mover",
        reconnect: { initialDelayMs: 20, maxDelayMs: 200 },
      });
      try {
        const first = await within(client.ready(), "connected");
        assert.equal(first.url, nodeA.wsUrl);
        assert.equal(client.url, nodeA.wsUrl);

        /** @type {any[]} */
        const received = [];
        const room = await client.subscribe("moving", (message) => received.push(message));
        for (const data of [1, 2]) await nodeA.api("/api/publish", { room: "moving", data });
        await waitUntil("the live messages", () => received.length === 2);

        // Stopped first, so nothing published from now on can reach the client through node A; then
        // killed while stopped, as a crash would.
        await nodeA.pause();
        for (const data of [3, 4, 5]) await nodeB.api("/api/publish", { room: "moving", data });
        const dropped = next(client, "disconnected");
        const retrying = next(client, "reconnecting");
        const recovered = next(room, "resubscribed");
        const back = next(client, "connected");
        nodeA.signal("SIGKILL");
        await within(nodeA.exited, "node A to exit");

        const { code, willReconnect } = await dropped;
        assert.deepEqual({ code, willReconnect }, { code: 1006, willReconnect: true });
        assert.equal((await retrying).url, nodeB.wsUrl);
        const again = await back;
        assert.equal(again.url, nodeB.wsUrl);
        assert.equal(again.transport, transport);
        assert.equal(again.reconnected, true);
        assert.notEqual(again.node, first.node);
        assert.equal(client.url, nodeB.wsUrl);
        assert.equal(client.session?.node, again.node);
        assert.deepEqual(await recovered, { room: "moving", recovered: true, offset: 5, epoch: room.epoch });

        // A live message after the replayed ones, then a marker room's message: anything repeated
        // for "moving" would have come before the marker.
        const marker = await client.subscribe("moving-marker");
        await nodeB.api("/api/publish", { room: "moving", data: 6 });
        await waitUntil("the live message on node B", () => received.length >= 6);
        const markerArrived = next(marker, "message");
        await nodeB.api("/api/publish", { room: "moving-marker", data: "end" });
        await markerArrived;
        assert.deepEqual(
          received.map((message) => [message.offset, message.data]),
          [[1, 1], [2, 2], [3, 3], [4, 4], [5, 5], [6, 6]],
        );
        assert.deepEqual(room.position, { offset: 6, epoch: room.epoch });
      } finally {
        client.close();
      }
    });
  });
}
