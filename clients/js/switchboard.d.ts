// Type declarations for @switchboard/client: the JavaScript client of the switchboard WebSocket
// gateway (wire protocol v1, JSON codec, optionally compressed on WebSocket), with SSE and
// long-poll fallbacks. Hand-written;
// switchboard.js is the implementation.

/** Any JSON value: what `data` carries in rooms, direct messages and broadcasts. */
export type Json = null | boolean | number | string | Json[] | { [key: string]: Json };

/** A position in a room's stream. Offsets of different epochs are unrelated. */
export interface StreamPosition {
  offset: number;
  epoch: string;
}

/** Who published or sent something; absent when it came from the server API. */
export interface Sender {
  user: string;
  session: string;
}

/** A message in a subscribed room. */
export interface RoomMessage<T = Json> {
  room: string;
  data: T;
  offset: number;
  epoch: string;
  from?: Sender;
}

/** Another session joined or left a room subscribed with `presenceEvents: true`. */
export interface PresenceEvent {
  type: "join" | "leave";
  room: string;
  user: string;
  session: string;
}

/** One subscribed session, as listed by `presence`. */
export interface PresenceMember {
  user: string;
  session: string;
  info?: Json;
}

/**
 * The error every rejected promise carries. `code` is the server's stable error code
 * (`forbidden`, `bad_frame`, `not_subscribed`, `already_subscribed`, `rate_limited`,
 * `unavailable`: certainly not done, `unknown_outcome`: a `publish` that may or may not have been
 * published, ...) or one of the client's own:
 * - `timeout`: no answer within `requestTimeoutMs` (the request may still have been carried out);
 * - `disconnected`: the client was not connected when the request was made, or the connection
 *   dropped before the answer came (then the outcome is unknown; a request retried with its
 *   key gets this only when the client stops, or does not reconnect within `retryWindowMs`);
 * - `already_subscribed`: `subscribe` of a room this client is already subscribed to;
 * - `connect_failed` (only on the `error` event): the `token` function threw, or the WebSocket
 *   constructor did.
 */
export declare class SwitchboardError extends Error {
  constructor(code: string, message: string);
  readonly name: "SwitchboardError";
  readonly code: string;
}

/** Reconnect policy. Delays are drawn with full jitter (see `backoffDelay`). */
export interface ReconnectOptions {
  /** Reconnect automatically at all (default true). */
  enabled?: boolean;
  /** Cap of the first delay after an unexpected close or a failed attempt (default 500 ms). */
  initialDelayMs?: number;
  /** Largest delay ever waited (default 10000 ms). */
  maxDelayMs?: number;
  /** Growth of the cap per failed attempt (default 2; values below 1 count as 1). */
  multiplier?: number;
  /** Failed attempts in a row before giving up (default Infinity). */
  maxAttempts?: number;
  /**
   * Cap of the first delay after a 1001 close (the node is draining; the others are up, so come
   * back soon, spread over this window). Default 100 ms; grows like `initialDelayMs`.
   */
  drainingDelayMs?: number;
  /** Least delay after a 1013 close (overloaded or too slow a reader). Default 1000 ms. */
  overloadedDelayMs?: number;
}

/** A minimal WebSocket constructor (the standard browser API). */
export interface WebSocketConstructor {
  new (url: string, protocols?: string | string[]): WebSocket;
}

/**
 * How a client reaches the node: `websocket` (`/ws`), `sse` (server-sent events: `GET /sse`,
 * client frames POSTed to `/sse/{session}`) or `poll` (long polling: `GET /poll`, then
 * `GET /poll/{session}` in a loop, client frames POSTed to `/poll/{session}`).
 */
export type Transport = "websocket" | "sse" | "poll";

/** A `fetch` function (the standard API): what the SSE and long-poll transports use. */
export type FetchFunction = (input: string, init?: RequestInit) => Promise<Response>;

export interface ConnectOptions {
  /**
   * A JWT (when the node has authentication on), or a function returning one, called before
   * every connection attempt (and each transport an attempt falls back to) so a reconnect can
   * use a fresh token. Sent as `?token=` on a WebSocket (browsers cannot set headers on one):
   * use wss:// and short-lived tokens; SSE and long polling send it as `Authorization: Bearer`.
   */
  token?: string | (() => string | Promise<string>);
  /** The user id, for nodes with authentication off (`?user=`). */
  user?: string;
  /**
   * Wire codec on WebSocket (SSE and long polling always speak JSON). "json" (the default):
   * `switchboard.v1.json`. "json+deflate": offers `switchboard.v1.json+deflate` first (server
   * frames compressed with raw DEFLATE, decoded with `DecompressionStream("deflate-raw")`), then
   * `switchboard.v1.json` for nodes without it. A server frame that inflates past 64 MiB ends the
   * connection with 1009 (and the client reconnects).
   */
  codec?: Codec;
  /** How long a request waits for its answer, and a connection for its welcome (default 10000 ms). */
  requestTimeoutMs?: number;
  /**
   * When nothing was heard for this long, send an application-level `ping`; no answer within
   * `requestTimeoutMs` closes the connection and reconnects. Default: the node's `heartbeat_ms`
   * from `welcome`. 0 disables.
   */
  pingIntervalMs?: number;
  reconnect?: ReconnectOptions;
  /**
   * The transports to use, in order (default `["websocket", "sse", "poll"]`). An attempt that
   * fails before the node's `welcome` (the WebSocket cannot open, or is closed before the
   * welcome, as broken proxies do) falls back to the next one at once. What worked is
   * remembered for the page's lifetime: every client with several transports starts there; a
   * remembered transport that fails is forgotten, ends that attempt, and the next attempt
   * starts from the first.
   * One element forces that transport. A transport the environment lacks (no `WebSocket`, no
   * `fetch`) is left out.
   */
  transports?: readonly Transport[];
  /** The WebSocket constructor (default `globalThis.WebSocket`). */
  WebSocket?: WebSocketConstructor;
  /** The `fetch` of the SSE and long-poll transports (default `globalThis.fetch`). */
  fetch?: FetchFunction;
  /** The random source for back-off jitter, in [0, 1) (default `Math.random`). */
  random?: () => number;
  /**
   * Acknowledge persisted direct messages automatically once every `direct` listener has
   * returned (default false). Cumulative: one ack of the highest seq handled, at most one in
   * flight; what is handled meanwhile goes in the next one. Asynchronous work a listener starts
   * is not awaited: acknowledge it yourself with `ack(seq)` when it must finish first.
   */
  autoAck?: boolean;
  /**
   * Retry `publish` and persisted `send` through a reconnect (default false): each carries an
   * idempotency key (the caller's, or a generated one), and one whose connection dropped before
   * its answer is sent again with the same key once reconnected, so it is carried out once and
   * its promise settles once, with the server's answer (`duplicate: true` when the first had
   * landed). Each call can override it with its own `retry`.
   */
  retry?: boolean;
  /**
   * How long after it was first sent a request is still retried (default 60000 ms). Keep it
   * well below the server's `--idempotency-window-secs` (default 300 s): past that window a
   * repeat of the key is no longer recognised.
   */
  retryWindowMs?: number;
}

/** The wire codecs the client speaks. */
export type Codec = "json" | "json+deflate";

export type ClientState = "connecting" | "connected" | "reconnecting" | "closed";

export interface ConnectedEvent {
  session: string;
  user: string;
  node: string;
  /** The URL (as given to `connect`, without the added query) this connection was made to. */
  url: string;
  /** The transport of this connection. */
  transport: Transport;
  /**
   * The subprotocol this connection speaks: on WebSocket the one the node chose
   * (`switchboard.v1.json+deflate` when it took the compressed codec), else `switchboard.v1.json`.
   */
  protocol: string;
  /** False for the first connection, true after every reconnect. */
  reconnected: boolean;
  /**
   * The user's inbox as the welcome announced it (absent from servers without inboxes). The
   * unacknowledged messages (seq > acked) follow as `direct` events with their `seq`.
   */
  inbox?: InboxPosition;
}

/** Where a user's inbox of persisted direct messages stands. */
export interface InboxPosition {
  /** The seq of the latest message stored (0: none). */
  seq: number;
  /** Everything up to this seq is acknowledged. */
  acked: number;
  /** Changes when the inbox's history is lost; seqs of different epochs are unrelated. */
  epoch: string;
}

export interface DisconnectedEvent {
  /**
   * The close code (1006 when the connection was lost without one, or was given up locally).
   * On SSE and long polling, the node's last `close` frame gives it, as a WebSocket close does.
   */
  code: number;
  reason: string;
  /** Whether the client will try to reconnect. */
  willReconnect: boolean;
}

export interface ReconnectingEvent {
  /** The attempt about to be made, from 1. */
  attempt: number;
  delayMs: number;
  /** The URL that attempt will use: the one after the previous attempt's, round-robin. */
  url: string;
  /** The transport that attempt starts with (the remembered one, or the first). */
  transport: Transport;
}

export interface DirectEvent<T = Json> {
  data: T;
  from?: Sender;
  /**
   * Persisted messages only: the message's place in the user's inbox. Each seq is delivered
   * once per client (one redelivered after a reconnect is dropped) until acknowledged with
   * `ack(seq)` or `autoAck`.
   */
  seq?: number;
}

export interface PublishOptions {
  /** Idempotency key, 1 to 64 bytes: a repeat within the server's window creates nothing. */
  key?: string;
  /** Retry through a reconnect with the (generated if absent) key; default: `ConnectOptions.retry`. */
  retry?: boolean;
}

export interface SendOptions extends PublishOptions {
  /**
   * Store the message in the recipient's inbox before the answer (default false): it is
   * delivered to sessions that connect later, until acknowledged. `key` and `retry` need it.
   */
  persist?: boolean;
}

export interface PublishReply extends StreamPosition {
  /** The key had been used within the window: this is the first publish's answer. */
  duplicate: boolean;
}

export interface PersistedSendReply {
  /** Sessions it reached now. */
  sessions: number;
  /** Its seq in the recipient's inbox. */
  seq: number;
  /** The key had been used within the window: this is the first send's answer. */
  duplicate: boolean;
}

export interface BroadcastEvent<T = Json> {
  data: T;
}

export interface ResubscribedEvent {
  room: string;
  /** False when messages may have been missed: reload the room's state another way. */
  recovered: boolean;
  offset: number;
  epoch: string;
}

export interface ResubscribeFailedEvent {
  room: string;
  error: SwitchboardError;
}

export interface ClientEvents {
  connected: ConnectedEvent;
  disconnected: DisconnectedEvent;
  reconnecting: ReconnectingEvent;
  direct: DirectEvent;
  broadcast: BroadcastEvent;
  /** Every room message delivered to a subscription, after its handler. */
  message: RoomMessage;
  /** Every join/leave of a room subscribed with `presenceEvents`. */
  presence: PresenceEvent;
  resubscribed: ResubscribedEvent;
  resubscribeFailed: ResubscribeFailedEvent;
  /**
   * An `error` frame that answers no request, an unreadable frame, `connect_failed`, or a
   * failed automatic ack (`autoAck`).
   */
  error: SwitchboardError;
}

export interface SubscriptionEvents {
  message: RoomMessage;
  presence: PresenceEvent;
  /** After a reconnect; with `recovered: false` messages may have been missed. */
  resubscribed: ResubscribedEvent;
  /** The subscription ended without `unsubscribe()`: a resubscribe failed, or the client closed. */
  ended: { error?: SwitchboardError };
}

export interface SubscribeOptions<T = Json> {
  /** Receive join/leave events of other sessions (default false). */
  presenceEvents?: boolean;
  /** Called with each join/leave (implies `presenceEvents: true`). */
  onPresence?: (event: PresenceEvent) => void;
  /** Resume from a stored position: the missed messages are delivered first. */
  since?: StreamPosition;
}

export interface Subscription<T = Json> {
  readonly room: string;
  /** The subscribe reply's position: the room's latest offset when subscribed. */
  readonly offset: number;
  readonly epoch: string;
  /** Set when subscribed with `since`: whether every missed message will be delivered. */
  readonly recovered?: boolean;
  /** The last position delivered (what a reconnect resumes from). */
  readonly position: StreamPosition;
  readonly presenceEvents: boolean;
  /** False once unsubscribed or ended. */
  readonly active: boolean;
  on<K extends keyof SubscriptionEvents>(event: K, listener: (value: SubscriptionEvents[K]) => void): () => void;
  off<K extends keyof SubscriptionEvents>(event: K, listener: (value: SubscriptionEvents[K]) => void): void;
  /** Same as `client.unsubscribe(room)`. */
  unsubscribe(): Promise<void>;
}

export interface HistoryOptions {
  since?: StreamPosition;
  limit?: number;
}

export interface HistoryReply {
  messages: RoomMessage[];
  offset: number;
  epoch: string;
  /**
   * The reply stopped early to stay within the server's message size limit: ask again with
   * `since` set to the last message's position for the next page.
   */
  more: boolean;
}

export declare class Client {
  /**
   * The URL of the current connection, or of the attempt under way or about to be made
   * (as given to `connect`, without the added `token`/`user` query).
   */
  readonly url: string;
  /** Every URL given to `connect`, in the order they are tried. */
  readonly urls: readonly string[];
  /** The transport of the current connection, or of the attempt under way or about to be made. */
  readonly transport: Transport;
  /** The transports this client uses, in order (`transports` less those the environment lacks). */
  readonly transports: readonly Transport[];
  readonly state: ClientState;
  /** The current session's welcome, or null while not connected. */
  readonly session: { session: string; user: string; node: string; heartbeatMs: number; transport: Transport; protocol: string } | null;
  /**
   * The user's inbox as last heard (welcome, then persisted directs and acks), or null before
   * a welcome that announced one.
   */
  readonly inbox: InboxPosition | null;
  /** Subscribed rooms (including those waiting to be resubscribed). */
  readonly subscriptions: ReadonlyMap<string, Subscription>;

  /** Adds a listener; returns a function that removes it. */
  on<K extends keyof ClientEvents>(event: K, listener: (value: ClientEvents[K]) => void): () => void;
  off<K extends keyof ClientEvents>(event: K, listener: (value: ClientEvents[K]) => void): void;

  /** Resolves when connected (at once if it is); rejects with `disconnected` if the client stops for good. */
  ready(): Promise<ConnectedEvent>;

  /** Subscribes; resolves with the subscription once the server replied. */
  subscribe<T = Json>(
    room: string,
    handler?: (message: RoomMessage<T>) => void,
    options?: SubscribeOptions<T>,
  ): Promise<Subscription<T>>;
  /** Stops delivery at once and tells the server; resolves at once when disconnected (nothing to undo). */
  unsubscribe(room: string): Promise<void>;
  /** Rejects with a TypeError (nothing sent) for a key that is not 1 to 64 bytes. */
  publish(room: string, data: Json, options?: PublishOptions): Promise<PublishReply>;
  /** Fire-and-forget: reaches the sessions connected now. */
  send(user: string, data: Json, options?: { persist?: false }): Promise<{ sessions: number }>;
  /** Persisted: stored in the recipient's inbox first. */
  send(user: string, data: Json, options: SendOptions & { persist: true }): Promise<PersistedSendReply>;
  send(user: string, data: Json, options?: SendOptions): Promise<{ sessions: number } | PersistedSendReply>;
  /**
   * Acknowledges every inbox message up to `seq` (cumulative, per user: no session of the user
   * gets them again). A seq beyond the inbox's latest is refused with `bad_frame`.
   */
  ack(seq: number): Promise<void>;
  presence(room: string): Promise<{ members: PresenceMember[] }>;
  history(room: string, options?: HistoryOptions): Promise<HistoryReply>;
  /** An application-level ping; resolves with the round-trip time in ms. */
  ping(): Promise<number>;

  /** After the client stopped (1008, attempts exhausted), starts connecting again. */
  reconnect(): void;
  /** Closes with 1000 and stops reconnecting; pending requests reject with `disconnected`. */
  close(): void;
}

/**
 * Creates a client and starts connecting at once (listen for `connected` or await `ready()`).
 * `url` is one ws:// or wss:// URL, or a non-empty array of them (nodes or load balancers of the
 * same cluster): the first attempt uses the first, every later attempt the next one, round-robin.
 * The SSE and long-poll transports use the same URLs with http(s):// and the path's `/ws`
 * replaced by `/sse` or `/poll`. Throws a TypeError for an empty array, a URL that is not ws://
 * or wss://, an unsupported `codec`, a bad `transports`, or no transport left (no `WebSocket`
 * and only `websocket` wanted).
 */
export declare function connect(url: string | readonly string[], options?: ConnectOptions): Client;

/**
 * The delay before reconnect attempt `attempt` (from 0) of an outage that began with close code
 * `closeCode` (1006 for a lost connection): a uniform draw from [floor, max(floor, cap)] where
 * cap = min(maxDelayMs, base × multiplier^attempt), base = drainingDelayMs after 1001 and
 * initialDelayMs otherwise, and floor = overloadedDelayMs (at most maxDelayMs) after 1013, else 0.
 */
export declare function backoffDelay(
  attempt: number,
  closeCode: number,
  options?: ReconnectOptions,
  random?: () => number,
): number;

/** Whether the client reconnects after a close with this code (not after 1002, 1007, 1008). */
export declare function shouldReconnect(closeCode: number): boolean;
