// A scripted node, passed to the client as `options.WebSocket` and `options.fetch`: the tests
// play the server frame by frame, over any transport, including faults a real server cannot be
// made to produce. Every connection the client opens, whatever its transport, is listed in
// `ScriptedSocket.opened` and has the same API: `url`, `sent` (the client frames it got, in
// order), `last`, `receive(frame)` and `drop(code, reason)`; awaiting those two lets the client
// handle what they caused (the fallback transports deliver through promises). A scripted
// WebSocket speaks the subprotocol the client offered first that `ScriptedSocket.supported`
// lists; on `switchboard.v1.json+deflate`, `receive` sends each frame stored and
// `receiveDeflated` compresses it.

import { deflateRawSync } from "node:zlib";

/** Lets the promise jobs and streams the client runs on settle. */
export async function settle() {
  for (let turn = 0; turn < 3; turn++) await new Promise((done) => setImmediate(done));
}

/** A WebSocket whose peer is the test: it records what the client sends. */
export class ScriptedSocket {
  /** @type {any[]} every scripted connection opened, of any transport */
  static opened = [];

  /** The subprotocols the scripted node knows (an older node knows only JSON). */
  static supported = ["switchboard.v1.json", "switchboard.v1.json+deflate"];

  /**
   * @param {string} url
   * @param {string | string[]} offered
   */
  constructor(url, offered) {
    this.transport = "websocket";
    this.url = url;
    /** What the client offered, as it passed it. */
    this.offered = offered;
    /** The subprotocol the scripted node chose, as a real one does: the first it knows. */
    this.protocol = [offered].flat().find((name) => ScriptedSocket.supported.includes(name)) ?? "";
    /** @type {string} set by the client */
    this.binaryType = "blob";
    this.readyState = 0;
    /** @type {any[]} */
    this.sent = [];
    /** @type {any} */
    this.onmessage = null;
    /** @type {any} */
    this.onclose = null;
    /** @type {any} */
    this.onerror = null;
    ScriptedSocket.opened.push(this);
  }

  /** @param {string} data */
  send(data) {
    this.sent.push(JSON.parse(data));
  }

  close() {
    this.readyState = 3;
  }

  /** @param {object} frame */
  receive(frame) {
    if (this.protocol === "switchboard.v1.json+deflate") return this.receiveBinary(0, JSON.stringify(frame));
    this.readyState = 1;
    this.onmessage?.({ data: JSON.stringify(frame) });
    return settle();
  }

  /**
   * A frame compressed with raw DEFLATE, as the node sends large ones on the compressed codec.
   * @param {object} frame
   */
  receiveDeflated(frame) {
    return this.receiveBinary(1, deflateRawSync(JSON.stringify(frame)));
  }

  /**
   * A binary message: `flag` (none when undefined) and then `body`, as an ArrayBuffer (the
   * client's `binaryType`).
   * @param {number | undefined} flag
   * @param {string | Uint8Array} body
   */
  receiveBinary(flag, body) {
    const bytes = typeof body === "string" ? new TextEncoder().encode(body) : body;
    const message = new Uint8Array((flag === undefined ? 0 : 1) + bytes.length);
    if (flag !== undefined) message[0] = flag;
    message.set(bytes, flag === undefined ? 0 : 1);
    this.readyState = 1;
    this.onmessage?.({ data: this.binaryType === "arraybuffer" ? message.buffer : new Blob([message]) });
    return settle();
  }

  /**
   * @param {number} code
   * @param {string} reason
   */
  drop(code, reason) {
    this.readyState = 3;
    this.onclose?.({ code, reason });
    return settle();
  }

  /** The handshake fails, as a refused upgrade does: an error while connecting, no close event. */
  refuse() {
    this.onerror?.({});
    this.readyState = 3;
    return settle();
  }

  /** The last frame sent. */
  get last() {
    return this.sent[this.sent.length - 1];
  }
}

/** The sessions of the scripted fallback connections, by session id (from their welcome). */
const sessions = new Map();

/** What both scripted fallback connections share: the welcome's key, and POSTed frames. */
class ScriptedFallback {
  /**
   * @param {string} transport
   * @param {string} url
   * @param {any} init
   */
  constructor(transport, url, init) {
    this.transport = transport;
    this.url = url;
    /** @type {Record<string, string>} the opening request's headers */
    this.headers = init.headers ?? {};
    /** @type {any[]} client frames, in the order POSTed */
    this.sent = [];
    /** @type {any[][]} each POST's frames */
    this.posts = [];
    /** @type {number[]} statuses the next POSTs get (then 202) */
    this.postStatuses = [];
    /** @type {number[]} statuses the next polls get (then they wait for frames) */
    this.pollStatuses = [];
    /** @type {string | null} */
    this.session = null;
    /** "dropped" (the connection is gone: requests fail) or "closed" (the session is: 404). */
    this.ended = "";
    ScriptedSocket.opened.push(this);
  }

  get last() {
    return this.sent[this.sent.length - 1];
  }

  get key() {
    return `key-of-${this.session}`;
  }

  /**
   * A welcome gets what the node adds on this transport; its session is then known.
   * @param {any} frame
   */
  stamp(frame) {
    if (frame.type !== "welcome") return frame;
    this.session = frame.session;
    sessions.set(frame.session, this);
    return { ...frame, transport: this.transport, session_key: this.key };
  }

  /**
   * @param {any} init
   * @returns {Response}
   */
  post(init) {
    const body = JSON.parse(init.body);
    const frames = Array.isArray(body) ? body : [body];
    const status = this.postStatuses.shift() ?? 202;
    if (status === 202) {
      this.posts.push(frames);
      this.sent.push(...frames);
    }
    return json(status === 202 ? { accepted: frames.length } : { code: "scripted", message: "scripted" }, status);
  }
}

/**
 * @param {unknown} value
 * @param {number} [status]
 */
function json(value, status = 200) {
  return new Response(JSON.stringify(value), { status, headers: { "content-type": "application/json" } });
}

/** An SSE stream whose events the test writes. */
class ScriptedStream extends ScriptedFallback {
  /** @type {ReadableStreamDefaultController} */
  #controller;

  /**
   * @param {string} url
   * @param {any} init
   */
  constructor(url, init) {
    super("sse", url, init);
    /** @type {ReadableStream} */
    this.body = new ReadableStream({
      start: (controller) => {
        this.#controller = controller;
      },
    });
    init.signal?.addEventListener("abort", () => this.#controller.error(init.signal.reason));
  }

  /**
   * Writes raw text to the stream, as it is (chunks may split lines and events).
   * @param {string} text
   */
  write(text) {
    this.#controller.enqueue(new TextEncoder().encode(text));
    return settle();
  }

  /** @param {object} frame */
  receive(frame) {
    return this.write(`data: ${JSON.stringify(this.stamp(frame))}\n\n`);
  }

  /**
   * 1006: the connection breaks; any other code: the last event is a close frame.
   * @param {number} code
   * @param {string} reason
   */
  drop(code, reason) {
    if (code === 1006) {
      this.ended = "dropped";
      this.#controller.error(new TypeError("terminated"));
    } else {
      this.ended = "closed";
      this.#controller.enqueue(new TextEncoder().encode(`data: ${JSON.stringify({ type: "close", code, reason })}\n\n`));
      this.#controller.close();
    }
    return settle();
  }
}

/** A long-poll session: `GET /poll` waits for the test's first frame, later polls for the next ones. */
class ScriptedPoll extends ScriptedFallback {
  /** @type {any[]} frames waiting for a poll */
  #queued = [];
  /** @type {{resolve: (response: Response) => void, reject: (error: unknown) => void} | null} */
  #pending = null;
  polls = 0;

  /**
   * @param {string} url
   * @param {any} init
   */
  constructor(url, init) {
    super("poll", url, init);
  }

  /**
   * The open request or a poll: answered once a frame is queued.
   * @param {any} init
   * @returns {Promise<Response>}
   */
  wait(init) {
    return new Promise((resolve, reject) => {
      this.#pending = { resolve, reject };
      init.signal?.addEventListener("abort", () => reject(init.signal.reason));
      this.#answer();
    });
  }

  #answer() {
    if (!this.#pending || this.#queued.length === 0) return;
    this.#pending.resolve(json(this.#queued.splice(0)));
    this.#pending = null;
  }

  /** @param {object} frame */
  receive(frame) {
    this.#queued.push(this.stamp(frame));
    this.#answer();
    return settle();
  }

  /** Answers the pending poll with `[]`, as the node does after its poll timeout. */
  timeout() {
    this.#pending?.resolve(json([]));
    this.#pending = null;
    return settle();
  }

  /**
   * 1006: the pending poll and every later request fail; any other code: the last frame is a
   * close frame, and the session is gone after it.
   * @param {number} code
   * @param {string} reason
   */
  drop(code, reason) {
    if (code === 1006) {
      this.ended = "dropped";
      this.#pending?.reject(new TypeError("fetch failed"));
      this.#pending = null;
    } else {
      this.#queued.push({ type: "close", code, reason });
      this.#answer();
      this.ended = "closed";
    }
    return settle();
  }
}

/**
 * Statuses the scripted node answers `GET /sse` or `GET /poll` with instead of opening a session
 * (`refusals.sse = 404`: no SSE here), until deleted.
 * @type {Record<string, number>}
 */
export const refusals = {};

/**
 * Every request the scripted node's HTTP side got, as "METHOD /path".
 * @type {string[]}
 */
export const requests = [];

/**
 * The scripted node's HTTP side, as `options.fetch`.
 * @param {string} input
 * @param {any} [init]
 * @returns {Promise<Response>}
 */
export async function scriptedFetch(input, init = {}) {
  const url = new URL(input);
  requests.push(`${init.method ?? "GET"} ${url.pathname}`);
  const [, endpoint, session] = url.pathname.match(/\/(sse|poll)(?:\/([^/]+))?$/) ?? [];
  if (!endpoint) return json({ code: "not_found" }, 404);
  if (session === undefined) {
    if (refusals[endpoint]) return new Response("refused", { status: refusals[endpoint] });
    if (endpoint === "sse") {
      const stream = new ScriptedStream(input, init);
      return new Response(stream.body, { headers: { "content-type": "text/event-stream" } });
    }
    const poll = new ScriptedPoll(input, init);
    return poll.wait(init);
  }
  const connection = sessions.get(decodeURIComponent(session));
  if (connection?.ended === "dropped") throw new TypeError("fetch failed");
  if (!connection || connection.ended === "closed") return json({ code: "unknown_session" }, 404);
  if (init.headers?.authorization !== `Session ${connection.key}`) return json({ code: "forbidden" }, 403);
  if (init.method === "POST") return connection.post(init);
  connection.polls++;
  const status = connection.pollStatuses.shift();
  if (status) return json({ code: "scripted", message: "scripted" }, status);
  return connection.wait(init);
}

/**
 * Connect options that make the client use the scripted node over `transport` only.
 * @param {string} transport
 */
export function over(transport) {
  return { transports: [transport], WebSocket: /** @type {any} */ (ScriptedSocket), fetch: scriptedFetch };
}

/** Connect options for the scripted node over WebSocket with the compressed codec. */
export function deflated() {
  return { ...over("websocket"), codec: /** @type {const} */ ("json+deflate") };
}

/** @param {string} session */
export const welcome = (session) => ({
  type: "welcome", session, user: "u", node: "n1", protocol: "switchboard.v1.json", heartbeat_ms: 0,
});
