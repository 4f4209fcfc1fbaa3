// What the server says about itself (GET /api/config): where its sockets are, and its
// rules for room names and message length, so the page keeps no copy that could drift.

let config = null;
/** The server's room rule; null until it has said (then the server alone judges). */
let roomRule = null;
/** The longest text in characters (Unicode code points, as the server counts); null: unknown. */
let maxText = null;
/** "open" or "jwt" (docs/auth.md); an old server that does not say is open. */
let auth = "open";
/** jwt mode: the app's endpoint that hands out tokens, or null (then the #token= fragment). */
let tokenEndpoint = null;

/** Ask the server. Returns false if it is unreachable. */
export async function loadConfig() {
  try {
    const resp = await fetch("/api/config", { cache: "no-store" });
    // No usable config (an old server, a proxy): the /ws fallback alone will do.
    config = resp.ok ? await resp.json().catch(() => ({})) : {};
  } catch (_) {
    return false;
  }
  if (typeof config.room_pattern === "string") {
    try {
      roomRule = new RegExp(config.room_pattern);
    } catch (_) {
      roomRule = null; // a rule this browser cannot read: the server judges alone
    }
  }
  if (Number.isInteger(config.max_text) && config.max_text > 0) maxText = config.max_text;
  if (config.auth === "jwt" || config.auth === "open") auth = config.auth;
  if (typeof config.token_url === "string" && config.token_url) tokenEndpoint = config.token_url;
  return true;
}

export function configLoaded() {
  return config !== null;
}

/** The server may have moved: ask again before the next connect. The rules stay known. */
export function forgetConfig() {
  config = null;
}

/**
 * `path` (absolute, or relative to this page) as a WebSocket URL, or null if this page may
 * not open it. ws:// and wss:// stay as they are; http:// and https:// become them. An
 * https page never gets a ws:// URL: the browser blocks it as mixed content.
 */
function wsUrl(path) {
  let u;
  try {
    u = new URL(path, location.href);
  } catch (_) {
    return null;
  }
  if (u.protocol === "https:") u.protocol = "wss:";
  else if (u.protocol === "http:") u.protocol = "ws:";
  else if (u.protocol !== "wss:" && u.protocol !== "ws:") return null;
  if (location.protocol === "https:" && u.protocol === "ws:") return null;
  return u;
}

/** Where to connect, in order: the chat socket, then the /ws fallback on this origin. */
export function socketUrls(forceFallback) {
  const list = [];
  const chat = !forceFallback && config && config.ws_url ? wsUrl(config.ws_url) : null;
  if (chat) list.push({ url: chat, kind: "chat" });
  const fallback = wsUrl((config && config.fallback_ws_url) || "/ws") || wsUrl("/ws");
  list.push({ url: fallback, kind: "fallback" });
  return list;
}

export function authMode() {
  return auth;
}

export function tokenUrl() {
  return tokenEndpoint;
}

export function roomAllowed(name) {
  return roomRule ? roomRule.test(name) : name.length > 0;
}

/** The server's text limit, or null if not known. */
export function textLimit() {
  return maxText;
}

/** `text`'s length as the server counts it: code points (an emoji is one, not two). */
export function textLength(text) {
  return [...text].length;
}

/** Whether the server would refuse `text` as too long. */
export function textTooLong(text) {
  return maxText !== null && textLength(text) > maxText;
}
