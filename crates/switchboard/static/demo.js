// The switchboard demo: a chat room with presence, private conversations and a live panel of
// the cluster, on the JavaScript SDK (served next to this file from clients/js). No build step.
//
// Private messages are persisted direct messages (`send(user, data, {persist: true})`): the
// recipient gets them live, or after the welcome of their next connection when they were away.
// Their page acknowledges each one (`ack(seq)`) and, once the server took the ack, sends a
// persisted `{type: "delivered", ids}` receipt back, which the sender's page shows as the
// "delivered" mark (live, or when the sender comes back). Each page keeps its private
// conversations in localStorage, per user, so a reload shows them again without new marks.
//
// Query parameters (all optional):
//   ws=URL[,URL...]  WebSocket URLs: the first is used first, each reconnect tries the next in turn
//                    (default: /ws on the node that served the page); may be repeated
//   room=NAME        the chat room (default "lobby")
//   transport=NAME   force one transport: websocket, sse or poll (default: WebSocket, falling back
//                    to SSE, then long polling, when it cannot connect)
//   codec=NAME       the WebSocket's codec: json+deflate (default: compressed frames from the
//                    node, plain JSON from a node without it) or json
// Fragment: #token=JWT when the node has authentication on (the user id is then the token's `sub`).

import { connect } from "./switchboard.js";

const STATS_ROOM = "$sys.stats";
/** A node whose figures are older than this is shown faded, and removed after FORGET_MS. */
const STALE_MS = 3000;
const FORGET_MS = 10000;
const HISTORY_LIMIT = 50;
/** Private messages kept per conversation in localStorage. */
const PRIVATE_KEEP = 100;
/** Message ids per delivery receipt, so a receipt stays a small frame. */
const RECEIPT_IDS = 100;

const params = new URLSearchParams(location.search);
const fragment = new URLSearchParams(location.hash.slice(1));
const token = fragment.get("token");
const room = params.get("room") || "lobby";
const transport = params.get("transport");
const codec = params.get("codec") || "json+deflate";
const defaultUrl = `${location.protocol === "https:" ? "wss:" : "ws:"}//${location.host}/ws`;
const urls = params
  .getAll("ws")
  .flatMap((value) => value.split(","))
  .map((value) => value.trim())
  .filter(Boolean);
if (urls.length === 0) urls.push(defaultUrl);

const $ = (id) => document.getElementById(id);
const el = (tag, props = {}, ...children) => {
  const node = Object.assign(document.createElement(tag), props);
  node.append(...children);
  return node;
};

let client = null;
let me = null; // { user, session, node } of the current connection
/** session id -> user id, for the room's presence. */
const members = new Map();
/** "epoch:offset" of every message shown, so history, recovery and live never repeat one. */
const shown = new Set();
/** node id -> { stats, seen } from $sys.stats. */
const nodes = new Map();
/** peer user id -> { entries, list, tab, badge, unread, items }: one private conversation. */
const conversations = new Map();
/** The conversation on screen: null for the room, else the peer's user id. */
let current = null;
/** localStorage key of the private conversations of the connected user. */
let storeKey = null;
/** Acknowledgements of the inbox: the highest seq handled in `epoch`, whether an ack is in
 *  flight, and the receipts (peer -> message ids) to send once it has landed. */
const acks = { epoch: null, wanted: 0, busy: false, receipts: new Map() };

// ----- status line ---------------------------------------------------------------------------

function setStatus(state, text) {
  const status = $("status");
  status.dataset.state = state;
  status.textContent = text;
}

// ----- chat ----------------------------------------------------------------------------------

function scrollToEnd() {
  const list = $("messages");
  list.scrollTop = list.scrollHeight;
}

function timeOf(date) {
  return el("time", { dateTime: date.toISOString(), textContent: date.toLocaleTimeString() });
}

function showMessage(message) {
  const key = `${message.epoch}:${message.offset}`;
  if (shown.has(key)) return;
  shown.add(key);
  const text = typeof message.data?.text === "string" ? message.data.text : JSON.stringify(message.data);
  const who = message.from?.user ?? "server";
  const item = el("li", {}, el("span", { className: "who", textContent: who }), text);
  item.dataset.offset = String(message.offset);
  if (me && message.from?.user === me.user) item.classList.add("mine");
  const sent = typeof message.data?.at === "number" ? new Date(message.data.at) : null;
  if (sent) item.append(timeOf(sent));
  $("messages").append(item);
  scrollToEnd();
}

function notice(text) {
  $("messages").append(el("li", { className: "notice", textContent: text }, timeOf(new Date())));
  scrollToEnd();
}

// ----- presence ------------------------------------------------------------------------------

function usersOf(map) {
  return new Set(map.values());
}

function renderUsers() {
  const counts = new Map();
  for (const user of members.values()) counts.set(user, (counts.get(user) ?? 0) + 1);
  const list = $("users");
  list.replaceChildren(
    ...[...counts.keys()].sort().map((user) => {
      const item = el("li");
      item.dataset.user = user;
      if (me && user === me.user) {
        item.append(user);
      } else {
        const open = el("button", { type: "button", className: "user-link", textContent: user });
        open.title = `Private conversation with ${user}`;
        open.addEventListener("click", () => selectConversation(openConversation(user).peer));
        item.append(open);
      }
      const tabs = counts.get(user);
      if (tabs > 1) item.append(` ×${tabs}`);
      if (me && user === me.user) item.append(" ", el("span", { className: "you", textContent: "(you)" }));
      return item;
    }),
  );
  $("user-count").textContent = String(counts.size);
  for (const conversation of conversations.values()) {
    const away = !counts.has(conversation.peer);
    conversation.tab.classList.toggle("away", away);
    conversation.tab.title = away
      ? `${conversation.peer} is not in #${room}: messages wait in their inbox`
      : `${conversation.peer} is in #${room}`;
  }
}

/** Applies a join or leave; announces users that appear or disappear (not sessions). */
function applyPresence(event) {
  const before = usersOf(members);
  if (event.type === "join") members.set(event.session, event.user);
  else members.delete(event.session);
  announce(before);
  renderUsers();
}

function announce(before) {
  const after = usersOf(members);
  for (const user of after) if (!before.has(user) && user !== me?.user) notice(`${user} joined`);
  for (const user of before) if (!after.has(user) && user !== me?.user) notice(`${user} left`);
}

/** Replaces the member list with the room's presence (after every (re)subscribe: events
 *  missed while away are not replayed). */
async function reloadPresence(announceChanges) {
  const { members: list } = await client.presence(room);
  const before = usersOf(members);
  members.clear();
  for (const member of list) members.set(member.session, member.user);
  if (announceChanges) announce(before);
  renderUsers();
}

// ----- private conversations ---------------------------------------------------------------

/** Ranks of a private message's states: a merge keeps the furthest one. A failed send may still
 *  have been stored (its answer was lost), so a receipt can raise it to delivered. */
const RANK = { sending: 0, failed: 1, unconfirmed: 1, sent: 2, delivered: 3, received: 3 };
const MARKS = {
  sending: ["sending…", "not stored yet"],
  unconfirmed: ["not confirmed", "the page closed before the server answered"],
  failed: ["not sent", "the server refused it"],
  sent: ["✓ sent", "stored in the recipient's inbox"],
  delivered: ["✓✓ delivered", "the recipient's page received and acknowledged it"],
};

function randomId() {
  // getRandomValues, unlike randomUUID, also works on plain-http pages that are not localhost.
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return [...bytes].map((byte) => byte.toString(16).padStart(2, "0")).join("");
}

/** The conversation with `peer`, made (with its tab and list) when there is none. */
function openConversation(peer) {
  const existing = conversations.get(peer);
  if (existing) return existing;
  const badge = el("span", { className: "badge unread", textContent: "0" });
  badge.hidden = true;
  const tab = el("button", { type: "button", className: "tab" }, `@${peer}`, badge);
  tab.setAttribute("role", "tab");
  tab.setAttribute("aria-selected", "false");
  tab.dataset.peer = peer;
  const list = el("ol", { className: "messages private" });
  list.setAttribute("aria-label", `Private messages with ${peer}`);
  list.setAttribute("aria-live", "polite");
  list.dataset.peer = peer;
  list.hidden = true;
  const conversation = { peer, entries: [], list, tab, badge, unread: 0, items: new Map() };
  tab.addEventListener("click", () => selectConversation(peer));
  conversations.set(peer, conversation);
  $("conversations").append(tab);
  $("composer").before(list);
  renderUsers();
  return conversation;
}

/** Shows the room (`peer` null) or the conversation with `peer`; its unread count goes. */
function selectConversation(peer) {
  current = peer;
  $("tab-room").setAttribute("aria-selected", String(peer === null));
  $("messages").hidden = peer !== null;
  for (const conversation of conversations.values()) {
    const selected = conversation.peer === peer;
    conversation.tab.setAttribute("aria-selected", String(selected));
    conversation.list.hidden = !selected;
    if (selected) {
      conversation.unread = 0;
      conversation.badge.hidden = true;
      conversation.list.scrollTop = conversation.list.scrollHeight;
    }
  }
  $("text").placeholder = peer === null ? "Write a message" : `Private message to ${peer}`;
  if (!$("text").disabled) $("text").focus();
}

function setMark(item, state) {
  item.dataset.state = state;
  const mark = item.querySelector(".mark");
  if (!mark) return;
  const [text, title] = MARKS[state] ?? [state, ""];
  mark.textContent = text;
  mark.title = title;
}

/** Adds `entry` ({id, from, text, at, state}) to the conversation's list. */
function renderEntry(conversation, entry) {
  const item = el("li", {}, el("span", { className: "who", textContent: entry.from }), entry.text);
  item.dataset.id = entry.id;
  if (typeof entry.at === "number") item.append(timeOf(new Date(entry.at)));
  if (entry.from === me?.user) {
    item.classList.add("mine");
    item.append(el("span", { className: "mark" }));
  }
  setMark(item, entry.state);
  conversation.items.set(entry.id, item);
  conversation.list.append(item);
  conversation.list.scrollTop = conversation.list.scrollHeight;
}

function setState(conversation, entry, state) {
  if (RANK[state] < RANK[entry.state]) return;
  entry.state = state;
  const item = conversation.items.get(entry.id);
  if (item) setMark(item, state);
  saveConversations();
}

function privateNotice(conversation, text) {
  conversation.list.append(el("li", { className: "notice", textContent: text }, timeOf(new Date())));
  conversation.list.scrollTop = conversation.list.scrollHeight;
}

function readStored(key) {
  try {
    const value = JSON.parse(localStorage.getItem(key) ?? "{}");
    return value && typeof value === "object" && !Array.isArray(value) ? value : {};
  } catch {
    return {};
  }
}

function validEntry(entry) {
  return (
    entry && typeof entry.id === "string" && typeof entry.from === "string" &&
    typeof entry.text === "string" && entry.state in RANK
  );
}

/** Entries of `stored` and `mine` by id, in order of arrival, each in its furthest state. */
function mergeEntries(stored, mine) {
  const byId = new Map();
  for (const entry of [...stored, ...mine]) {
    if (!validEntry(entry)) continue;
    const have = byId.get(entry.id);
    if (!have) byId.set(entry.id, { ...entry });
    else if (RANK[entry.state] > RANK[have.state]) have.state = entry.state;
  }
  return [...byId.values()].slice(-PRIVATE_KEEP);
}

/** Writes the conversations, merged with what another tab of the same user may have written. */
function saveConversations() {
  if (!storeKey) return;
  const stored = readStored(storeKey);
  for (const [peer, conversation] of conversations) {
    stored[peer] = mergeEntries(Array.isArray(stored[peer]) ? stored[peer] : [], conversation.entries);
  }
  try {
    localStorage.setItem(storeKey, JSON.stringify(stored));
  } catch {
    // Storage may be off or full; the conversations then last as long as the page.
  }
}

/** Shows the stored conversations of `user` (none of them unread). */
function loadConversations(user) {
  storeKey = `switchboard-demo-private:${user}`;
  for (const [peer, entries] of Object.entries(readStored(storeKey))) {
    if (!Array.isArray(entries)) continue;
    const conversation = openConversation(peer);
    for (const entry of mergeEntries(entries, [])) {
      if (conversation.items.has(entry.id)) continue;
      // A send whose answer never came: it may or may not be in the inbox.
      if (entry.state === "sending") entry.state = "unconfirmed";
      conversation.entries.push(entry);
      renderEntry(conversation, entry);
    }
  }
}

async function sendPrivate(peer, text) {
  const conversation = openConversation(peer);
  const entry = { id: randomId(), from: me.user, text, at: Date.now(), state: "sending" };
  conversation.entries.push(entry);
  renderEntry(conversation, entry);
  saveConversations();
  try {
    // The id is the idempotency key: a retry through a reconnect stores it once.
    await client.send(peer, { type: "private", id: entry.id, text, at: entry.at }, { persist: true, key: entry.id, retry: true });
    setState(conversation, entry, "sent");
  } catch (error) {
    setState(conversation, entry, "failed");
    privateNotice(conversation, `Not sent (${error.code}): ${error.message}`);
  }
}

function receivePrivate(peer, data) {
  const conversation = openConversation(peer);
  // Already stored: shown before a reload whose ack had not landed; not new again.
  if (conversation.items.has(data.id)) return;
  const at = typeof data.at === "number" ? data.at : Date.now();
  const entry = { id: data.id, from: peer, text: data.text, at, state: "received" };
  conversation.entries.push(entry);
  renderEntry(conversation, entry);
  if (current !== peer) {
    conversation.unread += 1;
    conversation.badge.textContent = String(conversation.unread);
    conversation.badge.hidden = false;
  }
  saveConversations();
}

function markDelivered(peer, ids) {
  const conversation = conversations.get(peer);
  if (!conversation) return;
  const wanted = new Set(ids);
  for (const entry of conversation.entries) {
    if (entry.from === me.user && wanted.has(entry.id)) setState(conversation, entry, "delivered");
  }
}

function onDirect({ data, from, seq }) {
  const peer = from?.user;
  let receipt = null;
  if (peer && data?.type === "delivered" && Array.isArray(data.ids)) {
    markDelivered(peer, data.ids.filter((id) => typeof id === "string"));
  } else if (peer && data?.type === "private" && typeof data.id === "string" && typeof data.text === "string") {
    receivePrivate(peer, data);
    receipt = data.id;
  } else {
    // Sent by a backend (POST /api/send) or another program: shown in the room's list.
    notice(`Direct message${peer ? ` from ${peer}` : ""}: ${JSON.stringify(data)}`);
  }
  if (seq !== undefined) acknowledge(seq, peer, receipt);
}

/** Notes a persisted direct as handled: it is acknowledged, then its sender gets a receipt. */
function acknowledge(seq, peer, id) {
  const epoch = client.inbox?.epoch ?? null;
  if (epoch !== acks.epoch) {
    acks.epoch = epoch;
    acks.wanted = 0;
  }
  acks.wanted = Math.max(acks.wanted, seq);
  if (peer && id) {
    if (!acks.receipts.has(peer)) acks.receipts.set(peer, new Set());
    acks.receipts.get(peer).add(id);
  }
  flushAcks();
}

/** One ack of the highest seq handled at a time (acks are cumulative); the receipts of what it
 *  covers go once the server took it. An ack lost with the connection is sent after the next
 *  welcome, from the `connected` listener: the SDK does not hand redelivered seqs over again. */
async function flushAcks() {
  const inbox = client?.inbox;
  if (!inbox || acks.busy || client.state !== "connected") return;
  if (inbox.epoch !== acks.epoch) {
    // The inbox was lost (a new epoch): nothing of the old one is left to acknowledge.
    acks.epoch = inbox.epoch;
    acks.wanted = 0;
  }
  const seq = acks.wanted;
  const receipts = acks.receipts;
  if (seq <= inbox.acked && receipts.size === 0) return;
  acks.receipts = new Map();
  acks.busy = true;
  try {
    if (seq > inbox.acked) await client.ack(seq);
  } catch {
    for (const [peer, ids] of receipts) {
      if (!acks.receipts.has(peer)) acks.receipts.set(peer, new Set());
      for (const id of ids) acks.receipts.get(peer).add(id);
    }
    return;
  } finally {
    acks.busy = false;
  }
  for (const [peer, ids] of receipts) sendReceipts(peer, [...ids]);
  flushAcks();
}

function sendReceipts(peer, ids) {
  for (let start = 0; start < ids.length; start += RECEIPT_IDS) {
    const data = { type: "delivered", ids: ids.slice(start, start + RECEIPT_IDS) };
    client.send(peer, data, { persist: true, retry: true }).catch((error) => {
      privateNotice(openConversation(peer), `Could not tell ${peer} it was delivered (${error.code}): ${error.message}`);
    });
  }
}

// ----- cluster panel -------------------------------------------------------------------------

function onStats(message) {
  const stats = message.data;
  if (!stats || typeof stats.node !== "string") return;
  nodes.set(stats.node, { stats, seen: Date.now() });
  renderNodes();
}

function formatRate(value) {
  return Number.isFinite(value) ? (value >= 100 ? value.toFixed(0) : value.toFixed(1)) : "–";
}

function formatUptime(seconds) {
  if (!Number.isFinite(seconds)) return "–";
  if (seconds < 60) return `${seconds}s`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)}m`;
  if (seconds < 86400) return `${Math.floor(seconds / 3600)}h`;
  return `${Math.floor(seconds / 86400)}d`;
}

function renderNodes() {
  const now = Date.now();
  let live = 0;
  let connections = 0;
  let rateIn = 0;
  let rateOut = 0;
  const rows = [];
  for (const [id, { stats, seen }] of [...nodes].sort(([a], [b]) => a.localeCompare(b))) {
    const age = now - seen;
    if (age > FORGET_MS) {
      nodes.delete(id);
      continue;
    }
    const stale = age > STALE_MS;
    if (!stale) {
      live += 1;
      connections += stats.connections ?? 0;
      rateIn += stats.messages_in_per_sec ?? 0;
      rateOut += stats.messages_out_per_sec ?? 0;
    }
    const row = el(
      "tr",
      {},
      el("th", { scope: "row", textContent: id }),
      el("td", { textContent: String(stats.connections ?? "–") }),
      el("td", { textContent: formatRate(stats.messages_in_per_sec) }),
      el("td", { textContent: formatRate(stats.messages_out_per_sec) }),
      el("td", { textContent: formatUptime(stats.uptime_secs) }),
    );
    row.dataset.node = id;
    if (stale) {
      row.classList.add("stale");
      row.title = `no figures for ${Math.round(age / 1000)} s`;
    }
    if (me && id === me.node) row.classList.add("here");
    rows.push(row);
  }
  $("node-rows").replaceChildren(...rows);
  $("total-nodes").textContent = `${live} node${live === 1 ? "" : "s"}`;
  $("total-connections").textContent = String(connections);
  $("total-in").textContent = formatRate(rateIn);
  $("total-out").textContent = formatRate(rateOut);
}

// ----- connection ----------------------------------------------------------------------------

async function start(name) {
  $("join").hidden = true;
  $("chat").hidden = false;
  $("room-name").textContent = room;
  // The SDK tries the URLs in turn, one per attempt, so a page whose node dies moves to another.
  try {
    client = connect(urls, {
      ...(token ? { token } : { user: name }),
      ...(transport && { transports: [transport] }),
      codec,
    });
  } catch (error) {
    setStatus("disconnected", `Cannot connect: ${error.message}`);
    return;
  }
  setStatus("connecting", `Connecting to ${client.url} over ${client.transport}…`);

  client.on("connected", (event) => {
    me = { user: event.user, session: event.session, node: event.node };
    if (storeKey === null) loadConversations(event.user);
    flushAcks();
    const compressed = event.protocol === "switchboard.v1.json+deflate" ? ", compressed" : "";
    setStatus("connected", `Connected to ${event.node} as ${event.user} over ${event.transport}${compressed}`);
    $("status").dataset.transport = event.transport;
    $("status").dataset.protocol = event.protocol;
    $("text").disabled = false;
    $("send").disabled = false;
    if (event.reconnected) notice(`Reconnected to ${event.node}`);
    renderUsers();
    renderNodes();
  });
  client.on("disconnected", (event) => {
    $("text").disabled = true;
    $("send").disabled = true;
    const why = event.reason ? `${event.code} ${event.reason}` : String(event.code);
    if (event.willReconnect) {
      setStatus("reconnecting", `Connection lost (${why}), reconnecting…`);
      notice("Connection lost, reconnecting…");
    } else {
      setStatus("disconnected", `Disconnected (${why})`);
    }
  });
  client.on("direct", onDirect);
  client.on("reconnecting", (event) => {
    setStatus("reconnecting", `Reconnecting to ${event.url} over ${event.transport} (attempt ${event.attempt})…`);
  });

  try {
    await client.ready();
    // Live messages that arrive while the history loads wait, so the chat stays in order.
    let pending = [];
    const chat = await client.subscribe(
      room,
      (message) => (pending ? pending.push(message) : showMessage(message)),
      { presenceEvents: true, onPresence: applyPresence },
    );
    const history = await client.history(room, { limit: HISTORY_LIMIT });
    for (const message of history.messages) showMessage(message);
    for (const message of pending) showMessage(message);
    pending = null;
    await reloadPresence(false);
    chat.on("resubscribed", async (event) => {
      try {
        if (!event.recovered) {
          notice("Some messages may be missing; showing the latest.");
          const latest = await client.history(room, { limit: HISTORY_LIMIT });
          for (const message of latest.messages) showMessage(message);
        }
        await reloadPresence(true);
      } catch {
        // The connection dropped again; the next resubscription reloads both.
      }
    });
  } catch (error) {
    notice(`Could not join ${room}: ${error.code ?? ""} ${error.message}`);
    if (error.code === "forbidden") notice("With authentication on, the token's rooms must allow this room.");
  }
  try {
    await client.subscribe(STATS_ROOM, onStats);
  } catch (error) {
    $("cluster-note").textContent = `No cluster figures: ${error.code ?? ""} ${error.message}`;
  }
}

$("composer").addEventListener("submit", async (event) => {
  event.preventDefault();
  const input = $("text");
  const text = input.value.trim();
  if (!text || !client) return;
  input.value = "";
  if (current !== null) {
    await sendPrivate(current, text);
    input.focus();
    return;
  }
  try {
    await client.publish(room, { text, at: Date.now() });
  } catch (error) {
    input.value = text;
    notice(`Not sent (${error.code}): ${error.message}`);
  }
  input.focus();
});

$("join-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const name = $("name").value.trim();
  if (!name) return;
  try {
    localStorage.setItem("switchboard-demo-name", name);
  } catch {
    // Storage may be off (private mode); the name is only a convenience.
  }
  start(name).then(() => $("text").focus());
});

$("tab-room").addEventListener("click", () => selectConversation(null));

setInterval(renderNodes, 1000);

if (token) {
  start(null);
} else {
  try {
    $("name").value = localStorage.getItem("switchboard-demo-name") ?? "";
  } catch {
    // As above.
  }
  $("name").focus();
}
