// The JavaScript SDK in real headless Chromium over wss:// straight to a node serving TLS
// (--tls-cert/--tls-key; target/debug/switchboard on a loopback port chosen at run time), with
// Chromium trusting the throwaway test CA the way a user or an administrator would: the CA is
// added to a fresh NSS database ($HOME/.pki/nssdb, made with certutil from libnss3-tools) in a
// temporary HOME that Chromium is started with, and Chromium gets no certificate-error flags. Two
// CAs are made with the openssl CLI: the trusted one signs the first node's certificate, and
// another one, which is not in the NSS database, signs the second node's. The SDK round-trips
// through the first node, and Chromium refuses the second with ERR_CERT_AUTHORITY_INVALID, both
// as a page and as a WebSocket: the browser verifies the chain, and the trust comes from the
// NSS database. The page is the node's https:// demo page; the SDK is the node's /switchboard.js
// (clients/js). Every process this starts is killed by pid at the end, pass or fail, and every
// temporary directory (certificates, HOME with its NSS database, profile) is removed.
//
// Run: tests/run.sh (after the cargo build; it installs libnss3-tools when certutil is missing),
// or `npm test` here once target/debug/switchboard exists. SWITCHBOARD_BIN and CHROMIUM override
// the binary and browser paths.

import assert from "node:assert/strict";
import { execFileSync, spawn } from "node:child_process";
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { createInterface } from "node:readline";
import { after, test } from "node:test";
import { fileURLToPath } from "node:url";

import { chromium } from "playwright-core";

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), "../..");
const BINARY = process.env.SWITCHBOARD_BIN ?? join(ROOT, "target/debug/switchboard");
const BROWSER = process.env.CHROMIUM ?? "/usr/bin/chromium";
/** How long any single expected event may take. */
const DEADLINE_MS = 15000;

const children = new Set();
const directories = new Set();

function cleanUp() {
  for (const child of children) {
    if (child.exitCode === null && child.signalCode === null) child.kill("SIGKILL");
  }
  children.clear();
  for (const directory of directories) rmSync(directory, { recursive: true, force: true });
  directories.clear();
}
process.on("exit", cleanUp);
after(cleanUp);

function temporaryDirectory(prefix) {
  const directory = mkdtempSync(join(tmpdir(), prefix));
  directories.add(directory);
  return directory;
}

/**
 * Two CAs, "trusted" and "untrusted", each signing one server certificate for 127.0.0.1 (named
 * after its CA), made with the openssl CLI. Both server certificates are otherwise alike, so the
 * only reason Chromium can have to refuse one is the CA that signed it.
 */
function makeCertificates() {
  const dir = temporaryDirectory("switchboard-wss-certs-");
  const openssl = (...args) => execFileSync("openssl", args, { cwd: dir, stdio: ["ignore", "ignore", "pipe"] });
  const key = (file) => openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", file);
  writeFileSync(
    join(dir, "server.ext"),
    "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
  );
  for (const name of ["trusted", "untrusted"]) {
    key(`${name}-ca.key`);
    openssl(
      "req", "-x509", "-new", "-key", `${name}-ca.key`, "-out", `${name}-ca.pem`, "-days", "1",
      "-subj", `/CN=switchboard browser test CA (${name})`,
      "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign",
    );
    key(`${name}.key`);
    openssl("req", "-new", "-key", `${name}.key`, "-out", `${name}.csr`, "-subj", "/CN=127.0.0.1");
    openssl(
      "x509", "-req", "-in", `${name}.csr`, "-CA", `${name}-ca.pem`, "-CAkey", `${name}-ca.key`,
      "-CAcreateserial", "-days", "1", "-extfile", "server.ext", "-out", `${name}.pem`,
    );
  }
  return {
    ca: (name) => join(dir, `${name}-ca.pem`),
    cert: (name) => join(dir, `${name}.pem`),
    key: (name) => join(dir, `${name}.key`),
  };
}

/**
 * A temporary HOME whose NSS database ($HOME/.pki/nssdb, where Chromium on Linux looks for
 * user-added trust) trusts `caFile` to identify TLS servers ("C,,"), and nothing else.
 */
function homeTrusting(caFile) {
  const home = temporaryDirectory("switchboard-chromium-home-");
  const nssdb = join(home, ".pki", "nssdb");
  mkdirSync(nssdb, { recursive: true });
  const certutil = (...args) => execFileSync("certutil", args, { encoding: "utf8", stdio: ["ignore", "pipe", "pipe"] });
  certutil("-N", "-d", `sql:${nssdb}`, "--empty-password");
  certutil("-A", "-d", `sql:${nssdb}`, "-n", "switchboard-test-ca", "-t", "C,,", "-i", caFile);
  // Read it back, so that a database Chromium would not see fails here rather than as a
  // certificate error in the browser.
  const listed = certutil("-L", "-d", `sql:${nssdb}`);
  assert.match(listed, /switchboard-test-ca\s+C,,/, `the NSS database trusts the test CA:\n${listed}`);
  return home;
}

/** Starts a node serving TLS with the certificate `name`; resolves with its URLs once ready. */
async function startTlsNode(id, certs, name) {
  const env = Object.fromEntries(Object.entries(process.env).filter(([key]) => !key.startsWith("SWITCHBOARD_")));
  const child = spawn(
    BINARY,
    [
      "--listen", "127.0.0.1:0",
      "--internal-listen", "127.0.0.1:0",
      "--node-id", id,
      "--tls-cert", certs.cert(name),
      "--tls-key", certs.key(name),
      "--log-format", "json",
    ],
    { env, stdio: ["ignore", "ignore", "pipe"] },
  );
  children.add(child);
  child.on("exit", () => children.delete(child));
  const logs = [];
  let timer;
  const fields = await Promise.race([
    new Promise((done, fail) => {
      createInterface({ input: child.stderr }).on("line", (line) => {
        logs.push(line);
        try {
          const fields = JSON.parse(line).fields ?? {};
          if (fields.public && fields.internal) done(fields);
        } catch {
          // Not a JSON log line.
        }
      });
      child.on("exit", (code) => fail(new Error(`${id} exited with ${code}: ${logs.join("\n")}`)));
    }),
    new Promise((_, fail) => {
      timer = setTimeout(() => fail(new Error(`${id} did not start: ${logs.join("\n")}`)), DEADLINE_MS);
    }),
  ]).finally(() => clearTimeout(timer));
  assert.equal(fields.tls, true, `${id} logs that it serves TLS`);
  return { id, https: `https://${fields.public}/`, wss: `wss://${fields.public}/ws` };
}

test("the JS SDK in Chromium round-trips over wss:// to a node whose CA the browser trusts through NSS", { timeout: 120000 }, async () => {
  const certs = makeCertificates();
  const trusted = await startTlsNode("node-wss", certs, "trusted");
  const untrusted = await startTlsNode("node-untrusted-ca", certs, "untrusted");

  const home = homeTrusting(certs.ca("trusted"));
  const profile = temporaryDirectory("switchboard-chromium-wss-");
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: BROWSER,
    headless: true,
    // Chromium on Linux reads user-added trust from $HOME/.pki/nssdb; the rest of the
    // environment is kept (PATH, locale) so that only the trust store differs from a plain run.
    env: { ...process.env, HOME: home },
    // No --ignore-certificate-errors* flag and no ignoreHTTPSErrors: the certificate must verify.
    args: [
      "--headless",
      "--no-sandbox",
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
    ],
  });
  try {
    // The negative control: a certificate for the same address from a CA that is not in the NSS
    // database is refused, for its issuer. In a page of its own, whose error page cannot
    // interrupt the navigation below.
    const refusedPage = await context.newPage();
    await assert.rejects(refusedPage.goto(untrusted.https), /ERR_CERT_AUTHORITY_INVALID/);
    await refusedPage.close();

    const page = await context.newPage();
    const errors = [];
    page.on("pageerror", (error) => errors.push(error));

    const response = await page.goto(trusted.https);
    assert.equal(response.status(), 200, "the demo page over https");
    const result = await page.evaluate(
      async ({ url, untrustedUrl, deadline }) => {
        const { connect } = await import("/switchboard.js");
        const within = (promise, what) =>
          Promise.race([
            promise,
            new Promise((_, fail) => setTimeout(() => fail(new Error(`timed out: ${what}`)), deadline)),
          ]);
        const alice = connect(`${url}?user=alice`);
        const bob = connect(`${url}?user=bob`);
        const [aliceReady, bobReady] = await within(Promise.all([alice.ready(), bob.ready()]), "connect");
        let deliver;
        const received = new Promise((done) => {
          deliver = done;
        });
        await within(alice.subscribe("secure.room", (message) => deliver(message)), "subscribe");
        const { offset } = await within(bob.publish("secure.room", { text: "over wss" }), "publish");
        const message = await within(received, "delivery");
        // The untrusted CA's node fails from the page too: the socket never opens.
        const refused = await within(
          new Promise((done) => {
            const socket = new WebSocket(untrustedUrl);
            socket.onopen = () => done({ opened: true });
            socket.onclose = (event) => done({ opened: false, code: event.code });
          }),
          "the refused socket to close",
        );
        alice.close();
        bob.close();
        return {
          users: [aliceReady.user, bobReady.user],
          published: offset,
          message: { room: message.room, data: message.data, offset: message.offset, from: message.from?.user },
          refused,
        };
      },
      { url: trusted.wss, untrustedUrl: untrusted.wss, deadline: DEADLINE_MS },
    );
    assert.deepEqual(result.users, ["alice", "bob"]);
    assert.deepEqual(result.message, {
      room: "secure.room",
      data: { text: "over wss" },
      offset: result.published,
      from: "bob",
    });
    assert.deepEqual(result.refused, { opened: false, code: 1006 });
    assert.deepEqual(errors, []);
  } finally {
    await context.close();
  }
});
