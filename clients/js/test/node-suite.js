// The setup the tests against one real switchboard node share: clients that are closed after the
// tests (over one transport, for the suites that run over each), and a node that lives as long as
// a suite.

import { after, before } from "node:test";

import { connect } from "../switchboard.js";
import { Node } from "./harness.js";

/** @type {import("../switchboard.js").Client[]} */
const clients = [];

/**
 * A client that is closed after the tests.
 * @param {string} url
 * @param {import("../switchboard.js").ConnectOptions} [options]
 */
export function open(url, options) {
  const client = connect(url, options);
  clients.push(client);
  return client;
}

after(() => {
  for (const client of clients) client.close();
});

/**
 * `open`, over `transport` only.
 * @param {"websocket" | "sse" | "poll"} transport
 */
export function opener(transport) {
  return (/** @type {string} */ url, /** @type {import("../switchboard.js").ConnectOptions} */ options = {}) =>
    open(url, { transports: [transport], ...options });
}

/**
 * Starts a node with `args` before the tests of the enclosing suite, hands it to `use`, and kills
 * it after them.
 * @param {(node: Node) => void} use
 * @param {string[]} [args]
 */
export function nodeForSuite(use, args = []) {
  /** @type {Node | undefined} */
  let node;
  before(async () => {
    node = await Node.start(args);
    use(node);
  });
  after(() => node?.kill());
}
