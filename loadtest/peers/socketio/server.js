// Socket.IO 4 peer for the side-by-side benchmark (loadtest/bench.sh): speaks exactly the
// contract in loadtest/src/protocol.rs. Several of these processes sharing one REDIS_URL form a
// cluster through @socket.io/redis-adapter, as switchboard nodes do through their Redis.
//
//   PORT       port to listen on; 0 (the default) picks a free one
//   HOST       address to listen on (default 127.0.0.1)
//   REDIS_URL  the shared Redis (default redis://127.0.0.1:6379)
//
// Prints one line `listening on HOST:PORT` on stdout once listening; exits on SIGTERM or SIGINT.
"use strict";

const http = require("node:http");
const { Server } = require("socket.io");
const { createAdapter } = require("@socket.io/redis-adapter");
const { createClient } = require("redis");

const port = Number(process.env.PORT || 0);
const host = process.env.HOST || "127.0.0.1";
const redisUrl = process.env.REDIS_URL || "redis://127.0.0.1:6379";

async function main() {
  const pubClient = createClient({ url: redisUrl });
  const subClient = pubClient.duplicate();
  // Without a listener node-redis would crash the process on a connection error; it reconnects.
  for (const client of [pubClient, subClient]) {
    client.on("error", (error) => console.error(`redis: ${error.message}`));
  }
  await Promise.all([pubClient.connect(), subClient.connect()]);

  const httpServer = http.createServer();
  // WebSocket only and no compression: the same conditions as switchboard and the raw server.
  const io = new Server(httpServer, {
    transports: ["websocket"],
    perMessageDeflate: false,
    serveClient: false,
    adapter: createAdapter(pubClient, subClient),
  });

  io.on("connection", (socket) => {
    socket.on("subscribe", (room, ack) => {
      socket.join(String(room));
      if (typeof ack === "function") ack("ok");
    });
    socket.on("publish", (room, data) => {
      io.to(String(room)).emit("message", data);
    });
  });

  httpServer.listen(port, host, () => {
    const address = httpServer.address();
    console.log(`listening on ${address.address}:${address.port}`);
  });
}

// A benchmark peer: stopping drops every connection at once, there is nothing to hand over.
for (const signal of ["SIGTERM", "SIGINT"]) {
  process.on(signal, () => process.exit(0));
}

main().catch((error) => {
  console.error(error);
  process.exit(1);
});
