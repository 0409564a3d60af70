// The client's bookkeeping, driven frame by frame through a scripted node (`test/scripted.js`)
// over each transport: what it sends on (re)subscribe, how it drops duplicates at the seam of a
// recovery, and which URL each attempt uses. The real-server tests cannot produce duplicates, or
// a run of failed attempts on several URLs; these can.

import assert from "node:assert/strict";
import { describe, test } from "node:test";

import { connect } from "../switchboard.js";
import { TRANSPORTS, next, waitUntil } from "./harness.js";
import { ScriptedSocket, over, welcome } from "./scripted.js";

/**
 * @param {number} offset
 * @param {string} epoch
 */
const message = (offset, epoch) => ({ type: "message", room: "r", data: offset, offset, epoch });

for (const transport of TRANSPORTS) {
  describe(`session bookkeeping, over ${transport}`, () => {
    test("a resubscribe from offset 0 delivers the replay in the room's own epoch", async () => {
      ScriptedSocket.opened = [];
      const client = connect("ws://switchboard.test/ws", {
        user: "u",
        ...over(transport),
        random: () => 0,
      });
      try {
        const [first] = ScriptedSocket.opened;
        await first.receive(welcome("s1"));
        /** @type {[number, string][]} */
        const delivered = [];
        const subscribing = client.subscribe("r", (m) => delivered.push([m.offset, m.epoch]));
        // A room without state: offset 0 and an epoch the server does not keep.
        await first.receive({ type: "reply", id: 1, room: "r", offset: 0, epoch: "unkept" });
        const subscription = await subscribing;
        await first.drop(1006, "");
        await waitUntil("a second socket", () => ScriptedSocket.opened.length === 2);
        const second = ScriptedSocket.opened[1];
        await second.receive(welcome("s2"));
        assert.deepEqual(second.last.since, { offset: 0, epoch: "unkept" });
        // Three messages were published meanwhile, in the epoch their first publish made.
        await second.receive({ type: "reply", id: second.last.id, room: "r", offset: 3, epoch: "e1", recovered: true });
        for (const offset of [1, 2, 3, 3, 4]) await second.receive(message(offset, "e1"));
        assert.deepEqual(delivered, [[1, "e1"], [2, "e1"], [3, "e1"], [4, "e1"]]);
        assert.deepEqual(subscription.position, { offset: 4, epoch: "e1" });
      } finally {
        client.close();
      }
    });

    test("resubscribes with since and presence_events, and delivers each offset once", async () => {
      ScriptedSocket.opened = [];
      const client = connect("ws://switchboard.test/ws?app=1", {
        token: "t0k",
        user: "u",
        ...over(transport),
        random: () => 0,
      });
      try {
        const [first] = ScriptedSocket.opened;
        const url = new URL(first.url);
        if (transport === "websocket") {
          assert.deepEqual([...url.searchParams], [["app", "1"], ["token", "t0k"], ["user", "u"]]);
          assert.equal(first.protocol, "switchboard.v1.json");
        } else {
          // fetch sends the token as a header, which proxies do not log.
          assert.equal(`${url.origin}${url.pathname}`, `http://switchboard.test/${transport}`);
          assert.deepEqual([...url.searchParams], [["app", "1"], ["user", "u"]]);
          assert.equal(first.headers.authorization, "Bearer t0k");
        }
        await first.receive(welcome("s1"));

        /** @type {[number, string][]} */
        const delivered = [];
        /** @type {any[]} */
        const presence = [];
        const subscribing = client.subscribe("r", (m) => delivered.push([m.offset, m.epoch]), {
          onPresence: (event) => presence.push(event),
        });
        assert.deepEqual(first.last, { type: "subscribe", room: "r", presence_events: true, id: 1 });
        await first.receive({ type: "reply", id: 1, room: "r", offset: 5, epoch: "e1" });
        const subscription = await subscribing;
        for (const offset of [5, 6, 7, 7, 6, 8]) await first.receive(message(offset, "e1"));
        await first.receive({ type: "join", room: "r", user: "v", session: "s9" });
        assert.deepEqual(presence, [{ type: "join", room: "r", user: "v", session: "s9" }]);

        // Lost connection: the in-flight request's outcome is unknown.
        const inFlight = assert.rejects(client.publish("r", 1), { code: "disconnected" });
        await first.drop(1006, "");
        await inFlight;
        await waitUntil("a second socket", () => ScriptedSocket.opened.length === 2);
        const second = ScriptedSocket.opened[1];
        const recovered = next(subscription, "resubscribed");
        await second.receive(welcome("s2"));
        assert.deepEqual(second.last, {
          type: "subscribe", room: "r", since: { offset: 8, epoch: "e1" }, presence_events: true, id: 3,
        });
        await second.receive({ type: "reply", id: 3, room: "r", offset: 10, epoch: "e1", recovered: true });
        assert.deepEqual(await recovered, { room: "r", recovered: true, offset: 10, epoch: "e1" });
        for (const offset of [9, 10, 10, 9, 11]) await second.receive(message(offset, "e1"));

        // History lost: a new epoch, and nothing at or below the reply's offset.
        await second.drop(1011, "internal error");
        await waitUntil("a third socket", () => ScriptedSocket.opened.length === 3);
        const third = ScriptedSocket.opened[2];
        const reset = next(client, "resubscribed");
        await third.receive(welcome("s3"));
        assert.deepEqual(third.last.since, { offset: 11, epoch: "e1" });
        await third.receive({ type: "reply", id: third.last.id, room: "r", offset: 20, epoch: "e2", recovered: false });
        assert.deepEqual(await reset, { room: "r", recovered: false, offset: 20, epoch: "e2" });
        for (const offset of [20, 21]) await third.receive(message(offset, "e2"));

        assert.deepEqual(delivered, [
          [6, "e1"], [7, "e1"], [8, "e1"], [9, "e1"], [10, "e1"], [11, "e1"], [21, "e2"],
        ]);
        assert.deepEqual(subscription.position, { offset: 21, epoch: "e2" });
      } finally {
        client.close();
      }
    });

    test("a resubscription the server refuses ends the subscription", async () => {
      ScriptedSocket.opened = [];
      const client = connect("ws://switchboard.test/ws", {
        ...over(transport),
        random: () => 0,
      });
      try {
        const [first] = ScriptedSocket.opened;
        await first.receive(welcome("s1"));
        const subscribing = client.subscribe("r");
        await first.receive({ type: "reply", id: first.last.id, room: "r", offset: 0, epoch: "e1" });
        const subscription = await subscribing;

        await first.drop(1001, "node draining: reconnect");
        await waitUntil("a second socket", () => ScriptedSocket.opened.length === 2);
        const second = ScriptedSocket.opened[1];
        const failed = next(client, "resubscribeFailed");
        const ended = next(subscription, "ended");
        await second.receive(welcome("s2"));
        await second.receive({ type: "error", id: second.last.id, code: "forbidden", message: "no longer allowed" });
        const { room, error } = await failed;
        assert.equal(room, "r");
        assert.equal(error.code, "forbidden");
        assert.equal((await ended).error, error);
        assert.equal(subscription.active, false);
        assert.equal(client.subscriptions.size, 0);

        // An error frame that answers no request is an `error` event.
        const unsolicited = next(client, "error");
        await second.receive({ type: "error", code: "bad_frame", message: "expected value" });
        assert.equal((await unsolicited).code, "bad_frame");
      } finally {
        client.close();
      }
    });
  });
}

test("each attempt after the first moves to the next URL, round-robin, with the same query", async () => {
  ScriptedSocket.opened = [];
  const urls = ["ws://a.test/ws?app=1", "wss://b.test:8443/ws", "ws://c.test/ws"];
  let tokens = 0;
  const client = connect(urls, {
    user: "u",
    token: () => `t${++tokens}`,
    ...over("websocket"),
    random: () => 0,
    reconnect: { overloadedDelayMs: 30 },
  });
  /** @type {any[]} */
  const connected = [];
  /** @type {any[]} */
  const retries = [];
  client.on("connected", (event) => connected.push(event));
  client.on("reconnecting", (event) => retries.push(event));
  /** @param {number} count */
  const socket = async (count) => {
    await waitUntil(`socket ${count}`, () => ScriptedSocket.opened.length === count);
    return ScriptedSocket.opened[count - 1];
  };
  /** The URL a socket was opened with, without its query, and the query. */
  const target = (/** @type {ScriptedSocket} */ { url }) => {
    const parsed = new URL(url);
    const query = [...parsed.searchParams];
    parsed.search = "";
    return [parsed.toString(), query];
  };
  try {
    assert.deepEqual(client.urls, urls);
    assert.equal(client.url, urls[0]);
    const first = await socket(1);
    assert.deepEqual(target(first), ["ws://a.test/ws", [["app", "1"], ["token", "t1"], ["user", "u"]]]);
    first.receive(welcome("s1"));
    assert.deepEqual(connected, [{ session: "s1", user: "u", node: "n1", url: urls[0], transport: "websocket", protocol: "switchboard.v1.json", reconnected: false }]);

    // The connection drops: the next attempt goes to b, whose attempt fails before a welcome,
    // then to c, whose attempt fails too, then back to a.
    first.drop(1006, "");
    assert.equal(client.url, urls[1]);
    const second = await socket(2);
    assert.deepEqual(target(second), ["wss://b.test:8443/ws", [["token", "t2"], ["user", "u"]]]);
    second.drop(1006, "");
    const third = await socket(3);
    assert.deepEqual(target(third), ["ws://c.test/ws", [["token", "t3"], ["user", "u"]]]);
    third.drop(1013, "overloaded");
    const fourth = await socket(4);
    assert.deepEqual(target(fourth), ["ws://a.test/ws", [["app", "1"], ["token", "t4"], ["user", "u"]]]);
    assert.deepEqual(
      retries.map(({ attempt, url }) => [attempt, url]),
      [[1, urls[1]], [2, urls[2]], [3, urls[0]]],
    );
    // Back-off is the same as with one URL: the 1013 floor holds from the third attempt on.
    assert.deepEqual(retries.map(({ delayMs }) => delayMs), [0, 0, 30]);
    fourth.receive(welcome("s4"));
    assert.deepEqual(connected[1], { session: "s4", user: "u", node: "n1", url: urls[0], transport: "websocket", protocol: "switchboard.v1.json", reconnected: true });
    assert.equal(client.url, urls[0]);

    // After a final close, reconnect() is the next attempt: it moves on too.
    fourth.drop(1008, "banned");
    assert.equal(client.state, "closed");
    assert.equal(client.url, urls[0]);
    client.reconnect();
    const fifth = await socket(5);
    assert.equal(target(fifth)[0], "wss://b.test:8443/ws");
    assert.equal(client.url, urls[1]);
  } finally {
    client.close();
  }
});

test("one URL is used for every attempt", async () => {
  ScriptedSocket.opened = [];
  const client = connect(["ws://only.test/ws"], {
    ...over("websocket"),
    random: () => 0,
  });
  try {
    for (let count = 1; count <= 3; count++) {
      await waitUntil(`socket ${count}`, () => ScriptedSocket.opened.length === count);
      assert.equal(ScriptedSocket.opened[count - 1].url, "ws://only.test/ws");
      assert.equal(client.url, "ws://only.test/ws");
      ScriptedSocket.opened[count - 1].drop(1006, "");
    }
  } finally {
    client.close();
  }
});

test("connect throws a TypeError for an empty list or a URL that is not ws or wss", () => {
  ScriptedSocket.opened = [];
  const options = { WebSocket: /** @type {any} */ (ScriptedSocket) };
  /** @type {[unknown, RegExp][]} */
  const cases = [
    [[], /empty/],
    ["http://node.test/ws", /scheme must be ws or wss/],
    [["ws://a.test/ws", "https://b.test/ws"], /"https:\/\/b\.test\/ws": the scheme must be ws or wss/],
    [["ws://a.test/ws", "b.test/ws"], /"b\.test\/ws": not an absolute URL/],
    [["ws://a.test/ws", 42], /42: expected a string or an array of strings/],
    [undefined, /expected a string or an array of strings/],
  ];
  for (const [url, message] of cases) {
    assert.throws(() => connect(/** @type {any} */ (url), options), (error) => {
      assert.ok(error instanceof TypeError, String(error));
      assert.match(error.message, message);
      return true;
    });
  }
  assert.equal(ScriptedSocket.opened.length, 0);
});
