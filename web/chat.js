// The chat, client side: joining and resuming rooms, and what each server frame changes.
// Each room keeps its message ids sorted (ids sort in time order), so a message is never
// shown twice whatever the server replays. On every `welcome` each room is joined again
// with `since` = the last id seen in it: the server replays what we missed, then live
// messages follow.

import { roomAllowed } from "./config.js";
import { isOnline, send } from "./connection.js";
import * as outbox from "./outbox.js";
import * as view from "./render.js";
import { forgetRoom, isMine, me, roomNamed, rooms, view as ui } from "./state.js";

const el = view.el;
const TYPING_SHOW_MS = 4000;
// Older messages asked for per "load older" (the server allows 1-200).
const HISTORY_PAGE = 50;

export const currentRoom = () => rooms.get(ui.current);

/** What app.js does when the server refuses our name (`bad_name`): ask again, with why. */
export const hooks = { badName: (_why) => {} };

export function flash(text) {
  view.flash(text, () => view.renderTyping(currentRoom()));
}

export function renderRooms() {
  view.renderRooms(rooms, ui.current, leaveRoom);
}

function sendJoin(r) {
  r.joined = false;
  r.fullReplay = !r.lastId; // a join without `since` replays the latest page
  const join = { type: "join", room: r.name };
  if (r.lastId) join.since = r.lastId;
  send(join);
}

export function showRoom(name) {
  const r = roomNamed(name);
  ui.current = name;
  r.unread = 0;
  view.showRoomView(r);
  renderRooms();
  view.renderMembers(r, me.name);
  view.renderTyping(r);
  view.renderLoadOlder(r);
  view.scrollToBottom();
  if (r.joined) el.text.focus();
}

export function openRoom(name) {
  if (!roomAllowed(name)) {
    flash("bad room name: " + name);
    return;
  }
  showRoom(name);
  const r = rooms.get(name);
  if (!r.joined) {
    ui.focusOnJoin = name; // the box gets focus once joined
    sendJoin(r);
  }
  if (location.hash.slice(1) !== encodeURIComponent(name)) {
    history.replaceState(null, "", "#" + encodeURIComponent(name));
  }
}

function leaveRoom(name) {
  if (!rooms.has(name)) return;
  send({ type: "leave", room: name });
  forgetRoom(name);
  outbox.forgetRoom(name);
  view.dropLog(name);
  if (ui.current !== name) {
    renderRooms();
    return;
  }
  const next = rooms.keys().next();
  if (!next.done) {
    openRoom(next.value);
    return;
  }
  ui.current = null;
  history.replaceState(null, "", location.pathname + location.search);
  view.showRoomView(null);
  renderRooms();
  view.renderMembers(null, me.name);
  view.renderTyping(null);
  view.renderLoadOlder(null);
  el.joinInput.focus();
}

/** Ask for the page of history before the oldest message shown. */
export function loadOlder() {
  const r = currentRoom();
  if (!r) return;
  const ask = { type: "history", room: r.name, limit: HISTORY_PAGE };
  if (r.ids.length > 0) ask.before = r.ids[0]; // none shown yet: the newest page
  send(ask);
}

function stopTyping(r, who) {
  const t = r.typing.get(who);
  if (t === undefined) return;
  clearTimeout(t);
  r.typing.delete(who);
  if (r.name === ui.current) view.renderTyping(r);
}

/** A send came back (as an ack or as its message): it is no longer pending. */
function settled(cid, id) {
  outbox.settle(cid);
  view.settlePending(cid, id);
}

/**
 * Keep `r`'s rendered messages bounded: when the reader is at the bottom (or elsewhere),
 * the oldest go; "load older" brings them back from history.
 */
export function trim(r) {
  if (r.name === ui.current && !view.isAtBottom()) return;
  const dropped = view.trimLog(r.name);
  if (dropped.length === 0) return;
  r.forget(dropped);
  r.more = true;
  if (r.name === ui.current) view.renderLoadOlder(r);
}

/** Show message `m` in id order, unless it is shown already. */
function addMessage(m, { countUnread = true } = {}) {
  if (typeof m.id !== "string" || typeof m.room !== "string") return;
  const r = rooms.get(m.room);
  if (!r) return; // a room we have left
  const at = r.add(m.id);
  if (at >= 0) {
    const nextId = at + 1 < r.ids.length ? r.ids[at + 1] : null;
    const mine = isMine(m);
    view.showMessage(m, nextId, { mine, current: ui.current });
    stopTyping(r, m.from);
    if (countUnread && r.loaded && m.room !== ui.current && !mine) {
      r.unread += 1;
      renderRooms();
    }
    if (countUnread) trim(r); // not while paging back through history
  }
  if (typeof m.cid === "string") settled(m.cid, m.id); // after the insert: its pending copy goes
}

// When a refusal's backoff is over: send the room's unacked messages again, or the join.
outbox.onRetry((name) => {
  const r = rooms.get(name);
  if (!r) return;
  if (r.joined) {
    outbox.resend(name);
  } else if (r.joinRefused && isOnline()) {
    r.joinRefused = false;
    sendJoin(r);
  }
});

function refused(f) {
  if (f.code === "bad_name") {
    hooks.badName(f.message || "that name is not allowed");
    return;
  }
  flash("error: " + (f.message || f.code));
  const r = typeof f.room === "string" ? rooms.get(f.room) : undefined;
  switch (f.code) {
    case "store_unavailable":
      // A send or a join the store could not take: the same again after a backoff.
      if (!r) break;
      if (!r.joined) r.joinRefused = true;
      outbox.retryLater(r.name);
      break;
    case "rate_limited":
      // The error cannot name what it refused (the server drops the frame unread), so
      // every joined room's unacked sends go again; the server stores each cid once.
      for (const o of outbox.unacked()) {
        if (rooms.get(o.room)?.joined) outbox.retryLater(o.room);
      }
      break;
    case "bad_room":
      if (r) leaveRoom(r.name);
      break;
    default:
      break;
  }
}

const handlers = {
  welcome(f) {
    me.user = typeof f.user === "string" ? f.user : null;
    if (me.user !== null) me.wanted = f.name; // the token names us: nothing was refused
    me.name = f.name;
    view.setMe(me.name);
    view.renderNameNote(me.wanted, me.name);
    for (const r of rooms.values()) sendJoin(r);
  },
  message(f) {
    addMessage(f);
  },
  joined(f) {
    const r = rooms.get(f.room);
    if (!r) {
      send({ type: "leave", room: f.room }); // left while the join was in flight
      return;
    }
    r.joined = true;
    r.loaded = true;
    // A resume's `more` is always true: what we paged back through already knows better.
    if (r.fullReplay) r.more = Boolean(f.more);
    r.members = new Set(Array.isArray(f.members) ? f.members : []);
    // A big room lists nobody: its count stands in for the list.
    r.headCount = typeof f.count === "number" && f.count > r.members.size ? f.count : null;
    if (f.room === ui.current) {
      view.renderMembers(r, me.name);
      view.renderLoadOlder(r);
      view.scrollToBottom();
      if (ui.focusOnJoin === f.room && !el.nameDialog.open) el.text.focus();
      ui.focusOnJoin = null;
    }
    outbox.resend(f.room);
  },
  reset(f) {
    // Our `since` is older than the server keeps for resume: the latest page follows.
    const r = rooms.get(f.room);
    if (!r) return;
    r.clear();
    r.fullReplay = true;
    view.clearLog(f.room);
    view.systemLine(f.room, "(too much was missed: reloaded the latest messages)", ui.current);
  },
  deleted(f) {
    if (typeof f.room === "string" && typeof f.id === "string") view.markDeleted(f.room, f.id);
  },
  ack(f) {
    if (typeof f.cid === "string") settled(f.cid, f.id);
  },
  presence(f) {
    const r = rooms.get(f.room);
    if (!r) return;
    if (f.joined) {
      if (!r.members.has(f.joined)) view.systemLine(f.room, f.joined + " joined", ui.current);
      r.members.add(f.joined);
    }
    if (f.left) {
      r.members.delete(f.left);
      stopTyping(r, f.left);
      view.systemLine(f.room, f.left + " left", ui.current);
    }
    if (f.room === ui.current) view.renderMembers(r, me.name);
  },
  members(f) {
    // A big room's head count, or, with `names`, the whole list of a room small again.
    const r = rooms.get(f.room);
    if (!r || typeof f.count !== "number") return;
    if (Array.isArray(f.names)) {
      r.members = new Set(f.names);
      r.headCount = null;
    } else {
      r.members.clear();
      r.headCount = f.count;
    }
    if (f.room === ui.current) view.renderMembers(r, me.name);
  },
  typing(f) {
    const r = rooms.get(f.room);
    if (!r || f.from === me.name) return;
    clearTimeout(r.typing.get(f.from));
    r.typing.set(f.from, setTimeout(() => stopTyping(r, f.from), TYPING_SHOW_MS));
    if (f.room === ui.current) view.renderTyping(r);
  },
  history(f) {
    const r = rooms.get(f.room);
    if (!r) return;
    const add = () => {
      for (const m of Array.isArray(f.messages) ? f.messages : []) addMessage(m, { countUnread: false });
    };
    if (f.room === ui.current) view.keepingView(add);
    else add();
    r.more = Boolean(f.more);
    if (f.room === ui.current) view.renderLoadOlder(r);
  },
  error: refused,
};

/** One frame from the server. Unknown types are ignored, as the protocol asks. */
export function handleFrame(f) {
  if (Object.hasOwn(handlers, f.type)) handlers[f.type](f);
}

/** The socket is gone: no room is joined, nobody is typing. */
export function connectionDown() {
  for (const r of rooms.values()) {
    r.joined = false;
    for (const t of r.typing.values()) clearTimeout(t);
    r.typing.clear();
  }
  view.renderTyping(currentRoom());
  view.renderLoadOlder(currentRoom());
}
