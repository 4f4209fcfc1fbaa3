// Sends not yet acked. Each carries a client id (cid) and stays in the tab's storage until
// the server acks it; it goes out again after a reconnect (once its room is joined) and
// after a refusal (store_unavailable, rate_limited), after a backoff. Always with the
// same cid: the server stores a cid once per client_id, however often it is sent.

import { send } from "./connection.js";
import { tabStore } from "./state.js";

// After a refusal: the first retry's delay, doubled per refusal up to the max, until an ack.
const RETRY_BASE_MS = 1000;
const RETRY_MAX_MS = 30000;

const valid = (o) =>
  o !== null && typeof o === "object" && [o.cid, o.room, o.text].every((x) => typeof x === "string");
const saved = tabStore.get("outbox", []);
/** {cid, room, text}, oldest first. */
let entries = Array.isArray(saved) ? saved.filter(valid) : [];
const cidPrefix = "c-" + Math.random().toString(36).slice(2, 10) + "-" + Date.now().toString(36);
let cidCounter = 0;
let refusals = 0; // consecutive refusals, for the backoff
let retryTimer = null;
/** Rooms with something refused, tried again when `retryTimer` fires. */
const refused = new Set();
/** What to do for a refused room when its retry is due (app.js decides: resend or rejoin). */
let retryRoom = () => {};

function save() {
  tabStore.set("outbox", entries);
}

/** The unacked sends of `room`, or of every room; oldest first. */
export function unacked(room) {
  return room === undefined ? [...entries] : entries.filter((o) => o.room === room);
}

/** A new send of `text` to `room`: kept until acked. Returns the entry. */
export function queue(room, text) {
  cidCounter += 1;
  const o = { cid: cidPrefix + "-" + cidCounter, room, text };
  entries.push(o);
  save();
  return o;
}

/** Send one entry now (if the socket is open). */
export function transmit(o) {
  send({ type: "send", room: o.room, text: o.text, cid: o.cid });
}

/** Send every unacked entry of `room` again. The caller knows the room is joined. */
export function resend(room) {
  for (const o of entries) if (o.room === room) transmit(o);
}

/** The server acked `cid` (or sent its message back): it is sent. */
export function settle(cid) {
  refusals = 0;
  const before = entries.length;
  entries = entries.filter((o) => o.cid !== cid);
  if (entries.length !== before) save();
}

/** The room was left: its unsent messages go with it. */
export function forgetRoom(room) {
  entries = entries.filter((o) => o.room !== room);
  save();
}

export function onRetry(fn) {
  retryRoom = fn;
}

/** Something in `room` was refused for now: call the retry hook for it after a backoff. */
export function retryLater(room) {
  refused.add(room);
  if (retryTimer !== null) return;
  const cap = Math.min(RETRY_MAX_MS, RETRY_BASE_MS * 2 ** refusals);
  refusals += 1;
  retryTimer = setTimeout(() => {
    retryTimer = null;
    const due = [...refused];
    refused.clear();
    for (const name of due) retryRoom(name);
  }, cap / 2 + Math.random() * (cap / 2));
}
