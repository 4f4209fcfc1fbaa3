// trio-chat page: plain ES modules, no build step, no dependencies. This one starts the
// page and turns the user's actions into sends; the others each do one job:
//
//   config.js      what /api/config says: the socket URLs, the room rule, the text limit
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
  loadOlder,
  openRoom,
  renderRooms,
  showRoom,
} from "./chat.js";
import { loadConfig, roomAllowed, textLimit, textTooLong } from "./config.js";
import { reconnect, send, startConnection } from "./connection.js";
import * as outbox from "./outbox.js";
import * as view from "./render.js";
import { browserStore, clientId, me, roomNamed, rooms, savedRooms, view as ui } from "./state.js";

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
  lastTypingSent = 0; // the message ended the others' "is typing"; the next key says it again
  if (r.joined) outbox.transmit(o);
});

el.text.addEventListener("input", () => {
  if (textTooLong(el.text.value.trim())) el.text.setAttribute("aria-invalid", "true");
  else el.text.removeAttribute("aria-invalid");
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

window.addEventListener("hashchange", () => {
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

function askName() {
  el.nameInput.value = me.wanted;
  el.nameDialog.showModal();
  el.nameInput.focus();
}

el.nameForm.addEventListener("submit", (ev) => {
  ev.preventDefault();
  const n = el.nameInput.value.trim();
  if (!n) return;
  el.nameDialog.close();
  const changed = n !== me.wanted;
  me.wanted = n;
  browserStore.set("name", n);
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

async function start() {
  started = true;
  me.name = me.wanted;
  view.setMe(me.wanted);
  // The room rule comes from the server. Unreachable now: the server judges the rooms
  // when it is back (a bad one gets `bad_room`, and the page leaves it).
  await loadConfig();
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
    query: () => ({ name: me.wanted, client_id: clientId }),
    frame: handleFrame,
    down: connectionDown,
    status: view.setStatus,
    transport: view.setTransport,
  });
}

const fromUrl = new URLSearchParams(location.search).get("name");
me.wanted = fromUrl || browserStore.get("name", "");
if (fromUrl) browserStore.set("name", me.wanted);
if (me.wanted) start();
else askName();
