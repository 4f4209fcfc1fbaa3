// trio-chat page: plain ES modules, no build step, no dependencies. This one starts the
// page and turns the user's actions into sends; the others each do one job:
//
//   config.js      what /api/config says: the socket URLs, the room rule, the text limit
//   auth.js        jwt mode: the token (from token_url or #token=) and its refresh
//   connection.js  the socket: /ws fallback, reconnect with backoff, keepalive
//   chat.js        joining and resuming rooms, and what each server frame changes
//   outbox.js      unacked sends (cids), sent again after a reconnect or a refusal
//   state.js       rooms, members, unread counts, who we are, per-browser/per-tab storage
//   render.js      the DOM; user text only through textContent, never innerHTML

import {
  connectionDown,
  currentRoom,
  flash,
  handleFrame,
  hooks,
  loadOlder,
  openRoom,
  renderRooms,
  showRoom,
  trim,
} from "./chat.js";
import * as auth from "./auth.js";
import {
  authMode,
  configLoaded,
  loadConfig,
  roomAllowed,
  textLength,
  textLimit,
  textTooLong,
} from "./config.js";
import { reconnect, retryNow, send, startConnection } from "./connection.js";
import * as outbox from "./outbox.js";
import * as view from "./render.js";
import { browserStore, clientId, me, roomNamed, rooms, savedRooms, tabStore, view as ui } from "./state.js";

const el = view.el;
const TYPING_SEND_EVERY_MS = 2000;

let lastTypingSent = 0;
let started = false;

el.sendForm.addEventListener("submit", (ev) => {
  ev.preventDefault();
  const text = el.text.value.trim();
  const r = currentRoom();
  if (!text || !r) return;
  if (textTooLong(text)) {
    flash("too long: messages are limited to " + textLimit() + " characters");
    return;
  }
  const o = outbox.queue(r.name, text);
  view.showPending(o, me.name);
  view.scrollToBottom();
  el.text.value = "";
  el.text.removeAttribute("aria-invalid");
  view.renderCounter(0, textLimit());
  lastTypingSent = 0; // the message ended the others' "is typing"; the next key says it again
  if (r.joined) outbox.transmit(o);
});

// Enter sends, Shift+Enter is a new line (the textarea's own); PageUp/PageDown scroll the
// messages without leaving the box.
el.text.addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) {
    ev.preventDefault();
    el.sendForm.requestSubmit();
  } else if (ev.key === "PageUp" || ev.key === "PageDown") {
    ev.preventDefault();
    view.scrollPage(ev.key === "PageUp" ? -1 : 1);
  }
});

el.text.addEventListener("input", () => {
  if (textTooLong(el.text.value.trim())) el.text.setAttribute("aria-invalid", "true");
  else el.text.removeAttribute("aria-invalid");
  view.renderCounter(textLength(el.text.value.trim()), textLimit());
  const r = currentRoom();
  const now = Date.now();
  if (r && r.joined && el.text.value && now - lastTypingSent > TYPING_SEND_EVERY_MS) {
    lastTypingSent = now;
    send({ type: "typing", room: r.name });
  }
});

el.joinForm.addEventListener("submit", (ev) => {
  ev.preventDefault();
  const name = el.joinInput.value.trim().replace(/^#/, "");
  if (!name) return;
  el.joinInput.value = "";
  location.hash = encodeURIComponent(name); // hashchange opens it
  if (name === ui.current) el.text.focus();
});

el.loadOlder.addEventListener("click", loadOlder);
el.retryNow.addEventListener("click", retryNow);

// Back at the bottom after reading up: the oldest messages can go now.
el.messages.addEventListener("scroll", () => {
  const r = currentRoom();
  if (r && view.isAtBottom()) trim(r);
}, { passive: true });

el.browse.addEventListener("click", async () => {
  el.roomsDialogList.replaceChildren();
  el.roomsDialogState.textContent = "loading…";
  el.roomsDialog.showModal();
  let list;
  try {
    // In jwt mode the token shows the server which private rooms we may see.
    const resp = await fetch("/api/rooms", { cache: "no-store", headers: auth.bearer() });
    if (!resp.ok) throw new Error("HTTP " + resp.status);
    list = (await resp.json()).rooms;
  } catch (e) {
    el.roomsDialogState.textContent = "could not list the rooms (" + e.message + ")";
    return;
  }
  const rows = (Array.isArray(list) ? list : [])
    .filter((x) => x && typeof x.room === "string")
    .map((x) => ({ room: x.room, members: Array.isArray(x.members) ? x.members.length : 0 }))
    .sort((a, b) => b.members - a.members || (a.room < b.room ? -1 : 1));
  view.renderRoomBrowser(rows, (name) => {
    el.roomsDialog.close();
    location.hash = encodeURIComponent(name); // hashchange opens it
    if (name === ui.current) el.text.focus();
  });
  el.roomsDialogList.querySelector("button")?.focus();
});

window.addEventListener("hashchange", () => {
  if (auth.takeFragmentToken() && started && authMode() === "jwt") reconnect(); // a new identity
  const name = hashRoom();
  if (name && name !== ui.current) openRoom(name);
});

document.addEventListener("keydown", (ev) => {
  if (ev.altKey && (ev.key === "ArrowUp" || ev.key === "ArrowDown")) {
    const names = [...rooms.keys()];
    if (names.length < 2) return;
    ev.preventDefault();
    const i = names.indexOf(ui.current);
    const next = names[(i + (ev.key === "ArrowUp" ? -1 : 1) + names.length) % names.length];
    location.hash = encodeURIComponent(next);
  } else if (ev.key === "Escape" && !el.nameDialog.open) {
    el.text.focus();
  }
});

el.rename.addEventListener("click", () => askName());

/** Ask for a nickname; `why` says why the last one was refused. */
function askName(why = "") {
  el.nameRefused.hidden = !why;
  el.nameRefused.textContent = why ? "Refused: " + why : "";
  el.nameInput.value = me.wanted;
  if (!el.nameDialog.open) el.nameDialog.showModal();
  el.nameInput.focus();
  el.nameInput.select();
}

hooks.badName = (why) => {
  view.renderNameNote("", "");
  askName(why);
};

el.nameForm.addEventListener("submit", (ev) => {
  ev.preventDefault();
  const n = el.nameInput.value.trim();
  if (!n) return;
  el.nameDialog.close();
  const changed = n !== me.wanted || n !== me.name;
  me.wanted = n;
  rememberName(n);
  const url = new URL(location.href);
  if (url.searchParams.has("name")) {
    url.searchParams.set("name", n); // a reload keeps the new name
    history.replaceState(null, "", url);
  }
  if (!started) start();
  else if (changed) reconnect(); // under the new name
});

function hashRoom() {
  try {
    return decodeURIComponent(location.hash.slice(1));
  } catch (_) {
    return "";
  }
}

/** jwt mode: sign in with a token before each connect; the app's admins may delete. */
async function signIn() {
  const token = await auth.getToken();
  view.offerDelete(auth.isAdmin() ? (room, id) => send({ type: "delete", room, id }) : null);
  return { type: "hello", token };
}

/** Connect: as `me.wanted`, or in jwt mode (`signed`) as the token says. */
async function start(signed = false) {
  started = true;
  me.name = me.wanted;
  view.setMe(me.wanted);
  // The room rule comes from the server. Unreachable now: the server judges the rooms
  // when it is back (a bad one gets `bad_room`, and the page leaves it).
  if (!configLoaded()) await loadConfig();
  const saved = savedRooms().filter(roomAllowed);
  const fromHash = hashRoom();
  for (const name of saved) roomNamed(name);
  const first = roomAllowed(fromHash) ? fromHash : saved[0] || "general";
  showRoom(first);
  ui.focusOnJoin = first;
  if (!location.hash) history.replaceState(null, "", "#" + encodeURIComponent(first));
  // Sends left unacked by a previous visit go out again once their room is joined.
  for (const o of outbox.unacked()) {
    roomNamed(o.room);
    view.showPending(o, me.wanted);
  }
  renderRooms();
  startConnection({
    query: () => (signed ? { client_id: clientId } : { name: me.wanted, client_id: clientId }),
    hello: signed ? signIn : null,
    frame: (f) => {
      if (signed && f.type === "welcome") auth.scheduleRefresh();
      handleFrame(f);
    },
    down: () => {
      auth.stopRefresh();
      connectionDown();
    },
    status: view.setStatus,
    transport: view.setTransport,
  });
}

// With the on-screen keyboard open the visible part of the page shrinks (iOS does not
// resize the layout): size the page to it, and hide what the message list needs room from.
const SHORT_PAGE_PX = 420;
if (window.visualViewport) {
  const fit = () => {
    const h = window.visualViewport.height;
    document.documentElement.style.setProperty("--page-height", h + "px");
    document.body.classList.toggle("short", h < SHORT_PAGE_PX);
  };
  window.visualViewport.addEventListener("resize", fit);
  fit();
}

// Each tab has its own name (sessionStorage); a new tab starts from the last one used.
function rememberName(n) {
  tabStore.set("name", n);
  browserStore.set("name", n);
}

/** Open mode: the name from ?name=, this tab, or asked for; then connect. */
function startOpen() {
  const fromUrl = new URLSearchParams(location.search).get("name");
  const tabName = tabStore.get("name", "");
  if (fromUrl) {
    me.wanted = fromUrl;
    rememberName(fromUrl);
    start();
  } else if (typeof tabName === "string" && tabName) {
    me.wanted = tabName;
    start();
  } else {
    const last = browserStore.get("name", "");
    me.wanted = typeof last === "string" ? last : "";
    askName(); // prefilled with the last name used: Enter keeps it
  }
}

// Before anything reads the fragment (the room): it may carry a token, which must leave
// the URL bar at once.
auth.takeFragmentToken();
// The server says whether names come from tokens. Unreachable: the open page (the server
// judges when it is back).
loadConfig().then(() => {
  if (authMode() !== "jwt") {
    startOpen();
    return;
  }
  el.rename.hidden = true; // the token names us
  start(true);
});
