// The switchboard demo: a chat room with presence and a live panel of the cluster, on the
// JavaScript SDK (served next to this file from clients/js). No build step.
//
// Query parameters (all optional):
//   ws=URL[,URL...]  WebSocket URLs: the first is used first, each reconnect tries the next in turn
//                    (default: /ws on the node that served the page); may be repeated
//   room=NAME        the chat room (default "lobby")
// Fragment: #token=JWT when the node has authentication on (the user id is then the token's `sub`).

import { connect } from "./switchboard.js";

const STATS_ROOM = "$sys.stats";
/** A node whose figures are older than this is shown faded, and removed after FORGET_MS. */
const STALE_MS = 3000;
const FORGET_MS = 10000;
const HISTORY_LIMIT = 50;

const params = new URLSearchParams(location.search);
const fragment = new URLSearchParams(location.hash.slice(1));
const token = fragment.get("token");
const room = params.get("room") || "lobby";
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
      const item = el("li", { textContent: user });
      item.dataset.user = user;
      const tabs = counts.get(user);
      if (tabs > 1) item.append(` ×${tabs}`);
      if (me && user === me.user) item.append(" ", el("span", { className: "you", textContent: "(you)" }));
      return item;
    }),
  );
  $("user-count").textContent = String(counts.size);
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
    client = connect(urls, token ? { token } : { user: name });
  } catch (error) {
    setStatus("disconnected", `Cannot connect: ${error.message}`);
    return;
  }
  setStatus("connecting", `Connecting to ${client.url}…`);

  client.on("connected", (event) => {
    me = { user: event.user, session: event.session, node: event.node };
    setStatus("connected", `Connected to ${event.node} as ${event.user}`);
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
  client.on("reconnecting", (event) => {
    setStatus("reconnecting", `Reconnecting to ${event.url} (attempt ${event.attempt})…`);
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
