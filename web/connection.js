// The one WebSocket at a time: which URL (the chat socket named by /api/config, else the
// /ws fallback on this page's origin; ?transport=fallback forces /ws), reconnecting with
// backoff, and the keepalive. It knows sockets and frames, not rooms: every frame goes to
// `hooks.frame`, a lost socket to `hooks.down`; the page resumes its rooms on `welcome`.
// In jwt mode `hooks.hello` gives the first frame, with a fresh token, before each connect.

import { configLoaded, forgetConfig, loadConfig, socketUrls } from "./config.js";

const PING_EVERY_MS = 20000;
// No frame at all (not even a pong) for this long means the socket is dead.
const SILENCE_LIMIT_MS = 45000;
const BACKOFF_BASE_MS = 500;
const BACKOFF_MAX_MS = 8000;
const CLOSE_GOING_AWAY = 1001;
const CLOSE_SLOW = 4008;
// The server turned us away (a refused token, the app disconnected us): trying again at
// once would only be turned away again, so the page waits for "retry now".
const CLOSE_STOP = new Set([4001, 4003]);
/** A sentence for each close code that means something to the user. */
const CLOSE_REASONS = new Map([
  [1001, "The server is restarting."],
  [1008, "The server closed the connection: too many messages too fast (rate limit)."],
  [1011, "The server hit an internal error; it is not your fault."],
  [4001, "The server did not accept your sign-in token (missing, expired or not valid)."],
  [4002, "Your sign-in expired; signing in again."],
  [4003, "The server disconnected you."],
  [CLOSE_SLOW, "The connection was too slow to keep up; nothing is lost."],
]);

const forceFallback = new URLSearchParams(location.search).get("transport") === "fallback";

/**
 * {query() -> {name: value}, hello: null or async () -> the first frame (throws an Error
 * saying why there is none), frame(obj), down(), status(state, text), transport(kind)}
 */
let hooks = null;
let ws = null;
let kind = null; // "chat" or "fallback": what the open socket is
let online = false; // `welcome` received on the current socket
let attempt = 0; // consecutive failed connects, for the backoff
let reconnectTimer = null;
let stopped = false; // turned away (CLOSE_STOP): only "retry now" connects again
let connects = 0; // counts connect() calls: an older one still awaiting gives up
let countdownTimer = null;
let pingTimer = null;
let lastFrameAt = 0;
let lastWhy = ""; // why the last socket closed, shown until the next one is online

export function startConnection(h) {
  hooks = h;
  connect();
}

/** Send `obj` if the session is open. Returns whether it was sent. */
export function send(obj) {
  if (!ws || ws.readyState !== WebSocket.OPEN || !online) return false;
  ws.send(JSON.stringify(obj));
  return true;
}

export function isOnline() {
  return online;
}

/** Connect again at once, as someone else (the query changed). */
export function reconnect() {
  if (!ws) {
    if (stopped) connect(); // turned away: the new identity may be let in
    return; // between sockets: the next connect reads the new query anyway
  }
  ws.close(1000, "renaming");
  attempt = 0;
}

async function connect() {
  clearTimeout(reconnectTimer);
  clearInterval(countdownTimer);
  reconnectTimer = null;
  stopped = false;
  const mine = ++connects;
  // Server unreachable: back off. (Trying /ws now would work only if the server came
  // back within the last moment, and would pin this page to the slower fallback.)
  if (!configLoaded() && !(await loadConfig())) {
    if (mine === connects) disconnected(1006, "");
    return;
  }
  if (mine !== connects) return;
  if (attempt === 0) hooks.status("connecting", "connecting…");
  else hooks.status("reconnecting", "reconnecting…", lastWhy);
  let hello = null;
  if (hooks.hello) {
    try {
      hello = await hooks.hello();
    } catch (e) {
      if (mine === connects) disconnected(1006, "", e.message + ".");
      return;
    }
    if (mine !== connects) return;
  }
  const list = socketUrls(forceFallback);
  for (const c of list) {
    for (const [key, value] of Object.entries(hooks.query())) c.url.searchParams.set(key, value);
  }
  tryUrl(list, 0, hello);
}

/** Open `list[i]` (or the next), and send `hello` (or nothing) as its first frame. */
function tryUrl(list, i, hello) {
  let opened = false;
  let sock;
  try {
    sock = new WebSocket(String(list[i].url));
  } catch (_) {
    // A SecurityError (mixed content, a blocked port) or a SyntaxError: this URL cannot
    // be opened at all, so go on to the next (the /ws fallback) at once.
    if (i + 1 < list.length) tryUrl(list, i + 1, hello);
    else disconnected(1006, "");
    return;
  }
  ws = sock;
  sock.addEventListener("open", () => {
    opened = true;
    kind = list[i].kind;
    hooks.transport(kind);
    lastFrameAt = Date.now();
    if (hello) sock.send(JSON.stringify(hello));
  });
  sock.addEventListener("message", (ev) => {
    if (sock !== ws) return;
    lastFrameAt = Date.now();
    if (typeof ev.data !== "string") return;
    // The server may batch several events in one frame, one JSON object a line.
    for (const line of ev.data.split("\n")) {
      if (!line) continue;
      let obj;
      try {
        obj = JSON.parse(line);
      } catch (_) {
        continue;
      }
      if (obj === null || typeof obj !== "object") continue;
      if (obj.type === "welcome") welcomed();
      hooks.frame(obj);
    }
  });
  sock.addEventListener("close", (ev) => {
    if (sock !== ws) return;
    if (!opened && i + 1 < list.length) {
      tryUrl(list, i + 1, hello); // chat socket unreachable: try the /ws fallback right away
      return;
    }
    disconnected(ev.code, ev.reason);
  });
}

function welcomed() {
  online = true;
  lastWhy = "";
  attempt = 0;
  hooks.status("online", "online" + (kind === "fallback" ? " (via /ws)" : ""));
  clearInterval(pingTimer);
  pingTimer = setInterval(keepalive, PING_EVERY_MS);
}

/** The socket is gone (or never came): say why (`why`, else by `code`) and reconnect. */
function disconnected(code, reason, why = "") {
  ws = null;
  online = false;
  clearInterval(pingTimer);
  hooks.down();
  // A failed reconnect says nothing new: the reason the socket closed still holds.
  why = why || CLOSE_REASONS.get(code) || (reason ? "Closed: " + reason + "." : lastWhy);
  lastWhy = why;
  if (CLOSE_STOP.has(code)) {
    stopped = true;
    attempt = 0;
    hooks.status("stopped", "disconnected", why, true);
    return;
  }
  let delay;
  if (code === CLOSE_SLOW) {
    // We fell behind; nothing is lost, the rejoin with `since` catches up.
    hooks.status("slow", "disconnected: connection too slow; catching up…", why);
    delay = 250 + Math.random() * 750;
  } else {
    // Exponential backoff with full jitter, so a restarted server is not stampeded.
    const cap = Math.min(BACKOFF_MAX_MS, BACKOFF_BASE_MS * 2 ** attempt);
    delay = cap / 2 + Math.random() * (cap / 2);
    countDown(Date.now() + delay, why);
  }
  attempt += 1;
  if (code === CLOSE_GOING_AWAY || attempt > 1) forgetConfig(); // the server may have moved
  reconnectTimer = setTimeout(connect, delay);
}

/** "reconnecting in N s", once a second until `at`, with "retry now". */
function countDown(at, why) {
  const show = () => {
    const s = Math.max(1, Math.ceil((at - Date.now()) / 1000));
    hooks.status("reconnecting", "reconnecting in " + s + " s", why, true);
  };
  show();
  clearInterval(countdownTimer);
  countdownTimer = setInterval(show, 1000);
}

/** Stop waiting out the backoff: connect now. */
export function retryNow() {
  if (reconnectTimer === null && !stopped) return;
  connect();
}

function keepalive() {
  if (!ws || ws.readyState !== WebSocket.OPEN) return;
  if (Date.now() - lastFrameAt > SILENCE_LIMIT_MS) {
    ws.close(4000, "no answer");
    return;
  }
  send({ type: "ping" });
}

// Back on the network: do not wait out the backoff.
window.addEventListener("online", () => {
  if (reconnectTimer === null) return;
  attempt = 0;
  connect();
});
