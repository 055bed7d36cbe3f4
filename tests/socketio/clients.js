// Socket.IO 4.x clients for tests/integration/test_socketio.py: `node clients.js URL COUNT`.
// Each client uses the default transports (HTTP long-polling first, then the upgrade to
// WebSocket), keeps cookies (withCredentials: the Node client's cookie jar), does not reconnect,
// and succeeds when it is connected, upgraded to WebSocket, and its echo comes back from the
// backend that greeted it. Prints one JSON summary line.
"use strict";
const { io } = require("socket.io-client");

const url = process.argv[2];
const count = Number(process.argv[3]);
const perClientMs = Number(process.argv[4] || 20000);

function one(i) {
  return new Promise((resolve) => {
    const socket = io(url, { forceNew: true, reconnection: false, withCredentials: true, timeout: perClientMs });
    let welcome = null;
    let upgraded = false;
    let done = false;
    const finish = (result) => {
      if (done) return;
      done = true;
      clearTimeout(timer);
      socket.close();
      resolve(result);
    };
    const timer = setTimeout(
      () => finish({ ok: false, error: `timeout (welcome: ${welcome !== null}, upgraded: ${upgraded})` }),
      perClientMs
    );
    const maybeEcho = () => {
      if (welcome === null || !upgraded) return;
      socket.timeout(perClientMs).emit("echo", `hello ${i}`, (err, reply) => {
        if (err) return finish({ ok: false, error: `no echo: ${err.message}` });
        const same = reply.backend === welcome.backend;
        const ok = same && reply.transport === "websocket" && reply.msg === `hello ${i}`;
        finish({ ok, backend: reply.backend, error: ok ? undefined : `echo from ${reply.backend} via ${reply.transport}` });
      });
    };
    socket.on("welcome", (w) => {
      welcome = w;
      maybeEcho();
    });
    socket.on("connect", () => {
      const engine = socket.io.engine;
      const onUpgrade = () => {
        upgraded = true;
        maybeEcho();
      };
      if (engine.transport.name === "websocket") onUpgrade();
      else engine.once("upgrade", onUpgrade);
    });
    const failed = (what) => (err) => {
      const ctx = err && err.context;
      const body = ctx && (ctx.responseText || (typeof ctx === "string" ? ctx : ""));
      finish({ ok: false, error: `${what}: ${err && err.message} ${err && err.description} ${body || ""}`.trim() });
    };
    socket.on("connect_error", failed("connect_error"));
    socket.on("disconnect", (reason, details) => {
      const ctx = details && details.context;
      const body = ctx && ctx.responseText;
      finish({ ok: false, error: `disconnect: ${reason} ${(details && details.description) || ""} ${body || ""}`.trim() });
    });
  });
}

Promise.all(Array.from({ length: count }, (_, i) => one(i))).then((results) => {
  const backends = {};
  for (const r of results) if (r.ok) backends[r.backend] = (backends[r.backend] || 0) + 1;
  const errors = results.filter((r) => !r.ok).map((r) => r.error);
  console.log(JSON.stringify({ ok: results.filter((r) => r.ok).length, count, backends, errors }));
  process.exit(0);
});
