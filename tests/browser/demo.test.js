// The demo page in real headless Chromium against a real cluster: one redis-server and two
// switchboard nodes (target/debug/switchboard) on loopback ports chosen at run time. Two pages
// chat through the two nodes, the user list follows joins and leaves, and when one node dies its
// page reconnects to the other (the SDK tries the `?ws=` URLs in turn) and shows what was sent
// while it was away. Private messages (persisted direct messages) reach a user whose page was
// closed when it comes back, once, and the sender's page shows them delivered. With
// authentication on, the page connects with the token in its URL fragment, and a token without a
// `send` claim gets its private message marked "not sent"; a `?ws=` URL that is not ws:// or
// wss:// is reported on the page. Every process this starts is killed by pid at the end, pass or
// fail. Screenshots are saved to target/browser-artifacts/ (demo.png, demo-private.png).
//
// Run: tests/run.sh (after the cargo build), or `npm test` here once target/debug/switchboard
// exists. SWITCHBOARD_BIN and CHROMIUM override the binary and browser paths.

import assert from "node:assert/strict";
import { mkdirSync } from "node:fs";
import { join } from "node:path";
import { test } from "node:test";

import {
  ARTIFACTS,
  DEADLINE_MS,
  killAll,
  waitFor,
  startRedis,
  startNode,
  launchBrowser,
  sign,
  openChat,
  say,
  messageIn,
  user,
} from "./demo-page.js";

test("two pages chat through two nodes, follow presence and survive a node's death", { timeout: 180000 }, async () => {
  mkdirSync(ARTIFACTS, { recursive: true });
  const redis = await startRedis();
  const a = await startNode("node-a", redis.url);
  const b = await startNode("node-b", redis.url);

  const { context, dispose } = await launchBrowser();
  let alice;
  let bob;
  try {
    // Alice on node A, Bob on node B; each page knows both nodes.
    alice = await openChat(context, a, [b], "alice");
    await waitFor("alice's status to name node-a", async () =>
      (await alice.locator("#status").textContent()).includes("node-a as alice"),
    );
    bob = await openChat(context, b, [a], "bob");
    await user(alice, "bob").waitFor({ timeout: DEADLINE_MS });
    await messageIn(alice, "bob joined");
    await user(bob, "alice").waitFor({ timeout: DEADLINE_MS });

    // Chat across the nodes, both ways.
    await say(alice, "hello from node A");
    await messageIn(bob, "hello from node A");
    await say(bob, "hi from node B");
    await messageIn(alice, "hi from node B");

    // The cluster panel lists both nodes from $sys.stats, and marks the page's own.
    await alice.locator('#node-rows tr[data-node="node-a"].here').waitFor({ timeout: DEADLINE_MS });
    await alice.locator('#node-rows tr[data-node="node-b"]').waitFor({ timeout: DEADLINE_MS });
    await waitFor("the panel to total 2 nodes", async () => (await alice.locator("#total-nodes").textContent()) === "2 nodes");

    // A third user comes and goes: the list follows, with notices.
    const carol = await openChat(context, b, [a], "carol");
    await user(alice, "carol").waitFor({ timeout: DEADLINE_MS });
    await messageIn(alice, "carol joined");
    await carol.close();
    await user(alice, "carol").waitFor({ state: "detached", timeout: DEADLINE_MS });
    await messageIn(alice, "carol left");
    assert.equal(await alice.locator("#user-count").textContent(), "2");

    // Node A stops (SIGSTOP) so that nothing reaches Alice, Bob writes, then A dies (SIGKILL).
    a.child.kill("SIGSTOP");
    await say(bob, "sent while you were away");
    await messageIn(bob, "sent while you were away");
    a.child.kill("SIGKILL");

    // Alice's page reconnects to node B, recovers the message and keeps chatting.
    await waitFor("alice to reconnect to node-b", async () =>
      (await alice.locator("#status").textContent()).includes("node-b as alice"),
    );
    await messageIn(alice, "sent while you were away");
    await messageIn(alice, "Reconnected to node-b");
    await say(alice, "back, through node B");
    await messageIn(bob, "back, through node B");
    await user(bob, "alice").waitFor({ timeout: DEADLINE_MS });

    // Each message shows once: recovery and live delivery do not repeat one.
    assert.equal(await alice.locator("#messages li", { hasText: "sent while you were away" }).count(), 1);
    assert.equal(await alice.locator("#messages li", { hasText: "hello from node A" }).count(), 1);

    // Node A's row fades out of the panel once it stops reporting.
    await alice.locator('#node-rows tr[data-node="node-a"].stale').waitFor({ timeout: DEADLINE_MS });
    await alice.locator('#node-rows tr[data-node="node-b"].here').waitFor({ timeout: DEADLINE_MS });

    assert.deepEqual(alice.errors, [], "no script errors on alice's page");
    assert.deepEqual(bob.errors, [], "no script errors on bob's page");
    await alice.screenshot({ path: join(ARTIFACTS, "demo.png") });
  } catch (error) {
    for (const [name, page] of [["alice", alice], ["bob", bob]]) {
      if (page && !page.isClosed()) await page.screenshot({ path: join(ARTIFACTS, `failure-${name}.png`) }).catch(() => {});
    }
    throw error;
  } finally {
    await dispose();
    killAll();
  }
});

function tab(page, peer) {
  return page.locator(`#conversations [data-peer="${peer}"]`);
}

function privateMessage(page, peer, text) {
  return page.locator(`#chat ol.private[data-peer="${peer}"] li`, { hasText: text });
}

async function joinAs(page, name) {
  await page.getByLabel("Your name").fill(name);
  await page.getByRole("button", { name: "Join" }).click();
  await page.locator('#status[data-state="connected"]').waitFor({ timeout: DEADLINE_MS });
}

test("private messages reach a user who was away, once, with a delivered mark", { timeout: 180000 }, async () => {
  mkdirSync(ARTIFACTS, { recursive: true });
  const redis = await startRedis();
  const a = await startNode("node-a", redis.url);
  const b = await startNode("node-b", redis.url);

  const { context, dispose } = await launchBrowser();
  let alice;
  let bob;
  try {
    alice = await openChat(context, a, [b], "alice");
    bob = await openChat(context, b, [a], "bob");

    // Alice clicks Bob's name: a private conversation; Bob, here, gets it live and it is delivered.
    await user(alice, "bob").getByRole("button", { name: "bob" }).click();
    await tab(alice, "bob").and(alice.locator('[aria-selected="true"]')).waitFor({ timeout: DEADLINE_MS });
    assert.equal(await alice.locator("#messages").isHidden(), true, "the room's list gives way");
    await say(alice, "are you there, bob?");
    await tab(bob, "alice").locator(".unread", { hasText: "1" }).waitFor({ timeout: DEADLINE_MS });
    await privateMessage(alice, "bob", "are you there, bob?").and(alice.locator('[data-state="delivered"]')).waitFor({ timeout: DEADLINE_MS });
    assert.equal(await bob.locator("#messages li", { hasText: "are you there" }).count(), 0, "not in the room");

    // Bob's page closes; Alice writes to him anyway: stored ("sent"), not delivered.
    await bob.close();
    await user(alice, "bob").waitFor({ state: "detached", timeout: DEADLINE_MS });
    await tab(alice, "bob").and(alice.locator(".away")).waitFor({ timeout: DEADLINE_MS });
    await say(alice, "sent while you were away");
    const away = privateMessage(alice, "bob", "sent while you were away");
    await away.and(alice.locator('[data-state="sent"]')).waitFor({ timeout: DEADLINE_MS });

    // Bob comes back, through the other node (the page from node B, as before, keeps its
    // localStorage origin): the inbox brings the message, once, as new.
    bob = await openChat(context, b, [a], "bob", [a, b]);
    await waitFor("bob's page to be on node-a", async () => (await bob.locator("#status").textContent()).includes("node-a as bob"));
    await tab(bob, "alice").locator(".unread", { hasText: "1" }).waitFor({ timeout: DEADLINE_MS });
    await tab(bob, "alice").click();
    await privateMessage(bob, "alice", "sent while you were away").waitFor({ timeout: DEADLINE_MS });
    await tab(bob, "alice").locator(".unread").waitFor({ state: "hidden", timeout: DEADLINE_MS });
    assert.equal(await privateMessage(bob, "alice", "are you there, bob?").count(), 1, "the first one is kept by the page");

    // Alice sees the delivered mark, live.
    await away.and(alice.locator('[data-state="delivered"]')).waitFor({ timeout: DEADLINE_MS });
    assert.match(await away.locator(".mark").textContent(), /delivered/);

    // The server holds nothing unacknowledged for Bob.
    await waitFor("bob's inbox to be acknowledged", async () => {
      const inbox = await (await fetch(`${a.internal}/api/inbox/bob`)).json();
      return inbox.seq === 2 && inbox.acked === 2 && inbox.pending.length === 0;
    });

    // Bob reloads: the conversation is there, nothing of it is new. A message Alice sends after
    // the reload marks the point where anything redelivered would have arrived (the inbox comes
    // right after the welcome), and it alone is unread.
    await bob.reload();
    await joinAs(bob, "bob");
    await tab(bob, "alice").waitFor({ timeout: DEADLINE_MS });
    await user(alice, "bob").waitFor({ timeout: DEADLINE_MS });
    await say(alice, "after your reload");
    await tab(bob, "alice").locator(".unread", { hasText: "1" }).waitFor({ timeout: DEADLINE_MS });
    await tab(bob, "alice").click();
    await privateMessage(bob, "alice", "after your reload").waitFor({ timeout: DEADLINE_MS });
    assert.equal(await privateMessage(bob, "alice", "sent while you were away").count(), 1, "shown once after the reload");
    assert.equal(await privateMessage(bob, "alice", "are you there, bob?").count(), 1);
    await privateMessage(alice, "bob", "after your reload").and(alice.locator('[data-state="delivered"]')).waitFor({ timeout: DEADLINE_MS });
    assert.equal(await alice.locator('#chat ol.private[data-peer="bob"] li[data-state="delivered"]').count(), 3);

    assert.deepEqual(alice.errors, [], "no script errors on alice's page");
    assert.deepEqual(bob.errors, [], "no script errors on bob's page");
    await alice.screenshot({ path: join(ARTIFACTS, "demo-private.png") });
  } catch (error) {
    for (const [name, page] of [["alice", alice], ["bob", bob]]) {
      if (page && !page.isClosed()) await page.screenshot({ path: join(ARTIFACTS, `failure-private-${name}.png`) }).catch(() => {});
    }
    throw error;
  } finally {
    await dispose();
    killAll();
  }
});

test("with authentication on, the page connects with the token in its fragment", { timeout: 60000 }, async () => {
  const secret = "browser-test-secret-0123456789";
  const node = await startNode("node-auth", null, ["--jwt-secret", secret]);
  const exp = Math.floor(Date.now() / 1000) + 600;
  const { context, dispose } = await launchBrowser();
  try {
    const full = sign({ sub: "dora", exp, rooms: ["lobby", "$sys.stats"], publish: ["lobby"] }, secret);
    const page = await context.newPage();
    await page.goto(`${node.http}#token=${full}`);
    await page.locator('#status[data-state="connected"]').waitFor({ timeout: DEADLINE_MS });
    assert.match(await page.locator("#status").textContent(), /node-auth as dora/);
    assert.equal(await page.locator("#join").isHidden(), true, "no name prompt with a token");
    await user(page, "dora").waitFor({ timeout: DEADLINE_MS });
    await page.locator('#node-rows tr[data-node="node-auth"]').waitFor({ timeout: DEADLINE_MS });
    await say(page, "signed in with a token");
    await messageIn(page, "signed in with a token");

    // A token that does not allow $sys.stats still chats, and the panel says why it is empty.
    const chatOnly = sign({ sub: "eve", exp, rooms: ["lobby"], publish: ["lobby"] }, secret);
    const limited = await context.newPage();
    await limited.goto(`${node.http}#token=${chatOnly}`);
    await messageIn(limited, "signed in with a token");
    await limited.locator("#cluster-note", { hasText: "No cluster figures: forbidden" }).waitFor({ timeout: DEADLINE_MS });

    // A token without a `send` claim cannot write privately: the message is marked, with why.
    await user(page, "eve").getByRole("button", { name: "eve" }).click();
    await say(page, "a private word");
    await privateMessage(page, "eve", "a private word").and(page.locator('[data-state="failed"]')).waitFor({ timeout: DEADLINE_MS });
    await page.locator('#chat ol.private[data-peer="eve"] li.notice', { hasText: "Not sent (forbidden)" }).waitFor({ timeout: DEADLINE_MS });
    assert.equal(await tab(limited, "dora").count(), 0, "nothing reached eve");

    // A ?ws= URL that is not ws:// or wss:// is refused by the SDK's connect: the page says so.
    const misconfigured = await context.newPage();
    const errors = [];
    misconfigured.on("pageerror", (error) => errors.push(error));
    await misconfigured.goto(`${node.http}?ws=${encodeURIComponent(`${node.ws},${node.http}`)}#token=${full}`);
    await misconfigured.locator('#status[data-state="disconnected"]', { hasText: "Cannot connect" }).waitFor({ timeout: DEADLINE_MS });
    assert.match(await misconfigured.locator("#status").textContent(), /the scheme must be ws or wss/);
    assert.deepEqual(errors, [], "no script errors on the misconfigured page");
  } finally {
    await dispose();
    killAll();
  }
});
