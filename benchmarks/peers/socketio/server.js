// The Socket.IO tutorial's chat server (https://socket.io/get-started/chat), as a peer:
//   io.on('connection', s => s.on('message', m => io.emit('message', m)))
// Only additions: the port comes from the command line, an optional ack callback is
// answered (the benchmark's persistence/ack paths), and "ready" is printed when listening.
'use strict';
const http = require('http');
const { Server } = require('socket.io');

const port = Number(process.argv[2] || 3000);
const host = process.argv[3] || '127.0.0.1';
const server = http.createServer((req, res) => {
  res.writeHead(req.url === '/healthz' ? 200 : 404);
  res.end();
});
const io = new Server(server, { transports: ['websocket'], serveClient: false });

io.on('connection', (socket) => {
  socket.on('message', (msg, ack) => {
    io.emit('message', msg);
    if (typeof ack === 'function') ack();
  });
});

server.listen(port, host, () => console.log(`ready ${host}:${port}`));
for (const sig of ['SIGINT', 'SIGTERM']) {
  process.on(sig, () => { io.close(); process.exit(0); });
}
