// A WebSocket whose peer is the test, passed to the client as `options.WebSocket`: the tests
// play the server frame by frame, including faults a real server cannot be made to produce.

/** A WebSocket whose peer is the test: it records what the client sends. */
export class ScriptedSocket {
  /** @type {ScriptedSocket[]} */
  static opened = [];

  /**
   * @param {string} url
   * @param {string} protocol
   */
  constructor(url, protocol) {
    this.url = url;
    this.protocol = protocol;
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
    this.readyState = 1;
    this.onmessage?.({ data: JSON.stringify(frame) });
  }

  /**
   * @param {number} code
   * @param {string} reason
   */
  drop(code, reason) {
    this.readyState = 3;
    this.onclose?.({ code, reason });
  }

  /** The last frame sent. */
  get last() {
    return this.sent[this.sent.length - 1];
  }
}

/** @param {string} session */
export const welcome = (session) => ({
  type: "welcome", session, user: "u", node: "n1", protocol: "switchboard.v1.json", heartbeat_ms: 0,
});
