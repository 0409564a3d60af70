// The JavaScript SDK in real headless Chromium over wss:// straight to a node serving TLS
// (--tls-cert/--tls-key; target/debug/switchboard on a loopback port chosen at run time). A
// throwaway CA and two server certificates are made with the openssl CLI; Chromium is told to
// accept exactly the first server key (--ignore-certificate-errors-spki-list with the SHA-256 of
// its SubjectPublicKeyInfo), so a node with the second certificate, signed by the same CA, is
// refused: the browser verifies the certificate and only the pinned test key gets through. The
// page is the node's https:// demo page; the SDK is the node's /switchboard.js (clients/js).
// Every process this starts is killed by pid at the end, pass or fail.
//
// Run: tests/run.sh (after the cargo build), or `npm test` here once target/debug/switchboard
// exists. SWITCHBOARD_BIN and CHROMIUM override the binary and browser paths.

import assert from "node:assert/strict";
import { execFileSync, spawn } from "node:child_process";
import { createHash, X509Certificate } from "node:crypto";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
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

/** A CA and two server certificates it signed for 127.0.0.1, made with the openssl CLI. */
function makeCertificates() {
  const dir = temporaryDirectory("switchboard-wss-certs-");
  const openssl = (...args) => execFileSync("openssl", args, { cwd: dir, stdio: ["ignore", "ignore", "pipe"] });
  const key = (file) => openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", file);
  key("ca.key");
  openssl(
    "req", "-x509", "-new", "-key", "ca.key", "-out", "ca.pem", "-days", "1",
    "-subj", "/CN=switchboard browser test CA",
    "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign",
  );
  writeFileSync(
    join(dir, "server.ext"),
    "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
  );
  for (const name of ["pinned", "other"]) {
    key(`${name}.key`);
    openssl("req", "-new", "-key", `${name}.key`, "-out", `${name}.csr`, "-subj", "/CN=127.0.0.1");
    openssl(
      "x509", "-req", "-in", `${name}.csr`, "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
      "-days", "1", "-extfile", "server.ext", "-out", `${name}.pem`,
    );
  }
  return {
    cert: (name) => join(dir, `${name}.pem`),
    key: (name) => join(dir, `${name}.key`),
    /** base64 SHA-256 of the certificate's SubjectPublicKeyInfo, as Chromium's flag wants it. */
    spki: (name) => {
      const der = new X509Certificate(readFileSync(join(dir, `${name}.pem`))).publicKey.export({
        type: "spki",
        format: "der",
      });
      return createHash("sha256").update(der).digest("base64");
    },
  };
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

test("the JS SDK in Chromium round-trips over wss:// with a certificate the browser verifies", { timeout: 120000 }, async () => {
  const certs = makeCertificates();
  const pinned = await startTlsNode("node-wss", certs, "pinned");
  const other = await startTlsNode("node-other-key", certs, "other");

  const profile = temporaryDirectory("switchboard-chromium-wss-");
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: BROWSER,
    headless: true,
    args: [
      "--headless",
      "--no-sandbox",
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
      `--ignore-certificate-errors-spki-list=${certs.spki("pinned")}`,
    ],
  });
  try {
    // Same CA, another key: not pinned, so Chromium refuses it. In a page of its own, whose
    // error page cannot interrupt the navigation below.
    const refusedPage = await context.newPage();
    await assert.rejects(refusedPage.goto(other.https), /ERR_CERT/);
    await refusedPage.close();

    const page = await context.newPage();
    const errors = [];
    page.on("pageerror", (error) => errors.push(error));

    const response = await page.goto(pinned.https);
    assert.equal(response.status(), 200, "the demo page over https");
    const result = await page.evaluate(
      async ({ url, otherUrl, deadline }) => {
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
        // The other node's certificate fails in the page too: the socket never opens.
        const refused = await within(
          new Promise((done) => {
            const socket = new WebSocket(otherUrl);
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
      { url: pinned.wss, otherUrl: other.wss, deadline: DEADLINE_MS },
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
