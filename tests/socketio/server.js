// A Socket.IO 4.x backend for tests/integration/test_socketio.py: `node server.js PORT ID`.
// Greets each client with its own id, echoes "echo" events with the id and the transport in
// use, and reports Engine.IO connection errors (e.g. "Session ID unknown") as JSON lines.
"use strict";
const http = require("http");
const { Server } = require("socket.io");

const port = Number(process.argv[2]);
const id = process.argv[3];
const httpServer = http.createServer();
const io = new Server(httpServer);

io.on("connection", (socket) => {
  socket.emit("welcome", { backend: id });
  socket.on("echo", (msg, reply) => {
    reply({ backend: id, msg, transport: socket.conn.transport.name });
  });
});
io.engine.on("connection_error", (err) => {
  console.log(JSON.stringify({ event: "connection_error", backend: id, message: err.message }));
});
process.stdin.on("end", () => process.exit(0)); // the test went away: so do we
process.stdin.resume();
httpServer.listen(port, "127.0.0.1", () => {
  console.log(JSON.stringify({ event: "listening", backend: id, port: httpServer.address().port }));
});
