// jwt mode (docs/auth.md, "The page in jwt mode"): where the page's token comes from (the
// app's token_url, fetched with the user's cookies, or a #token= fragment kept per tab),
// and its refresh before it expires. The claims read here only steer the page (whether to
// offer "delete"): the server verifies every token and checks every command itself.

import { tokenUrl } from "./config.js";
import { send } from "./connection.js";
import { tabStore } from "./state.js";

// Refresh at 80% of the token's lifetime, or a minute before its end if that is later:
// a 15-minute token is refreshed after 14 minutes, a 3-second one after 2.4 s.
const REFRESH_AT = 0.8;
const REFRESH_MARGIN_MS = 60000;
// Never sooner: a token_url handing out nearly expired tokens (or a browser clock far
// off) must not make the page ask it in a tight loop.
const REFRESH_MIN_MS = 2000;
// A refresh whose fetch failed is tried again after this; the server's 30 s of leeway
// and, at worst, the 4002 reconnect cover the gap.
const REFRESH_RETRY_MS = 5000;
// A token endpoint that does not answer must not leave the page "connecting…" forever.
const FETCH_LIMIT_MS = 10000;

let token = null;
let claims = {};
/** When the token ends, on this browser's clock (ms). */
let endsAt = 0;
let refreshTimer = null;

/**
 * Take a token out of the URL fragment (`#token=<jwt>`, or `#room&token=<jwt>`): it stays
 * in this tab's sessionStorage for reconnects and leaves the URL bar (and the history),
 * which keeps the rest of the fragment, the room. Returns whether there was one.
 */
export function takeFragmentToken() {
  const parts = location.hash.slice(1).split("&");
  const found = parts.filter((p) => p.startsWith("token="));
  if (found.length === 0) return false;
  tabStore.set("token", found[found.length - 1].slice("token=".length));
  const rest = parts.filter((p) => !p.startsWith("token=")).join("&");
  history.replaceState(null, "", location.pathname + location.search + (rest ? "#" + rest : ""));
  return true;
}

/** The payload of JWT `t`, or {} if it cannot be read (the server will say why). */
function decodeClaims(t) {
  try {
    const b64 = t.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
    const payload = JSON.parse(new TextDecoder().decode(bytes));
    return payload !== null && typeof payload === "object" ? payload : {};
  } catch (_) {
    return {};
  }
}

function take(t, fetchedAt) {
  token = t;
  claims = decodeClaims(t);
  const { exp, iat } = claims;
  if (typeof exp !== "number") endsAt = 0;
  // A token fetched just now with `iat` lasts exp - iat from now: right even when this
  // browser's clock is off. Otherwise (an old one from the fragment) `exp` is all there is.
  else if (fetchedAt !== null && typeof iat === "number" && exp > iat) endsAt = fetchedAt + (exp - iat) * 1000;
  else endsAt = exp * 1000;
}

/**
 * A token to sign in with: a fresh one from the app's token_url, else the one this tab
 * took from the fragment. Throws an Error saying why there is none.
 */
export async function getToken() {
  const url = tokenUrl();
  if (!url) {
    const saved = tabStore.get("token", "");
    if (typeof saved !== "string" || !saved) {
      throw new Error("no sign-in token: open this page with #token=… after the address");
    }
    take(saved, null);
    return token;
  }
  const fetchedAt = Date.now();
  let body;
  try {
    const resp = await fetch(url, {
      credentials: "include",
      cache: "no-store",
      signal: AbortSignal.timeout(FETCH_LIMIT_MS),
    });
    if (!resp.ok) throw new Error("it answered HTTP " + resp.status + " (are you signed in to the app?)");
    body = await resp.json();
  } catch (e) {
    throw new Error("could not get a sign-in token from " + url + ": " + e.message);
  }
  if (!body || typeof body.token !== "string" || !body.token) {
    throw new Error("the sign-in service at " + url + " sent no token");
  }
  take(body.token, fetchedAt);
  return token;
}

export function isAdmin() {
  return claims.admin === true;
}

/** The Authorization header that shows the server who we are (empty without a token). */
export function bearer() {
  return token ? { Authorization: "Bearer " + token } : {};
}

/** Online with the current token: refresh it before it ends (token_url only). */
export function scheduleRefresh(delay = null) {
  clearTimeout(refreshTimer);
  refreshTimer = null;
  if (!tokenUrl() || !endsAt) return; // a fragment token cannot be renewed: 4002 ends it
  if (delay === null) {
    const left = endsAt - Date.now();
    delay = Math.max(REFRESH_MIN_MS, REFRESH_AT * left, left - REFRESH_MARGIN_MS);
  }
  refreshTimer = setTimeout(refresh, delay);
}

export function stopRefresh() {
  clearTimeout(refreshTimer);
  refreshTimer = null;
}

async function refresh() {
  refreshTimer = null;
  let t;
  try {
    t = await getToken();
  } catch (_) {
    scheduleRefresh(REFRESH_RETRY_MS);
    return;
  }
  // Offline now: the reconnect signs in with a token of its own.
  if (send({ type: "refresh", token: t })) scheduleRefresh();
}
