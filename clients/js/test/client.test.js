// The client against the real switchboard binary, over each transport: requests and replies,
// errors, timeouts, events, presence, and the paths that end or keep a connection.

import assert from "node:assert/strict";
import { createServer } from "node:net";
import { describe, test } from "node:test";

import { SwitchboardError } from "../switchboard.js";
import { Node, TRANSPORTS, jwt, next, now, waitUntil, within } from "./harness.js";
import { nodeForSuite, opener } from "./node-suite.js";

for (const transport of TRANSPORTS) {
  const open = opener(transport);

  describe(`a node with authentication off, over ${transport}`, () => {
    /** @type {Node} */
    let node;
    // A long-poll session has no connection whose end the node could see: a client that closed
    // leaves presence when the node reaps the session, after its idle timeout (short here).
    const reaping = ["--heartbeat-ms", "500", "--idle-timeout-ms", "2000", "--poll-timeout-ms", "1000"];
    nodeForSuite(
      (started) => {
        node = started;
      },
      transport === "poll" ? reaping : [],
    );

    test("connects, then publishes to and receives from a room", async () => {
      const client = open(node.wsUrl, { user: "alice" });
      const connected = await within(client.ready(), "connected");
      assert.equal(connected.user, "alice");
      assert.equal(connected.transport, transport);
      assert.equal(client.transport, transport);
      assert.equal(connected.reconnected, false);
      assert.match(connected.session, /^[0-9a-f]{16}$/);
      assert.equal(client.state, "connected");
      assert.equal(client.session?.user, "alice");

      /** @type {any[]} */
      const received = [];
      const subscription = await client.subscribe("lobby", (message) => received.push(message));
      assert.equal(subscription.room, "lobby");
      assert.equal(subscription.offset, 0);
      assert.match(subscription.epoch, /^[0-9a-f]+$/);
      assert.equal(subscription.active, true);
      assert.deepEqual([...client.subscriptions.keys()], ["lobby"]);

      // The room had no state: its epoch is made by the first publish.
      const published = await client.publish("lobby", { text: "hi" });
      assert.equal(published.offset, 1);
      assert.match(published.epoch, /^[0-9a-f]+$/);
      await waitUntil("the message", () => received.length === 1);
      assert.deepEqual(received[0], {
        room: "lobby",
        data: { text: "hi" },
        offset: 1,
        epoch: published.epoch,
        from: { user: "alice", session: connected.session },
      });
      assert.deepEqual(subscription.position, { offset: 1, epoch: published.epoch });

      const history = await client.history("lobby", { limit: 10 });
      assert.equal(history.offset, 1);
      assert.equal(history.more, false);
      assert.deepEqual(history.messages.map((message) => message.data), [{ text: "hi" }]);
      assert.ok((await client.ping()) >= 0);
    });

    test("concurrent requests each resolve with their own reply", async () => {
      const client = open(node.wsUrl, { user: "concurrent" });
      await within(client.ready(), "connected");
      // Room i holds i messages, so the reply to the next publish there must be offset i + 1.
      const rooms = Array.from({ length: 12 }, (_, i) => `concurrent-${i}`);
      for (const [i, room] of rooms.entries()) {
        for (let n = 0; n < i; n++) await node.api("/api/publish", { room, data: n });
      }
      const [published, presence, sent, history] = await Promise.all([
        Promise.all(rooms.map((room) => client.publish(room, room))),
        client.presence("concurrent-3"),
        client.send("nobody-here", "hello"),
        client.history("concurrent-5", { limit: 2 }),
      ]);
      assert.deepEqual(
        published.map((reply) => reply.offset),
        rooms.map((_, i) => i + 1),
      );
      assert.deepEqual(presence, { members: [] });
      assert.deepEqual(sent, { sessions: 0 });
      assert.deepEqual(history.messages.map((message) => message.offset), [5, 6]);
    });

    test("an error frame rejects its request with code and message; the connection stays", async () => {
      const client = open(node.wsUrl, { user: "errors" });
      await within(client.ready(), "connected");
      const bad = await client.publish("", 1).then(
        () => assert.fail("publishing to an empty room name succeeded"),
        (error) => error,
      );
      assert.ok(bad instanceof SwitchboardError);
      assert.equal(bad.code, "bad_frame");
      assert.ok(bad.message.length > 0);

      await assert.rejects(client.unsubscribe("never-subscribed"), { code: "not_subscribed" });
      await client.subscribe("twice");
      await assert.rejects(client.subscribe("twice"), { code: "already_subscribed" });
      assert.equal(client.state, "connected");
      assert.equal((await client.publish("twice", null)).offset, 1);
    });

    test("requests made while disconnected reject at once with code disconnected", async () => {
      const client = open(node.wsUrl, { user: "early" });
      // Before the welcome.
      await assert.rejects(client.publish("lobby", 1), { code: "disconnected" });
      await assert.rejects(client.subscribe("lobby"), { code: "disconnected" });
      assert.equal(client.subscriptions.size, 0);
      await within(client.ready(), "connected");
      /** @type {any[]} */
      const closes = [];
      client.on("disconnected", (event) => closes.push(event));
      client.close();
      client.close();
      assert.deepEqual(closes, [{ code: 1000, reason: "client closed", willReconnect: false }]);
      assert.equal(client.state, "closed");
      await assert.rejects(client.presence("lobby"), { code: "disconnected" });
      await assert.rejects(client.ready(), { code: "disconnected" });
    });

    test("unsubscribe stops delivery; close ends the subscriptions", async () => {
      const client = open(node.wsUrl, { user: "leaver" });
      await within(client.ready(), "connected");
      /** @type {unknown[]} */
      const received = [];
      const subscription = await client.subscribe("leaving", (message) => received.push(message.data));
      await node.api("/api/publish", { room: "leaving", data: 1 });
      await waitUntil("the first message", () => received.length === 1);
      await subscription.unsubscribe();
      assert.equal(subscription.active, false);
      // A second room's message is the marker: everything for "leaving" would have come before it.
      const marker = await client.subscribe("marker");
      const markerArrived = next(marker, "message");
      await node.api("/api/publish", { room: "leaving", data: 2 });
      await node.api("/api/publish", { room: "marker", data: "x" });
      await markerArrived;
      assert.deepEqual(received, [1]);

      const ended = next(marker, "ended");
      client.close();
      await ended;
      assert.equal(marker.active, false);
    });

    test("direct messages, broadcasts and presence events reach their listeners", async () => {
      const alice = open(node.wsUrl, { user: "p-alice" });
      await within(alice.ready(), "alice connected");
      /** @type {any[]} */
      const presence = [];
      const room = await alice.subscribe("presence-room", undefined, {
        onPresence: (event) => presence.push(event),
      });
      assert.equal(room.presenceEvents, true);

      const bob = open(node.wsUrl, { user: "p-bob" });
      const bobWelcome = await within(bob.ready(), "bob connected");
      const joined = next(alice, "presence", (event) => event.type === "join");
      await bob.subscribe("presence-room");
      assert.deepEqual(await joined, {
        type: "join",
        room: "presence-room",
        user: "p-bob",
        session: bobWelcome.session,
      });
      const members = (await alice.presence("presence-room")).members.map((m) => m.user).sort();
      assert.deepEqual(members, ["p-alice", "p-bob"]);

      const direct = next(alice, "direct");
      assert.deepEqual(await bob.send("p-alice", { hi: 1 }), { sessions: 1 });
      assert.deepEqual(await direct, {
        data: { hi: 1 },
        from: { user: "p-bob", session: bobWelcome.session },
      });
      const fromServer = next(alice, "direct");
      await node.api("/api/send", { user: "p-alice", data: "server" });
      assert.deepEqual(await fromServer, { data: "server" });

      const broadcast = next(bob, "broadcast");
      await node.api("/api/broadcast", { data: { note: "all" } });
      assert.deepEqual(await broadcast, { data: { note: "all" } });

      const left = next(room, "presence", (event) => event.type === "leave");
      bob.close();
      assert.equal((await left).user, "p-bob");
      assert.deepEqual(
        presence.map((event) => event.type),
        ["join", "leave"],
      );
    });

    test("a server close with 1000 is reconnected; 1008 is not", async () => {
      const client = open(node.wsUrl, {
        user: "kicked",
        reconnect: { initialDelayMs: 10, maxDelayMs: 50 },
      });
      const first = await within(client.ready(), "connected");
      await client.subscribe("kicked-room");

      const dropped = next(client, "disconnected");
      const back = next(client, "connected");
      const resubscribed = next(client, "resubscribed");
      await node.api("/api/disconnect", { user: "kicked" });
      assert.deepEqual(await dropped, {
        code: 1000,
        reason: "disconnected by the server",
        willReconnect: true,
      });
      const again = await back;
      assert.equal(again.reconnected, true);
      assert.notEqual(again.session, first.session);
      assert.deepEqual(await resubscribed, {
        room: "kicked-room",
        recovered: true,
        offset: 0,
        epoch: client.subscriptions.get("kicked-room")?.epoch,
      });

      /** @type {unknown[]} */
      const attempts = [];
      client.on("reconnecting", (event) => attempts.push(event));
      const banned = next(client, "disconnected");
      await node.api("/api/disconnect", { user: "kicked", code: 1008, reason: "banned" });
      assert.deepEqual(await banned, { code: 1008, reason: "banned", willReconnect: false });
      assert.equal(client.state, "closed");
      assert.deepEqual(attempts, []);
      await assert.rejects(client.publish("kicked-room", 1), { code: "disconnected" });

      // reconnect() starts again after a final close, with the rooms it had.
      client.reconnect();
      assert.equal((await within(client.ready(), "connected again")).reconnected, true);
      assert.deepEqual([...client.subscriptions.keys()], ["kicked-room"]);
    });
  });

  describe(`a node with authentication on, over ${transport}`, () => {
    const secret = "a-test-secret-of-enough-bytes";
    /** @type {Node} */
    let node;
    nodeForSuite(
      (started) => {
        node = started;
      },
      [
        "--jwt-secret", secret, "--jwt-leeway-secs", "0",
        "--heartbeat-ms", "200", "--idle-timeout-ms", "1000", "--poll-timeout-ms", "500",
      ],
    );

    test("the token is accepted; a room without permission is refused with forbidden", async () => {
      const token = jwt(secret, { sub: "writer", exp: now() + 600, rooms: ["news.*"], publish: ["news.public"] });
      const client = open(node.wsUrl, { token });
      assert.equal((await within(client.ready(), "connected")).user, "writer");
      await client.subscribe("news.public");
      assert.equal((await client.publish("news.public", "ok")).offset, 1);
      const error = await client.publish("news.private", "no").then(
        () => assert.fail("publish without permission succeeded"),
        (rejection) => rejection,
      );
      assert.equal(error.code, "forbidden");
      assert.match(error.message, /news\.private/);
      await assert.rejects(client.subscribe("admin"), { code: "forbidden" });
      assert.equal(client.state, "connected");
    });

    test("a token function is called for every connection attempt", async () => {
      let calls = 0;
      const client = open(node.wsUrl, {
        token: async () => {
          calls++;
          return jwt(secret, { sub: "fresh", exp: now() + 600 });
        },
        reconnect: { initialDelayMs: 10 },
      });
      await within(client.ready(), "connected");
      const back = next(client, "connected");
      await node.api("/api/disconnect", { user: "fresh" });
      await back;
      assert.equal(calls, 2);
    });

    test("a refused handshake looks like a lost connection: retried up to maxAttempts", async () => {
      const refusals = () => node.metric('switchboard_handshakes_total{result="unauthorized"}');
      const before = await refusals();
      const client = open(node.wsUrl, {
        token: jwt("another-secret-of-enough-bytes", { sub: "forger", exp: now() + 600 }),
        reconnect: { initialDelayMs: 10, maxAttempts: 2 },
      });
      /** @type {any[]} */
      const attempts = [];
      client.on("reconnecting", (event) => attempts.push(event.attempt));
      const final = await next(client, "disconnected");
      assert.equal(final.code, 1006);
      assert.equal(final.willReconnect, false);
      assert.deepEqual(attempts, [1, 2]);
      assert.equal(client.state, "closed");
      // The first connection and two retries, each refused with 401 by the node.
      assert.equal((await refusals()) - before, 3);
    });

    test("an expired token closes with 1008 and the client does not reconnect", async () => {
      const token = jwt(secret, { sub: "expiring", exp: now() + 2 });
      const client = open(node.wsUrl, { token, reconnect: { initialDelayMs: 10 } });
      /** @type {unknown[]} */
      const attempts = [];
      client.on("reconnecting", (event) => attempts.push(event));
      await within(client.ready(), "connected");
      const closed = await next(client, "disconnected");
      assert.deepEqual(closed, { code: 1008, reason: "token expired", willReconnect: false });
      assert.equal(client.state, "closed");
      assert.deepEqual(attempts, []);
    });
  });

  describe(`timeouts, over ${transport}`, () => {
    test("a request times out with code timeout; an unanswered ping reconnects", async () => {
      const node = await Node.start();
      try {
        const client = open(node.wsUrl, {
          user: "sleepy",
          requestTimeoutMs: 300,
          pingIntervalMs: 200,
          reconnect: { initialDelayMs: 10, maxDelayMs: 100 },
        });
        await within(client.ready(), "connected");
        const lost = next(client, "disconnected");
        const retrying = next(client, "reconnecting");
        await node.pause();
        const started = Date.now();
        // The node carries it out when it wakes up: a timed-out request's outcome is unknown.
        await assert.rejects(client.publish("lobby", 1), { code: "timeout" });
        assert.ok(Date.now() - started >= 290);

        // Nothing heard for pingIntervalMs, then no pong within requestTimeoutMs.
        const { code, reason, willReconnect } = await lost;
        assert.deepEqual({ code, willReconnect }, { code: 1006, willReconnect: true });
        assert.match(reason, /ping/);
        await retrying;
        await assert.rejects(client.publish("lobby", 1), { code: "disconnected" });

        const back = next(client, "connected");
        node.signal("SIGCONT");
        assert.equal((await back).reconnected, true);
        assert.equal((await client.publish("awake", 2)).offset, 1);
      } finally {
        await node.kill();
      }
    });

    test("a server that never upgrades or answers is given up after requestTimeoutMs and retried", async () => {
      /** @type {import("node:net").Socket[]} */
      const sockets = [];
      let upgrades = 0;
      const path = transport === "websocket" ? "ws" : transport;
      const server = createServer((socket) => {
        sockets.push(socket);
        socket.on("data", (chunk) => {
          if (chunk.toString().startsWith(`GET /${path}`)) upgrades++;
        });
      });
      await new Promise((done) => server.listen(0, "127.0.0.1", () => done(undefined)));
      const { port } = /** @type {import("node:net").AddressInfo} */ (server.address());
      try {
        const client = open(`ws://127.0.0.1:${port}/ws`, {
          requestTimeoutMs: 200,
          reconnect: { initialDelayMs: 10, maxAttempts: 2 },
        });
        /** @type {any[]} */
        const attempts = [];
        client.on("reconnecting", (event) => attempts.push(event));
        const final = await next(client, "disconnected");
        assert.equal(final.willReconnect, false);
        assert.match(final.reason, /no welcome within 200 ms/);
        assert.deepEqual(attempts.map((event) => event.attempt), [1, 2]);
        // The first connection and two retries (the WebSocket implementation may open spare sockets).
        assert.equal(upgrades, 3);
        await assert.rejects(client.ready(), { code: "disconnected" });
      } finally {
        for (const socket of sockets) socket.destroy();
        server.close();
      }
    });
  });
}
