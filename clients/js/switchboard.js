// @ts-check
// The JavaScript client of the switchboard WebSocket gateway (wire protocol v1, JSON codec, on
// WebSocket optionally compressed: `switchboard.v1.json+deflate`).
// One ES module with no dependencies: it runs in browsers and in Node (with a global WebSocket,
// or one passed as `options.WebSocket`). Where WebSocket is blocked it falls back to the node's
// SSE and long-poll transports (`fetch`). Types: switchboard.d.ts.

const SUBPROTOCOL = "switchboard.v1.json";
const DEFLATE_SUBPROTOCOL = "switchboard.v1.json+deflate";

/**
 * What the WebSocket offers for each `codec`: the compressed codec offers plain JSON after it, so
 * a node that predates it still connects (it picks the first subprotocol it knows).
 * @type {Readonly<Record<string, string | readonly string[]>>}
 */
const OFFERS = Object.freeze({
  json: SUBPROTOCOL,
  "json+deflate": Object.freeze([DEFLATE_SUBPROTOCOL, SUBPROTOCOL]),
});

/** Every transport, in the default order of preference. */
const TRANSPORTS = Object.freeze(["websocket", "sse", "poll"]);

/**
 * The transport the last connection of a client with several transports was welcomed on: for
 * the page's (or process's) lifetime, every client starts there, so a page behind a proxy that
 * breaks WebSocket does not wait for it to fail again on every connection.
 * @type {string | null}
 */
let rememberedTransport = null;

/** Close codes after which reconnecting with the same request would fail the same way. */
const FINAL_CLOSE_CODES = new Set([
  1002, // the client broke the WebSocket protocol
  1007, // the client sent invalid UTF-8
  1008, // policy: forbidden, token expired, too many bad frames, banned by the backend
]);

/** What the client reports when a connection ends without a close frame, or is given up locally. */
const ABNORMAL = 1006;

/**
 * The URLs `connect` was given, checked: one URL or a non-empty array of them, each ws: or wss:.
 * @param {unknown} url
 * @returns {readonly string[]}
 */
function checkUrls(url) {
  const urls = Array.isArray(url) ? [...url] : [url];
  if (urls.length === 0) throw new TypeError("url: the array of URLs is empty");
  for (const each of urls) {
    if (typeof each !== "string") {
      throw new TypeError(`url ${JSON.stringify(each)}: expected a string or an array of strings`);
    }
    let parsed;
    try {
      parsed = new URL(each);
    } catch {
      throw new TypeError(`url ${JSON.stringify(each)}: not an absolute URL`);
    }
    if (parsed.protocol !== "ws:" && parsed.protocol !== "wss:") {
      throw new TypeError(`url ${JSON.stringify(each)}: the scheme must be ws or wss`);
    }
  }
  return Object.freeze(urls);
}

/**
 * The `transports` option, checked: a non-empty array of distinct transport names.
 * @param {unknown} value
 * @returns {readonly string[]}
 */
function checkTransports(value) {
  if (value === undefined) return TRANSPORTS;
  const names = TRANSPORTS.map((name) => JSON.stringify(name)).join(", ");
  if (!Array.isArray(value) || value.length === 0) {
    throw new TypeError(`transports: expected a non-empty array of ${names}`);
  }
  for (const [index, name] of value.entries()) {
    if (!TRANSPORTS.includes(name)) {
      throw new TypeError(`transports: ${JSON.stringify(name)} is not one of ${names}`);
    }
    if (value.indexOf(name) !== index) throw new TypeError(`transports: ${JSON.stringify(name)} is listed twice`);
  }
  return Object.freeze([...value]);
}

/** `WebSocket.CONNECTING`, which custom constructors may not define. */
const CONNECTING = 0;

const RECONNECT_DEFAULTS = {
  enabled: true,
  initialDelayMs: 500,
  maxDelayMs: 10_000,
  multiplier: 2,
  maxAttempts: Infinity,
  drainingDelayMs: 100,
  overloadedDelayMs: 1000,
};

/** The server's bound on an idempotency `key`, in UTF-8 bytes. */
const MAX_KEY_BYTES = 64;

/**
 * Why `key` cannot be sent, or undefined when it can.
 * @param {unknown} key
 */
function keyProblem(key) {
  if (typeof key !== "string") return `key ${JSON.stringify(key)}: expected a string`;
  const bytes = new TextEncoder().encode(key).length;
  if (bytes < 1 || bytes > MAX_KEY_BYTES) {
    return `key ${JSON.stringify(key)}: must be 1 to ${MAX_KEY_BYTES} bytes of UTF-8, not ${bytes}`;
  }
  return undefined;
}

/** A fresh idempotency key: 128 random bits in hex (getRandomValues works on insecure pages too). */
function generateKey() {
  const bytes = new Uint8Array(16);
  globalThis.crypto.getRandomValues(bytes);
  return Array.from(bytes, (byte) => byte.toString(16).padStart(2, "0")).join("");
}

/** A failed request or an error frame: `code` is stable, `message` is for humans. */
export class SwitchboardError extends Error {
  /**
   * @param {string} code
   * @param {string} message
   */
  constructor(code, message) {
    super(message);
    /** @type {"SwitchboardError"} */
    this.name = "SwitchboardError";
    this.code = code;
  }
}

/**
 * The delay before reconnect attempt `attempt` (from 0) of an outage that began with
 * `closeCode`: full jitter between a floor (after 1013) and a cap that grows geometrically from
 * a base (smaller after 1001) up to `maxDelayMs`.
 * @param {number} attempt
 * @param {number} closeCode
 * @param {import("./switchboard.js").ReconnectOptions} [options]
 * @param {() => number} [random]
 * @returns {number}
 */
export function backoffDelay(attempt, closeCode, options = {}, random = Math.random) {
  const policy = { ...RECONNECT_DEFAULTS, ...options };
  const base = closeCode === 1001 ? policy.drainingDelayMs : policy.initialDelayMs;
  // Multipliers below 1 (or NaN) would shrink the delay as failures pile up.
  const multiplier = policy.multiplier >= 1 ? policy.multiplier : 1;
  let cap = Math.min(policy.maxDelayMs, base * multiplier ** attempt);
  if (!(cap >= 0)) cap = policy.maxDelayMs;
  const floor = closeCode === 1013 ? Math.min(policy.overloadedDelayMs, policy.maxDelayMs) : 0;
  const top = Math.max(cap, floor);
  return floor + random() * (top - floor);
}

/**
 * Whether the client reconnects after a close with `closeCode`.
 * @param {number} closeCode
 */
export function shouldReconnect(closeCode) {
  return !FINAL_CLOSE_CODES.has(closeCode);
}

/**
 * Hands a listener's exception to the host (console / uncaught error) without breaking the client.
 * @param {unknown} error
 */
function report(error) {
  const host = /** @type {any} */ (globalThis);
  if (typeof host.reportError === "function") {
    host.reportError(error);
  } else {
    setTimeout(() => {
      throw error;
    });
  }
}

/** A minimal event emitter: listeners run in order; one that throws does not stop the others. */
class Emitter {
  /** @type {Map<string, Set<Function>>} */
  #listeners = new Map();

  /**
   * @param {string} event
   * @param {Function} listener
   * @returns {() => void}
   */
  on(event, listener) {
    if (typeof listener !== "function") throw new TypeError("listener must be a function");
    let set = this.#listeners.get(event);
    if (!set) this.#listeners.set(event, (set = new Set()));
    set.add(listener);
    return () => this.off(event, listener);
  }

  /**
   * @param {string} event
   * @param {Function} listener
   */
  off(event, listener) {
    this.#listeners.get(event)?.delete(listener);
  }

  /**
   * @param {string} event
   * @param {unknown} value
   */
  _emit(event, value) {
    const set = this.#listeners.get(event);
    if (!set) return;
    for (const listener of [...set]) call(listener, value);
  }
}

/**
 * @param {Function | undefined} fn
 * @param {unknown} value
 */
function call(fn, value) {
  if (!fn) return;
  try {
    fn(value);
  } catch (error) {
    report(error);
  }
}

/** One subscribed room: its handler, its listeners, and the last position delivered. */
class Subscription extends Emitter {
  /** @type {Client} */
  #client;
  /** @type {((message: any) => void) | undefined} */
  #handler;
  /** @type {((event: any) => void) | undefined} */
  #onPresence;

  /**
   * @param {Client} client
   * @param {string} room
   * @param {((message: any) => void) | undefined} handler
   * @param {boolean} presenceEvents
   * @param {((event: any) => void) | undefined} onPresence
   */
  constructor(client, room, handler, presenceEvents, onPresence) {
    super();
    this.#client = client;
    this.#handler = handler;
    this.#onPresence = onPresence;
    this.room = room;
    this.presenceEvents = presenceEvents;
    this.offset = 0;
    this.epoch = "";
    /** @type {boolean | undefined} */
    this.recovered = undefined;
    this.position = { offset: 0, epoch: "" };
    /** Set once the first subscribe reply arrived; cleared when unsubscribed or ended. */
    this.active = false;
  }

  unsubscribe() {
    return this.#client.unsubscribe(this.room);
  }

  /**
   * Records a subscribe reply. With a recovered `since`, the missed messages follow the reply,
   * so the position stays at `since` until they arrive; otherwise nothing at or below the
   * reply's offset will be sent. Offset 0 ("nothing seen") recovers in any epoch: a room
   * without state tells its subscribers an epoch it does not keep.
   * @param {{offset: number, epoch: string, recovered?: boolean}} reply
   * @param {{offset: number, epoch: string} | undefined} since
   */
  _subscribed(reply, since) {
    this.offset = reply.offset;
    this.epoch = reply.epoch;
    this.recovered = since ? reply.recovered === true : undefined;
    this.position =
      since && reply.recovered === true && (since.epoch === reply.epoch || since.offset === 0)
        ? { offset: Math.min(since.offset, reply.offset), epoch: reply.epoch }
        : { offset: reply.offset, epoch: reply.epoch };
    this.active = true;
  }

  /**
   * Delivers a room message unless it is a duplicate by (epoch, offset); returns whether it did.
   * @param {any} message
   */
  _deliver(message) {
    const { position } = this;
    if (message.epoch === position.epoch && message.offset <= position.offset) return false;
    this.position = { offset: message.offset, epoch: message.epoch };
    call(this.#handler, message);
    this._emit("message", message);
    return true;
  }

  /** @param {any} event */
  _presence(event) {
    call(this.#onPresence, event);
    this._emit("presence", event);
  }

  /** @param {SwitchboardError | undefined} error */
  _end(error) {
    this.active = false;
    this._emit("ended", error ? { error } : {});
  }
}

/**
 * What a transport tells the client, each at most until `closed` (or its `close()`).
 * @typedef {object} TransportEvents
 * @property {(frame: any) => void} frame a server frame, parsed
 * @property {(message: string) => void} unreadable a frame that is not JSON
 * @property {() => void} alive a sign of life that carries no frame (an SSE heartbeat, an empty poll)
 * @property {(code: number, reason: string, refused: boolean) => void} closed the connection
 *   ended, as a WebSocket close with `code`; `refused`: the node answered the opening request
 *   with a refusal (401, 403, 400, 429, 503) that every transport would get
 */

/** HTTP answers to /sse and /poll that are the node's refusals, not a transport's failure. */
const REFUSALS = new Set([400, 401, 403, 429, 503]);

/** The server's bound on the client frames of one POST. */
const MAX_FRAMES_PER_POST = 100;

/**
 * Most characters of one event-stream event held while it is incomplete: far above any frame a
 * node sends (`--max-message-size`), so only a broken stream or proxy reaches it.
 */
const MAX_EVENT_CHARS = 64 * 1024 * 1024;

/**
 * Most bytes one compressed WebSocket frame may inflate to, the same bound as an event-stream
 * event: a few KiB of DEFLATE can expand a thousandfold, so a hostile or broken server could
 * otherwise make the client allocate without limit. Decompression stops there.
 */
const MAX_INFLATED_BYTES = 64 * 1024 * 1024;

/** A compressed frame that inflates past `MAX_INFLATED_BYTES`. */
class InflatedTooLarge extends Error {}

/**
 * The text of a raw DEFLATE (RFC 1951) frame, decompressed chunk by chunk so that no more than
 * `MAX_INFLATED_BYTES` (and one chunk) is ever held.
 * @param {Uint8Array} compressed
 * @returns {Promise<string>}
 */
async function inflateText(compressed) {
  const stream = new DecompressionStream("deflate-raw");
  const writer = stream.writable.getWriter();
  // Their failures are the reader's: a corrupt frame rejects both.
  writer.write(/** @type {BufferSource} */ (compressed)).catch(() => {});
  writer.close().catch(() => {});
  const reader = stream.readable.getReader();
  const decoder = new TextDecoder("utf-8", { fatal: true });
  let size = 0;
  let text = "";
  for (;;) {
    const { done, value } = await reader.read();
    if (done) return text + decoder.decode();
    size += value.byteLength;
    if (size > MAX_INFLATED_BYTES) {
      reader.cancel().catch(() => {});
      throw new InflatedTooLarge();
    }
    text += decoder.decode(value, { stream: true });
  }
}

/**
 * The bytes of a binary WebSocket message (an ArrayBuffer with `binaryType = "arraybuffer"`, or
 * a view such as a Node Buffer from a custom WebSocket), or null for anything else.
 * @param {unknown} data
 */
function bytesOf(data) {
  if (data instanceof ArrayBuffer) return new Uint8Array(data);
  if (ArrayBuffer.isView(data)) return new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
  return null;
}

/**
 * @param {unknown} error
 * @returns {string}
 */
function messageOf(error) {
  return error instanceof Error ? error.message : String(error);
}

/**
 * The WebSocket transport: `/ws` with the JSON subprotocol, or the compressed one. On the compressed
 * codec each server frame is binary: a flag byte (0: JSON as is, 1: raw DEFLATE) and the bytes.
 * Inflating is asynchronous, so frames (and the close) are handed on through a queue, in the
 * order they arrived; while nothing is queued, a frame that needs no inflating is handed on at once.
 * Frames are inflated one at a time, each when its turn comes: frames inflating side by side
 * could together hold many times the bound on one.
 */
class WebSocketTransport {
  /** @type {any} */
  #socket;
  /** @type {TransportEvents} */
  #events;
  /** Set by `close()` or a local end: nothing more is handed on. */
  #done = false;
  /** Messages received and not yet handed on. */
  #queued = 0;
  /** @type {Promise<void>} the last queued message's turn */
  #tail = Promise.resolve();

  /**
   * @param {string} url
   * @param {any} WebSocketImpl
   * @param {string} codec "json" or "json+deflate"
   * @param {TransportEvents} events
   */
  constructor(url, WebSocketImpl, codec, events) {
    const socket = new WebSocketImpl(url, OFFERS[codec]);
    this.#socket = socket;
    this.#events = events;
    // Browsers default to Blobs, which can only be read asynchronously.
    socket.binaryType = "arraybuffer";
    socket.onmessage = (/** @type {any} */ event) => this.#received(event.data);
    socket.onclose = (/** @type {any} */ event) => {
      this.#inTurn(() => events.closed(event.code || ABNORMAL, event.reason || "", false));
    };
    // A failed handshake (refused connection, HTTP 4xx/5xx) is reported as an error and, by
    // some implementations (Node 20's undici), with no close event after it.
    socket.onerror = () => {
      if (socket.readyState === CONNECTING) {
        this.close();
        events.closed(ABNORMAL, "could not connect (network error or handshake refused)", false);
      }
    };
  }

  /** @param {unknown} data */
  #received(data) {
    if (typeof data === "string") {
      this.#inTurn(() => this.#parse(data));
      return;
    }
    const bytes = bytesOf(data);
    if (this.#socket.protocol !== DEFLATE_SUBPROTOCOL) {
      this.#inTurn(() => this.#events.unreadable("binary frame on the JSON subprotocol"));
      return;
    }
    if (bytes === null) {
      this.#inTurn(() => this.#events.unreadable("a binary frame the WebSocket gave as neither ArrayBuffer nor view"));
      return;
    }
    const flag = bytes[0];
    if (flag === 0) {
      let text;
      try {
        text = new TextDecoder("utf-8", { fatal: true }).decode(bytes.subarray(1));
      } catch (error) {
        this.#inTurn(() => this.#events.unreadable(`stored frame: ${messageOf(error)}`));
        return;
      }
      this.#inTurn(() => this.#parse(text));
    } else if (flag === 1) {
      const compressed = bytes.subarray(1);
      this.#queue(() =>
        inflateText(compressed).then(
          (text) => () => this.#parse(text),
          (error) =>
            error instanceof InflatedTooLarge
              ? () => this.#tooLarge()
              : () => this.#events.unreadable(`compressed frame: ${messageOf(error)}`),
        ),
      );
    } else {
      const problem = flag === undefined ? "an empty binary frame" : `flag byte ${flag}`;
      this.#inTurn(() => this.#events.unreadable(`${problem} on the compressed subprotocol`));
    }
  }

  /**
   * Hands `deliver` on now if nothing is queued, else after what is.
   * @param {() => void} deliver
   */
  #inTurn(deliver) {
    if (this.#done) return;
    if (this.#queued === 0) deliver();
    else this.#queue(async () => deliver);
  }

  /**
   * Once every message received before it was handed on, runs `step` (unless the transport is
   * done) and hands on what it resolves to.
   * @param {() => Promise<() => void>} step
   */
  #queue(step) {
    this.#queued++;
    this.#tail = this.#tail
      .then(async () => {
        try {
          const deliver = this.#done ? null : await step();
          if (!this.#done) deliver?.();
        } finally {
          this.#queued--;
        }
      })
      // The queue goes on; what threw is the host's to see, as from a listener.
      .catch(report);
  }

  /** The subprotocol the node chose (a custom WebSocket that does not say is taken for JSON). */
  get protocol() {
    return this.#socket.protocol || SUBPROTOCOL;
  }

  /** @param {string} text */
  #parse(text) {
    let frame;
    try {
      frame = JSON.parse(text);
    } catch (error) {
      this.#events.unreadable(messageOf(error));
      return;
    }
    this.#events.frame(frame);
  }

  /** A frame past the bound: the connection is given up, as the node closes on an oversized frame. */
  #tooLarge() {
    this.close();
    this.#events.closed(1009, "a compressed frame over 64 MiB once inflated", false);
  }

  /** @param {object} frame */
  send(frame) {
    this.#socket.send(JSON.stringify(frame));
  }

  /** Gives the socket up without waiting for its close handshake (the peer may be gone). */
  close() {
    this.#done = true;
    const socket = this.#socket;
    socket.onmessage = socket.onclose = socket.onerror = null;
    socket.close(1000);
  }
}

/**
 * The URL of a fallback endpoint beside a `/ws` URL: http(s) on the same host, and the path's
 * last `/ws` segment replaced by `path` (appended to a path that does not end with `/ws`).
 * @param {URL} wsUrl
 * @param {string} path
 */
function fallbackUrl(wsUrl, path) {
  const url = new URL(wsUrl);
  url.protocol = url.protocol === "wss:" ? "https:" : "http:";
  url.pathname = `${url.pathname.replace(/\/ws\/?$/, "").replace(/\/$/, "")}/${path}`;
  return url;
}

/**
 * A parser of `text/event-stream` chunks: calls `onData` with each event's data (its `data:`
 * lines joined by newlines) and `onComment` for each comment line; other fields are ignored.
 * Returns how many characters of an incomplete event it holds after each chunk.
 * @param {(data: string) => void} onData
 * @param {() => void} onComment
 * @returns {(chunk: string) => number}
 */
function eventStreamParser(onData, onComment) {
  let buffer = "";
  /** @type {string[] | null} */
  let data = null;
  let held = 0;
  return (chunk) => {
    buffer += chunk;
    for (let end = buffer.indexOf("\n"); end >= 0; end = buffer.indexOf("\n")) {
      let line = buffer.slice(0, end);
      buffer = buffer.slice(end + 1);
      if (line.endsWith("\r")) line = line.slice(0, -1);
      if (line === "") {
        if (data) onData(data.join("\n"));
        data = null;
        held = 0;
      } else if (line.startsWith(":")) {
        onComment();
      } else {
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
        if (field === "data") {
          (data ??= []).push(value);
          held += value.length;
        }
      }
    }
    return held + buffer.length;
  };
}

/**
 * What both fallback transports share: the session's key, delivering frames (the last `close`
 * frame ends the transport), and client frames POSTed to `/{sse|poll}/{session}` one request
 * at a time, the frames queued meanwhile batched into the next one, in order.
 */
class FallbackTransport {
  /** @type {string} */
  name;
  /** SSE and long polling speak plain JSON. */
  protocol = SUBPROTOCOL;
  /** @type {URL} */
  _wsUrl;
  /** @type {(input: string, init?: any) => Promise<any>} */
  _fetch;
  /** @type {TransportEvents} */
  _events;
  _abort = new AbortController();
  _done = false;
  /** @type {{session: string, key: string} | null} */
  _link = null;
  /** @type {object[]} */
  #queue = [];
  #posting = false;

  /**
   * @param {string} name
   * @param {URL} wsUrl the `/ws` URL with the `user` query, if any
   * @param {(input: string, init?: any) => Promise<any>} fetchImpl
   * @param {TransportEvents} events
   */
  constructor(name, wsUrl, fetchImpl, events) {
    this.name = name;
    this._wsUrl = wsUrl;
    this._fetch = fetchImpl;
    this._events = events;
  }

  /**
   * A request of this transport's, given up with it.
   * @param {string} url
   * @param {any} [init]
   */
  _request(url, init = {}) {
    return this._fetch(url, { ...init, signal: this._abort.signal });
  }

  /**
   * The URL of `/{name}/{session}` (without the query: the key authorizes it).
   * @param {string} session
   */
  _sessionUrl(session) {
    const url = fallbackUrl(this._wsUrl, `${this.name}/${encodeURIComponent(session)}`);
    url.search = "";
    return url.toString();
  }

  /** @param {any} frame */
  _deliver(frame) {
    if (this._done) return;
    if (frame?.type === "close") {
      // The node has ended the session: nothing to end on our side.
      this._link = null;
      this._end(Number.isInteger(frame.code) ? frame.code : ABNORMAL, String(frame.reason ?? ""));
      return;
    }
    if (frame?.type === "welcome" && typeof frame.session === "string" && typeof frame.session_key === "string") {
      this._link = { session: frame.session, key: frame.session_key };
    }
    this._events.frame(frame);
  }

  /**
   * Ends the transport once: its requests are aborted and the client told.
   * @param {number} code
   * @param {string} reason
   * @param {boolean} [refused]
   */
  _end(code, reason, refused = false) {
    if (this._done) return;
    this.close();
    this._events.closed(code, reason, refused);
  }

  /** @param {object} frame */
  send(frame) {
    this.#queue.push(frame);
    if (!this.#posting) this.#flush();
  }

  close() {
    this._done = true;
    this._abort.abort();
  }

  async #flush() {
    this.#posting = true;
    while (this.#queue.length > 0 && !this._done) {
      const batch = this.#queue.splice(0, MAX_FRAMES_PER_POST);
      if (!(await this.#post(batch))) break;
    }
    this.#posting = false;
  }

  /**
   * POSTs `batch`; returns whether the node took it (when not, the transport has ended). A
   * batch over the node's size limit is sent again one frame per request; a single frame over
   * it ends the transport with 1009, as on a WebSocket. 429 and 503 are retried after
   * `Retry-After` (the frames keep their order: nothing else is sent meanwhile).
   * @param {object[]} batch
   * @returns {Promise<boolean>}
   */
  async #post(batch) {
    const link = this._link;
    if (!link) {
      this._end(ABNORMAL, "no session key in the welcome");
      return false;
    }
    for (;;) {
      let response;
      try {
        response = await this._request(this._sessionUrl(link.session), {
          method: "POST",
          headers: { authorization: `Session ${link.key}`, "content-type": "application/json" },
          body: JSON.stringify(batch),
        });
        await response.text();
      } catch (error) {
        this._end(ABNORMAL, `could not send: ${messageOf(error)}`);
        return false;
      }
      if (this._done) return false;
      if (response.ok) return true;
      if (response.status === 413 && batch.length > 1) {
        for (const frame of batch) if (!(await this.#post([frame]))) return false;
        return true;
      }
      if (response.status === 413) {
        this._end(1009, "a frame is over the node's size limit");
        return false;
      }
      if (response.status !== 429 && response.status !== 503) {
        this._end(ABNORMAL, `the node answered a POST with ${response.status}`);
        return false;
      }
      await this._retryAfter(response);
      if (this._done) return false;
    }
  }

  /**
   * Waits as long as a 429 or 503 answer's `Retry-After` says (1 s when it says nothing usable,
   * at most 60 s), or until the transport is closed.
   * @param {any} response
   */
  _retryAfter(response) {
    const seconds = Number(response.headers.get("retry-after"));
    return new Promise((done) => {
      const timer = setTimeout(done, 1000 * (seconds > 0 && seconds <= 60 ? seconds : 1));
      this._abort.signal.addEventListener("abort", () => {
        clearTimeout(timer);
        done(undefined);
      });
    });
  }

  /**
   * Opens the session (`GET /sse` or `GET /poll`); resolves with the response when it is the
   * expected one, else ends the transport and resolves with null.
   * @param {string | undefined} token
   * @param {string} accept
   */
  async _open(token, accept) {
    const url = fallbackUrl(this._wsUrl, this.name);
    /** @type {Record<string, string>} */
    const headers = { accept };
    if (token) headers.authorization = `Bearer ${token}`;
    let response;
    try {
      response = await this._request(url.toString(), { headers });
    } catch (error) {
      this._end(ABNORMAL, `could not connect: ${messageOf(error)}`);
      return null;
    }
    const type = response.headers.get("content-type") ?? "";
    if (response.ok && type.startsWith(accept)) return response;
    response.body?.cancel().catch(() => {});
    const status = response.ok ? `a ${type || "untyped"} answer` : String(response.status);
    this._end(ABNORMAL, `GET /${this.name} answered ${status}`, REFUSALS.has(response.status));
    return null;
  }
}

/** Server-sent events: `GET /sse` is the session's stream, read with `fetch`. */
class SseTransport extends FallbackTransport {
  /**
   * @param {URL} wsUrl
   * @param {string | undefined} token
   * @param {(input: string, init?: any) => Promise<any>} fetchImpl
   * @param {TransportEvents} events
   */
  constructor(wsUrl, token, fetchImpl, events) {
    super("sse", wsUrl, fetchImpl, events);
    this.#read(token);
  }

  /** @param {string | undefined} token */
  async #read(token) {
    const response = await this._open(token, "text/event-stream");
    if (!response) return;
    const parse = eventStreamParser(
      (data) => {
        let frame;
        try {
          frame = JSON.parse(data);
        } catch (error) {
          if (!this._done) this._events.unreadable(messageOf(error));
          return;
        }
        this._deliver(frame);
      },
      () => {
        if (!this._done) this._events.alive();
      },
    );
    const decoder = new TextDecoder();
    try {
      const reader = response.body.getReader();
      while (!this._done) {
        const { done, value } = await reader.read();
        if (done) break;
        if (parse(decoder.decode(value, { stream: true })) > MAX_EVENT_CHARS) {
          this._end(1009, "an event-stream event over 64 MiB");
          return;
        }
      }
      this._end(ABNORMAL, "the event stream ended without a close frame");
    } catch (error) {
      this._end(ABNORMAL, `the event stream failed: ${messageOf(error)}`);
    }
  }
}

/** Long polling: `GET /poll` opens the session, then `GET /poll/{session}` in a loop. */
class PollTransport extends FallbackTransport {
  /**
   * @param {URL} wsUrl
   * @param {string | undefined} token
   * @param {(input: string, init?: any) => Promise<any>} fetchImpl
   * @param {TransportEvents} events
   */
  constructor(wsUrl, token, fetchImpl, events) {
    super("poll", wsUrl, fetchImpl, events);
    this.#run(token);
  }

  /** @param {string | undefined} token */
  async #run(token) {
    const opened = await this._open(token, "application/json");
    if (!opened || !(await this.#take(opened))) return;
    const link = this._link;
    if (!link) {
      this._end(ABNORMAL, "GET /poll answered no welcome with a session key");
      return;
    }
    const url = this._sessionUrl(link.session);
    while (!this._done) {
      let response;
      try {
        response = await this._request(url, { headers: { authorization: `Session ${link.key}`, accept: "application/json" } });
      } catch (error) {
        this._end(ABNORMAL, `the poll failed: ${messageOf(error)}`);
        return;
      }
      if (this._done) return;
      if (response.status === 429 || response.status === 503) {
        // Too many polls or connections from this address for now: the session waits.
        response.body?.cancel().catch(() => {});
        await this._retryAfter(response);
        continue;
      }
      if (!response.ok) {
        response.body?.cancel().catch(() => {});
        // The node has no session to end (404), or this one is not the session's (421).
        if (response.status === 404 || response.status === 421) this._link = null;
        const why =
          response.status === 404 ? "the node no longer has the session (404)"
          : response.status === 421 ? "the poll reached another node (421): polls must reach the session's node"
          : `the node answered a poll with ${response.status}`;
        this._end(ABNORMAL, why);
        return;
      }
      if (!(await this.#take(response))) return;
    }
  }

  /**
   * Ends the session at the node too (`DELETE /poll/{session}`), so it leaves presence now
   * rather than after the node's idle timeout; best effort, and `keepalive` lets it outlive an
   * unloading page. (An SSE session ends when its aborted stream's connection closes.)
   */
  close() {
    const link = this._done ? null : this._link;
    super.close();
    if (!link) return;
    const init = { method: "DELETE", headers: { authorization: `Session ${link.key}` }, keepalive: true };
    // In a promise: a fetch that throws at once fails the request, not close().
    Promise.resolve()
      .then(() => this._fetch(this._sessionUrl(link.session), init))
      .then((response) => response.body?.cancel())
      .catch(() => {});
  }

  /**
   * Delivers the frames of a poll's answer (a JSON array); returns whether the transport goes on.
   * @param {any} response
   */
  async #take(response) {
    let frames;
    try {
      frames = JSON.parse(await response.text());
    } catch (error) {
      this._end(ABNORMAL, `unreadable poll answer: ${messageOf(error)}`);
      return false;
    }
    if (this._done) return false;
    if (!Array.isArray(frames)) {
      this._end(ABNORMAL, "a poll answer that is not an array");
      return false;
    }
    if (frames.length === 0) this._events.alive();
    for (const frame of frames) this._deliver(frame);
    return !this._done;
  }
}

/**
 * @typedef {object} Handlers
 * @property {(frame: any) => void} onReply
 * @property {(error: SwitchboardError) => void} onError
 */

/**
 * A request written to the current connection, or held for the next one.
 * @typedef {object} Pending
 * @property {{type: string, [field: string]: unknown}} frame without its id
 * @property {Handlers} handlers
 * @property {ReturnType<typeof setTimeout> | undefined} timer
 * @property {number | undefined} retrySince when set, the request carries a key and is re-sent
 *   after a reconnect until this time plus `retryWindowMs`
 */

/**
 * What the client knows of the user's inbox, and the highest seq it delivered in that epoch.
 * @typedef {{seq: number, acked: number, epoch: string, delivered: number}} InboxState
 */

/** A connection to switchboard that reconnects and resubscribes by itself. */
export class Client extends Emitter {
  /** @type {any} */
  #options;
  /** @type {typeof RECONNECT_DEFAULTS} */
  #reconnect;
  /** @type {any} */
  #WebSocket;
  /** @type {(input: string, init?: any) => Promise<any>} */
  #fetch;
  /** @type {"connecting" | "connected" | "reconnecting" | "closed"} */
  #state = "connecting";
  /** @type {WebSocketTransport | FallbackTransport | null} */
  #transport = null;
  /** @type {readonly string[]} */
  #transports;
  /** Which of `#transports` the current (or next) attempt uses. */
  #transportIndex = 0;
  /** Whether the current attempt started at the remembered transport. */
  #fromMemory = false;
  /** Bumped for every connection, so callbacks of an abandoned one (or a stale token fetch) do nothing. */
  #generation = 0;
  #nextId = 0;
  /** @type {Map<number, Pending>} */
  #pending = new Map();
  /** @type {Map<string, Subscription>} */
  #rooms = new Map();
  /** @type {{session: string, user: string, node: string, heartbeatMs: number, transport: string, protocol: string} | null} */
  #session = null;
  #everConnected = false;
  /** Failed attempts in the current outage, and the close code that began it. */
  #attempt = 0;
  /** @type {number | null} */
  #outageCode = null;
  /** @type {ReturnType<typeof setTimeout> | undefined} */
  #reconnectTimer;
  /** @type {ReturnType<typeof setTimeout> | undefined} */
  #welcomeTimer;
  /** @type {ReturnType<typeof setInterval> | undefined} */
  #pingTimer;
  #lastHeard = 0;
  #pinging = false;
  /** @type {{resolve: (event: any) => void, reject: (error: SwitchboardError) => void}[]} */
  #readyWaiters = [];
  /** @type {any} */
  #lastConnected = null;
  /** @type {readonly string[]} */
  #urls;
  /** Which of `#urls` the current (or next) attempt uses: every attempt after the first moves on. */
  #urlIndex = 0;
  /**
   * Keyed requests whose connection dropped before their answer, in the order first sent.
   * @type {Pending[]}
   */
  #retrying = [];
  /** @type {InboxState | null} */
  #inbox = null;
  /** The highest seq handled that automatic acks should acknowledge (0: none). */
  #ackWanted = 0;
  #ackInFlight = false;

  /**
   * @param {string | readonly string[]} url
   * @param {import("./switchboard.js").ConnectOptions} [options]
   */
  constructor(url, options = {}) {
    super();
    this.#urls = checkUrls(url);
    if (options.codec !== undefined && !Object.hasOwn(OFFERS, options.codec)) {
      throw new TypeError(`codec ${JSON.stringify(options.codec)}: expected "json" or "json+deflate"`);
    }
    const WebSocketImpl = options.WebSocket ?? /** @type {any} */ (globalThis).WebSocket;
    const fetchImpl = options.fetch ?? /** @type {any} */ (globalThis).fetch;
    const wanted = checkTransports(options.transports);
    // A transport the environment lacks is left out (a browser without WebSocket goes straight
    // to SSE); only a list left empty is an error.
    this.#transports = Object.freeze(
      wanted.filter((name) => (name === "websocket" ? typeof WebSocketImpl : typeof fetchImpl) === "function"),
    );
    if (this.#transports.length === 0) {
      throw new TypeError(
        wanted.includes("websocket")
          ? "no WebSocket: pass options.WebSocket, or run Node 22+ (Node 20: --experimental-websocket)"
          : "no fetch: pass options.fetch",
      );
    }
    this.#WebSocket = WebSocketImpl;
    // Called as a plain function: browsers refuse `fetch` called as another object's method.
    this.#fetch = options.fetch ?? ((input, init) => globalThis.fetch(input, init));
    this.#options = {
      requestTimeoutMs: 10_000,
      random: Math.random,
      autoAck: false,
      retry: false,
      retryWindowMs: 60_000,
      ...options,
    };
    this.#reconnect = { ...RECONNECT_DEFAULTS, ...options.reconnect };
    this.#firstTransport();
    this.#open();
  }

  get state() {
    return this.#state;
  }

  /** The URL of the current connection, or of the attempt under way or about to be made. */
  get url() {
    return this.#urls[this.#urlIndex];
  }

  /** Every URL given to `connect`, in the order they are tried. */
  get urls() {
    return this.#urls;
  }

  /** The transport of the current connection, or of the attempt under way or about to be made. */
  get transport() {
    return this.#transports[this.#transportIndex];
  }

  /** The transports this client may use, in the order they are tried. */
  get transports() {
    return this.#transports;
  }

  get session() {
    return this.#session && { ...this.#session };
  }

  /**
   * The user's inbox as last heard: from `welcome`, then raised by persisted directs and acks.
   * Null before the first welcome, or when the server announced no inbox.
   */
  get inbox() {
    const inbox = this.#inbox;
    return inbox && { seq: inbox.seq, acked: inbox.acked, epoch: inbox.epoch };
  }

  /** @returns {ReadonlyMap<string, Subscription>} */
  get subscriptions() {
    return new Map([...this.#rooms].filter(([, subscription]) => subscription.active));
  }

  /** @returns {Promise<any>} */
  ready() {
    if (this.#state === "connected") return Promise.resolve(this.#lastConnected);
    if (this.#state === "closed") {
      return Promise.reject(new SwitchboardError("disconnected", "the client is closed"));
    }
    return new Promise((resolve, reject) => this.#readyWaiters.push({ resolve, reject }));
  }

  /**
   * @param {string} room
   * @param {(message: any) => void} [handler]
   * @param {{presenceEvents?: boolean, onPresence?: (event: any) => void, since?: {offset: number, epoch: string}}} [options]
   * @returns {Promise<Subscription>}
   */
  subscribe(room, handler, options = {}) {
    if (this.#rooms.has(room)) {
      return Promise.reject(
        new SwitchboardError("already_subscribed", `already subscribed to ${JSON.stringify(room)}`),
      );
    }
    const presenceEvents = Boolean(options.presenceEvents || options.onPresence);
    const subscription = new Subscription(this, room, handler, presenceEvents, options.onPresence);
    const { since } = options;
    const frame = { type: "subscribe", room, ...(presenceEvents && { presence_events: true }), ...(since && { since }) };
    return new Promise((resolve, reject) => {
      const sent = this.#request(frame, {
        onReply: (reply) => {
          // An unsubscribe while this was in flight already took the room back.
          if (this.#rooms.get(room) === subscription) subscription._subscribed(reply, since);
          resolve(subscription);
        },
        onError: (error) => {
          if (this.#rooms.get(room) === subscription) this.#rooms.delete(room);
          reject(error);
        },
      });
      if (sent) this.#rooms.set(room, subscription);
    });
  }

  /**
   * @param {string} room
   * @returns {Promise<void>}
   */
  unsubscribe(room) {
    const subscription = this.#rooms.get(room);
    if (subscription) {
      this.#rooms.delete(room);
      subscription.active = false;
      // Nothing to undo on the server: the next connection will not resubscribe the room.
      if (this.#state !== "connected") return Promise.resolve();
    }
    return new Promise((resolve, reject) => {
      this.#request(
        { type: "unsubscribe", room },
        {
          onReply: () => resolve(),
          onError: (error) => {
            const gone = error.code === "not_subscribed" || error.code === "disconnected";
            if (subscription && gone) resolve();
            else reject(error);
          },
        },
      );
    });
  }

  /**
   * @param {string} room
   * @param {unknown} data
   * @param {{key?: string, retry?: boolean}} [options]
   */
  publish(room, data, options = {}) {
    return this.#keyed({ type: "publish", room, data }, options, (reply) => ({
      offset: reply.offset,
      epoch: reply.epoch,
      duplicate: reply.duplicate === true,
    }));
  }

  /**
   * @param {string} user
   * @param {unknown} data
   * @param {{persist?: boolean, key?: string, retry?: boolean}} [options]
   */
  send(user, data, options = {}) {
    if (options.persist !== true) {
      // Only a stored message can be recognised as a repeat.
      if (options.key !== undefined || options.retry !== undefined) {
        return Promise.reject(new TypeError("send: key and retry need persist: true"));
      }
      return this.#ask({ type: "send", to: user, data }, (reply) => ({ sessions: reply.sessions }));
    }
    return this.#keyed({ type: "send", to: user, data, persist: true }, options, (reply) => ({
      sessions: reply.sessions,
      seq: reply.seq,
      duplicate: reply.duplicate === true,
    }));
  }

  /**
   * Acknowledges every inbox message up to `seq`, for every session of the user.
   * @param {number} seq
   * @returns {Promise<void>}
   */
  ack(seq) {
    if (!Number.isSafeInteger(seq) || seq < 0) {
      return Promise.reject(new TypeError(`ack: seq ${JSON.stringify(seq)} is not a non-negative integer`));
    }
    const epoch = this.#inbox?.epoch;
    return this.#ask({ type: "ack", seq }, () => this.#noteAcked(epoch, seq));
  }

  /** @param {string} room */
  presence(room) {
    return this.#ask({ type: "presence", room }, (reply) => ({ members: reply.members }));
  }

  /**
   * @param {string} room
   * @param {{since?: {offset: number, epoch: string}, limit?: number}} [options]
   */
  history(room, options = {}) {
    const frame = {
      type: "history",
      room,
      ...(options.since && { since: options.since }),
      ...(options.limit !== undefined && { limit: options.limit }),
    };
    return this.#ask(frame, (reply) => ({
      messages: reply.messages,
      offset: reply.offset,
      epoch: reply.epoch,
      more: reply.more === true,
    }));
  }

  /** @returns {Promise<number>} */
  ping() {
    const started = Date.now();
    return this.#ask({ type: "ping" }, () => Date.now() - started);
  }

  reconnect() {
    if (this.#state === "closed") {
      this.#attempt = 0;
      this.#outageCode = null;
      this.#nextUrl();
      this.#firstTransport();
      this.#open();
    } else if (this.#state === "reconnecting" && this.#reconnectTimer !== undefined) {
      clearTimeout(this.#reconnectTimer);
      this.#reconnectTimer = undefined;
      this.#open();
    }
  }

  close() {
    // A client that stopped by itself kept its rooms for reconnect(): they end now.
    if (this.#state === "closed") {
      this.#endSubscriptions();
      return;
    }
    this.#state = "closed";
    this.#generation++;
    this.#dropTransport();
    this.#clearTimers();
    this.#failPending(false);
    this.#session = null;
    this.#endSubscriptions();
    this._emit("disconnected", { code: 1000, reason: "client closed", willReconnect: false });
    this.#rejectReady();
  }

  /**
   * Sends a request and maps its reply; rejects with `disconnected` at once when not connected.
   * @template T
   * @param {{type: string, [field: string]: unknown}} frame
   * @param {(reply: any) => T} map
   * @returns {Promise<T>}
   */
  #ask(frame, map) {
    return new Promise((resolve, reject) => {
      this.#request(frame, { onReply: (reply) => resolve(map(reply)), onError: reject });
    });
  }

  /**
   * A publish or persisted send: adds the caller's key, or a generated one when it is to be
   * retried, and re-sends it with that key after a reconnect when retrying is on.
   * @template T
   * @param {{type: string, [field: string]: unknown}} frame
   * @param {{key?: string, retry?: boolean}} options
   * @param {(reply: any) => T} map
   * @returns {Promise<T>}
   */
  #keyed(frame, options, map) {
    const retry = options.retry ?? (this.#options.retry === true);
    const key = options.key ?? (retry ? generateKey() : undefined);
    if (key !== undefined) {
      const problem = keyProblem(key);
      if (problem) return Promise.reject(new TypeError(`${frame.type}: ${problem}`));
    }
    const keyed = key === undefined ? frame : { ...frame, key };
    return new Promise((resolve, reject) => {
      this.#request(
        keyed,
        { onReply: (reply) => resolve(map(reply)), onError: reject },
        retry ? Date.now() : undefined,
      );
    });
  }

  /**
   * Writes `frame` with a fresh id and routes its answer (reply, pong or error) to `handlers`.
   * Returns whether it was sent; when not, `onError` has been called.
   * @param {{type: string, [field: string]: unknown}} frame
   * @param {Handlers} handlers
   * @param {number} [retrySince] see `Pending`
   */
  #request(frame, handlers, retrySince) {
    if (this.#state !== "connected") {
      const what = this.#state === "closed" ? "the client is closed" : "not connected";
      handlers.onError(new SwitchboardError("disconnected", `${what}: ${frame.type} not sent`));
      return false;
    }
    const id = ++this.#nextId;
    const timeoutMs = this.#options.requestTimeoutMs;
    const timer = setTimeout(() => {
      this.#pending.delete(id);
      handlers.onError(
        new SwitchboardError("timeout", `no answer to ${frame.type} within ${timeoutMs} ms`),
      );
    }, timeoutMs);
    this.#pending.set(id, { frame, handlers, timer, retrySince });
    /** @type {WebSocketTransport | FallbackTransport} */ (this.#transport).send({ ...frame, id });
    return true;
  }

  /** Moves to the next URL, round-robin, for a new attempt. */
  #nextUrl() {
    this.#urlIndex = (this.#urlIndex + 1) % this.#urls.length;
  }

  /**
   * Starts the transports over: at the remembered one, if this client has a choice and has it,
   * else at the first.
   */
  #firstTransport() {
    const remembered =
      this.#transports.length > 1 && rememberedTransport !== null ? this.#transports.indexOf(rememberedTransport) : -1;
    this.#transportIndex = Math.max(0, remembered);
    this.#fromMemory = remembered >= 0;
  }

  /**
   * After an attempt that failed before its welcome: whether to try the next transport at once.
   * A remembered transport that fails (most likely its node went away, not the path to it) is
   * forgotten and ends the attempt: the next one starts over from the first, on the next URL. A
   * refusal by the node ends the attempt too (every transport would be refused alike).
   * @param {boolean} refused
   */
  #fallBack(refused) {
    const name = this.transport;
    if (this.#fromMemory) {
      if (rememberedTransport === name) rememberedTransport = null;
      this.#fromMemory = false;
      return false;
    }
    if (refused || this.#transportIndex + 1 >= this.#transports.length) return false;
    this.#transportIndex++;
    return true;
  }

  /** Opens a new connection (after fetching the token, when it is a function). */
  async #open() {
    const generation = ++this.#generation;
    this.#state = this.#everConnected || this.#attempt > 0 ? "reconnecting" : "connecting";
    const url = new URL(this.url);
    const name = this.transport;
    /** @type {TransportEvents} */
    const events = {
      frame: (frame) => {
        if (generation !== this.#generation) return;
        this.#lastHeard = Date.now();
        this.#onFrame(frame);
      },
      unreadable: (message) => {
        if (generation !== this.#generation) return;
        this.#lastHeard = Date.now();
        this._emit("error", new SwitchboardError("bad_frame", `unreadable frame: ${message}`));
      },
      alive: () => {
        if (generation === this.#generation) this.#lastHeard = Date.now();
      },
      closed: (code, reason, refused) => this.#closed(generation, code, reason, refused),
    };
    try {
      const { token, user } = this.#options;
      const value = typeof token === "function" ? await token() : token;
      if (generation !== this.#generation) return;
      // Browsers cannot set headers on a WebSocket: its token goes in the query; fetch sends it
      // as a header, which proxies do not log.
      if (value && name === "websocket") url.searchParams.set("token", value);
      if (user !== undefined) url.searchParams.set("user", user);
      const transport =
        name === "websocket" ? new WebSocketTransport(url.toString(), this.#WebSocket, this.#options.codec ?? "json", events)
        : name === "sse" ? new SseTransport(url, value || undefined, this.#fetch, events)
        : new PollTransport(url, value || undefined, this.#fetch, events);
      // A transport that failed at once (a `fetch` that threw) has already been replaced.
      if (generation !== this.#generation) return;
      this.#transport = transport;
    } catch (error) {
      if (generation !== this.#generation) return;
      const message = messageOf(error);
      this._emit("error", new SwitchboardError("connect_failed", message));
      this.#closed(generation, ABNORMAL, `could not connect: ${message}`);
      return;
    }
    this.#welcomeTimer = setTimeout(() => {
      this.#abandon(generation, `no welcome within ${this.#options.requestTimeoutMs} ms`);
    }, this.#options.requestTimeoutMs);
  }

  /**
   * Gives a connection up without waiting for its close handshake (the peer may be gone).
   * @param {number} generation
   * @param {string} reason
   */
  #abandon(generation, reason) {
    if (generation !== this.#generation) return;
    this.#dropTransport();
    this.#closed(generation, ABNORMAL, reason);
  }

  /** Closes the current connection; its events are ignored from now on. */
  #dropTransport() {
    const transport = this.#transport;
    this.#transport = null;
    transport?.close();
  }

  #clearTimers() {
    clearTimeout(this.#welcomeTimer);
    clearTimeout(this.#reconnectTimer);
    clearInterval(this.#pingTimer);
    this.#welcomeTimer = this.#reconnectTimer = this.#pingTimer = undefined;
    this.#pinging = false;
  }

  /**
   * The connection is gone: every request waiting on it fails with `disconnected`, except keyed
   * ones to be retried when `keepRetries` (the client will reconnect), which are held instead.
   * Without `keepRetries`, the held ones fail too.
   * @param {boolean} keepRetries
   */
  #failPending(keepRetries) {
    const pending = [...this.#pending.values()];
    this.#pending.clear();
    for (const entry of pending) {
      clearTimeout(entry.timer);
      if (keepRetries && entry.retrySince !== undefined) {
        this.#holdForRetry(entry);
      } else {
        entry.handlers.onError(
          new SwitchboardError(
            "disconnected",
            "the connection dropped before the answer: the request may or may not have been carried out",
          ),
        );
      }
    }
    if (!keepRetries) {
      for (const entry of this.#retrying.splice(0)) {
        clearTimeout(entry.timer);
        entry.handlers.onError(
          new SwitchboardError(
            "disconnected",
            `the client stopped before ${entry.frame.type} could be retried: it may or may not have been carried out`,
          ),
        );
      }
    }
  }

  /**
   * Keeps a keyed request for the next connection, at most until its retry window ends: past
   * it the server may have forgotten the key, and a re-send could be carried out twice.
   * @param {Pending} entry
   */
  #holdForRetry(entry) {
    const windowMs = this.#options.retryWindowMs;
    const left = /** @type {number} */ (entry.retrySince) + windowMs - Date.now();
    entry.timer = setTimeout(() => {
      const index = this.#retrying.indexOf(entry);
      if (index < 0) return;
      this.#retrying.splice(index, 1);
      entry.handlers.onError(
        new SwitchboardError(
          "disconnected",
          `not reconnected within retryWindowMs (${windowMs} ms) to retry ${entry.frame.type}: it may or may not have been carried out`,
        ),
      );
    }, Math.max(0, left));
    this.#retrying.push(entry);
  }

  #endSubscriptions() {
    const rooms = [...this.#rooms.values()];
    this.#rooms.clear();
    for (const subscription of rooms) if (subscription.active) subscription._end(undefined);
  }

  #rejectReady() {
    const waiters = this.#readyWaiters.splice(0);
    for (const { reject } of waiters) {
      reject(new SwitchboardError("disconnected", "the client stopped before connecting"));
    }
  }

  /**
   * A connection ended (or an attempt failed): fail what was waiting on it, then fall back to
   * the next transport, retry or stop.
   * @param {number} generation
   * @param {number} code
   * @param {string} reason
   * @param {boolean} [refused] see `TransportEvents.closed`
   */
  #closed(generation, code, reason, refused = false) {
    if (generation !== this.#generation || this.#state === "closed") return;
    this.#generation++;
    this.#transport = null;
    const wasConnected = this.#state === "connected";
    if (!wasConnected && this.#fallBack(refused)) {
      this.#clearTimers();
      this.#open();
      return;
    }
    const policy = this.#reconnect;
    const retry = policy.enabled && shouldReconnect(code) && this.#attempt < policy.maxAttempts;
    this.#clearTimers();
    this.#failPending(retry);
    this.#session = null;

    if (wasConnected || this.#outageCode === null) this.#outageCode = code;
    else if (code === 1013) this.#outageCode = 1013;

    if (!retry) {
      this.#state = "closed";
      this._emit("disconnected", { code, reason, willReconnect: false });
      this.#rejectReady();
      return;
    }
    const delayMs = backoffDelay(this.#attempt, this.#outageCode, policy, this.#options.random);
    this.#attempt++;
    this.#state = "reconnecting";
    if (wasConnected) this._emit("disconnected", { code, reason, willReconnect: true });
    // A listener may have closed the client.
    if (this.#state !== "reconnecting") return;
    this.#nextUrl();
    this.#firstTransport();
    this._emit("reconnecting", { attempt: this.#attempt, delayMs, url: this.url, transport: this.transport });
    if (this.#state !== "reconnecting" || this.#reconnectTimer !== undefined) return;
    this.#reconnectTimer = setTimeout(() => {
      this.#reconnectTimer = undefined;
      this.#open();
    }, delayMs);
  }

  /** @param {any} frame */
  #onFrame(frame) {
    switch (frame?.type) {
      case "welcome":
        this.#onWelcome(frame);
        break;
      case "message": {
        const subscription = this.#rooms.get(frame.room);
        const message = strip(frame);
        if (subscription?.active && subscription._deliver(message)) this._emit("message", message);
        break;
      }
      case "join":
      case "leave": {
        const subscription = this.#rooms.get(frame.room);
        if (!subscription?.active) break;
        const event = { type: frame.type, room: frame.room, user: frame.user, session: frame.session };
        subscription._presence(event);
        this._emit("presence", event);
        break;
      }
      case "direct": {
        const seq = Number.isSafeInteger(frame.seq) ? frame.seq : undefined;
        if (seq === undefined) {
          this._emit("direct", frame.from ? { data: frame.data, from: frame.from } : { data: frame.data });
          break;
        }
        if (!this.#acceptInboxMessage(seq)) break;
        this._emit("direct", { data: frame.data, ...(frame.from && { from: frame.from }), seq });
        if (this.#options.autoAck) {
          this.#ackWanted = Math.max(this.#ackWanted, seq);
          this.#sendAutoAck();
        }
        break;
      }
      case "broadcast":
        this._emit("broadcast", { data: frame.data });
        break;
      case "reply":
      case "pong":
        this.#answer(frame.id)?.onReply(frame);
        break;
      case "error": {
        const error = new SwitchboardError(frame.code, frame.message);
        const pending = this.#answer(frame.id);
        if (pending) pending.onError(error);
        else this._emit("error", error);
        break;
      }
      default:
        // Frame types from a newer server are ignored.
        break;
    }
  }

  /**
   * Takes the pending request `id` out of the table.
   * @param {unknown} id
   */
  #answer(id) {
    if (typeof id !== "number") return undefined;
    const pending = this.#pending.get(id);
    if (!pending) return undefined;
    this.#pending.delete(id);
    clearTimeout(pending.timer);
    return pending.handlers;
  }

  /**
   * Whether a persisted direct is new to this client: one at or below the highest seq delivered
   * in the inbox's epoch (redelivered after a reconnect because no ack had landed) is not.
   * @param {number} seq
   */
  #acceptInboxMessage(seq) {
    const inbox = this.#inbox;
    if (!inbox) return true;
    if (seq <= inbox.delivered) return false;
    inbox.delivered = seq;
    inbox.seq = Math.max(inbox.seq, seq);
    return true;
  }

  /**
   * Records an ack the server accepted, unless the inbox changed epoch meanwhile.
   * @param {string | undefined} epoch
   * @param {number} seq
   */
  #noteAcked(epoch, seq) {
    const inbox = this.#inbox;
    if (inbox && inbox.epoch === epoch) inbox.acked = Math.max(inbox.acked, seq);
  }

  /**
   * Acknowledges the highest seq handled, with at most one automatic ack in flight: the seqs
   * handled meanwhile are covered by the next one (acks are cumulative). One that failed with
   * the connection is sent again after the next welcome.
   */
  #sendAutoAck() {
    const inbox = this.#inbox;
    if (this.#ackInFlight || this.#state !== "connected" || !inbox) return;
    if (this.#ackWanted <= inbox.acked) return;
    const seq = this.#ackWanted;
    const { epoch } = inbox;
    this.#ackInFlight = true;
    this.#request(
      { type: "ack", seq },
      {
        onReply: () => {
          this.#ackInFlight = false;
          this.#noteAcked(epoch, seq);
          this.#sendAutoAck();
        },
        onError: (error) => {
          this.#ackInFlight = false;
          if (error.code !== "disconnected") this._emit("error", error);
        },
      },
    );
  }

  /** @param {any} frame */
  #onWelcome(frame) {
    if (this.#state === "connected") return;
    clearTimeout(this.#welcomeTimer);
    this.#welcomeTimer = undefined;
    this.#state = "connected";
    this.#attempt = 0;
    this.#outageCode = null;
    const transport = this.transport;
    const protocol = this.#transport?.protocol ?? SUBPROTOCOL;
    // Only a client that had a choice says what works here.
    if (this.#transports.length > 1) rememberedTransport = transport;
    this.#fromMemory = false;
    this.#session = {
      session: frame.session,
      user: frame.user,
      node: frame.node,
      heartbeatMs: frame.heartbeat_ms,
      transport,
      protocol,
    };
    const reconnected = this.#everConnected;
    this.#everConnected = true;
    this.#welcomeInbox(frame.inbox);
    this.#startPinging(this.#options.pingIntervalMs ?? frame.heartbeat_ms);
    // Before `connected`, so requests its listeners make come after the resubscriptions and
    // the retries (which keep the order they were first sent in).
    for (const subscription of [...this.#rooms.values()]) this.#resubscribe(subscription);
    for (const entry of this.#retrying.splice(0)) {
      clearTimeout(entry.timer);
      this.#request(entry.frame, entry.handlers, entry.retrySince);
    }
    this.#sendAutoAck();
    const inbox = this.inbox;
    const event = {
      session: frame.session,
      user: frame.user,
      node: frame.node,
      url: this.url,
      transport,
      protocol,
      reconnected,
      ...(inbox && { inbox }),
    };
    this.#lastConnected = event;
    const waiters = this.#readyWaiters.splice(0);
    this._emit("connected", event);
    for (const { resolve } of waiters) resolve(event);
  }

  /**
   * Takes the inbox position a welcome announced. In the same epoch, what this client already
   * delivered stays delivered (the unacknowledged messages that follow are dropped up to it, and
   * an automatic ack that had not landed is sent again); a new epoch starts over.
   * @param {any} announced
   */
  #welcomeInbox(announced) {
    if (!announced || !Number.isSafeInteger(announced.seq) || !Number.isSafeInteger(announced.acked)) {
      this.#inbox = null;
      return;
    }
    const { seq, acked, epoch } = announced;
    const previous = this.#inbox;
    const sameEpoch = previous !== null && previous.epoch === epoch;
    const delivered = sameEpoch ? Math.max(previous.delivered, acked) : acked;
    if (!sameEpoch) this.#ackWanted = 0;
    this.#inbox = { seq, acked, epoch, delivered };
  }

  /** @param {Subscription} subscription */
  #resubscribe(subscription) {
    const { room, presenceEvents } = subscription;
    const since = { ...subscription.position };
    const frame = { type: "subscribe", room, since, ...(presenceEvents && { presence_events: true }) };
    this.#request(frame, {
      onReply: (reply) => {
        if (this.#rooms.get(room) !== subscription) return;
        subscription._subscribed(reply, since);
        const event = { room, recovered: reply.recovered === true, offset: reply.offset, epoch: reply.epoch };
        subscription._emit("resubscribed", event);
        this._emit("resubscribed", event);
      },
      onError: (error) => {
        if (this.#rooms.get(room) !== subscription) return;
        // The connection dropped again: the room is resubscribed on the next one.
        if (error.code === "disconnected") return;
        // Silence from a node that took the connection: start over on a new one.
        if (error.code === "timeout") {
          this.#abandon(this.#generation, `no answer to the resubscription of ${room}`);
          return;
        }
        this.#rooms.delete(room);
        subscription._end(error);
        this._emit("resubscribeFailed", { room, error });
      },
    });
  }

  /**
   * Pings when nothing was heard for `intervalMs`; an unanswered ping gives the connection up.
   * @param {number} intervalMs
   */
  #startPinging(intervalMs) {
    if (!(intervalMs > 0)) return;
    const generation = this.#generation;
    this.#pingTimer = setInterval(() => {
      if (this.#pinging || Date.now() - this.#lastHeard < intervalMs) return;
      this.#pinging = true;
      this.#request(
        { type: "ping" },
        {
          onReply: () => {
            this.#pinging = false;
          },
          onError: (error) => {
            this.#pinging = false;
            if (error.code === "timeout") this.#abandon(generation, "no answer to ping");
          },
        },
      );
    }, intervalMs);
  }
}

/**
 * A room message without its frame `type`.
 * @param {any} frame
 */
function strip(frame) {
  const { type: _type, ...message } = frame;
  return message;
}

/**
 * Creates a client and starts connecting.
 * @param {string | readonly string[]} url
 * @param {import("./switchboard.js").ConnectOptions} [options]
 */
export function connect(url, options) {
  return new Client(url, options);
}
