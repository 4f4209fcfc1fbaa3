// The DOM: one <div class="log"><ol> per room (only the current one shown), the sidebar, the
// members, the typing line, the status. User text only ever reaches the page through
// textContent, never innerHTML.

const $ = (id) => document.getElementById(id);
export const el = {
  status: $("status"),
  meName: $("me-name"),
  rename: $("rename"),
  roomList: $("room-list"),
  joinForm: $("join-form"),
  joinInput: $("join-input"),
  roomTitle: $("room-title"),
  messages: $("messages"),
  loadOlder: $("load-older"),
  typing: $("typing"),
  sendForm: $("send-form"),
  text: $("text"),
  memberList: $("member-list"),
  memberCount: $("member-count"),
  nameDialog: $("name-dialog"),
  nameForm: $("name-form"),
  nameInput: $("name-input"),
  nameRefused: $("name-refused"),
  nameNote: $("name-note"),
  why: $("why"),
  retryNow: $("retry-now"),
  counter: $("counter"),
  browse: $("browse"),
  roomsDialog: $("rooms-dialog"),
  roomsDialogState: $("rooms-dialog-state"),
  roomsDialogList: $("rooms-dialog-list"),
};

/** Messages kept rendered per room; older ones go and come back through "load older". */
export const MAX_RENDERED = 300;
// Trim only once this many more have come, so a busy room does not trim per message.
const TRIM_SLACK = 50;
// Messages from one sender this close together are shown as one group.
const GROUP_WITHIN_S = 5 * 60;
// Text that looks like a link; only http(s) URLs that parse become links.
const LINK_RE = /\bhttps?:\/\/[^\s<>"]+/gi;
// A link's trailing punctuation usually ends the sentence, not the URL.
const LINK_TRAILING_RE = /[.,;:!?'")\]]+$/;

/** room name -> {log: <ol>, nodes: Map(id -> <li>)} */
const logs = new Map();
/** cid -> the <li> shown for a send not yet seen back from the server. */
const pendingEls = new Map();
let flashTimer = null;
/** (room, id) => void: what a message's "delete" does, or null when we may not delete. */
let onDelete = null;

function logOf(room) {
  let x = logs.get(room);
  if (!x) {
    // The live region wraps the list: role=log on the <ol> itself would hide that it is one.
    const box = document.createElement("div");
    box.className = "log";
    box.dataset.room = room;
    box.setAttribute("role", "log");
    box.setAttribute("aria-live", "polite");
    box.hidden = true;
    const log = document.createElement("ol");
    log.className = "lines";
    log.dataset.room = room;
    box.appendChild(log);
    el.messages.appendChild(box);
    x = { box, log, nodes: new Map() };
    logs.set(room, x);
  }
  return x;
}

export function dropLog(room) {
  const x = logs.get(room);
  if (!x) return;
  x.box.remove();
  logs.delete(room);
  for (const [cid, li] of pendingEls) if (!li.isConnected) pendingEls.delete(cid);
}

function nearBottom() {
  const box = el.messages;
  return box.scrollHeight - box.scrollTop - box.clientHeight < 80;
}

// Whether the reader is at the bottom, kept by the scroll events: measuring it per
// message would lay the page out per message, which a busy room cannot afford.
let atBottom = true;
let scrollQueued = false;
el.messages.addEventListener("scroll", () => {
  if (!scrollQueued) atBottom = nearBottom();
}, { passive: true });

export function isAtBottom() {
  return atBottom;
}

export function scrollToBottom() {
  el.messages.scrollTop = el.messages.scrollHeight;
  atBottom = true;
}

/** Run `change` (which adds to the log) keeping the view at the bottom if it was there. */
function sticking(room, current, change) {
  change();
  if (room !== current || !atBottom || scrollQueued) return;
  // Once per frame, however many messages came in it.
  scrollQueued = true;
  requestAnimationFrame(() => {
    scrollQueued = false;
    if (atBottom) scrollToBottom();
  });
}

/** Scroll the messages by about a screen, up (-1) or down (1): PageUp/PageDown from the box. */
export function scrollPage(direction) {
  el.messages.scrollBy({ top: direction * el.messages.clientHeight * 0.9 });
}

function fmtTime(ts) {
  return new Date(ts * 1000).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
}

function dayKey(date) {
  return date.getFullYear() + "-" + date.getMonth() + "-" + date.getDate();
}

/** "Today", "Yesterday", or the date, for the day of `ts` (seconds). */
function dayLabel(ts) {
  const d = new Date(ts * 1000);
  const today = new Date();
  const yesterday = new Date(today.getFullYear(), today.getMonth(), today.getDate() - 1);
  if (dayKey(d) === dayKey(today)) return "Today";
  if (dayKey(d) === dayKey(yesterday)) return "Yesterday";
  return d.toLocaleDateString([], { weekday: "long", year: "numeric", month: "long", day: "numeric" });
}

/** At midnight "Today" becomes "Yesterday", and so on: label every separator again then. */
function relabelAtMidnight() {
  const now = new Date();
  const midnight = new Date(now.getFullYear(), now.getMonth(), now.getDate() + 1);
  setTimeout(() => {
    for (const sep of el.messages.querySelectorAll("li.day")) {
      const li = sep.nextElementSibling;
      if (li) sep.textContent = dayLabel(Number(li.dataset.ts));
    }
    relabelAtMidnight();
  }, midnight - now + 1000);
}
relabelAtMidnight();

/** `text` as text nodes and <a> elements for its http(s) links; DOM APIs only. */
function linkified(text) {
  const parts = [];
  let last = 0;
  for (const match of text.matchAll(LINK_RE)) {
    const raw = match[0].replace(LINK_TRAILING_RE, "");
    let url;
    try {
      url = new URL(raw);
    } catch (_) {
      continue;
    }
    if (url.protocol !== "http:" && url.protocol !== "https:") continue;
    if (match.index > last) parts.push(document.createTextNode(text.slice(last, match.index)));
    const a = document.createElement("a");
    a.href = url.href;
    a.target = "_blank";
    a.rel = "noopener noreferrer";
    a.textContent = raw;
    parts.push(a);
    last = match.index + raw.length;
  }
  if (last < text.length) parts.push(document.createTextNode(text.slice(last)));
  return parts;
}

function messageNode(m, pending, mine) {
  const li = document.createElement("li");
  li.className = "msg" + (pending ? " pending" : "") + (mine ? " mine" : "");
  if (m.id) li.dataset.id = m.id;
  if (m.cid) li.dataset.cid = m.cid;
  li.dataset.from = m.from;
  li.dataset.ts = String(m.ts || Date.now() / 1000); // a pending send is from now
  const time = document.createElement("time");
  if (m.ts) {
    time.dateTime = new Date(m.ts * 1000).toISOString();
    time.textContent = fmtTime(m.ts);
    time.title = new Date(m.ts * 1000).toLocaleString();
  } else {
    time.textContent = "…";
    time.title = "not sent yet";
  }
  const from = document.createElement("span");
  from.className = "from";
  from.textContent = m.from;
  const text = document.createElement("span");
  text.className = "text";
  text.dir = "auto"; // Arabic and Hebrew lay out right to left
  if (m.deleted) showDeleted(li, text);
  else text.append(...linkified(m.text));
  li.append(time, " ", from, " ", text);
  if (onDelete && m.id && m.room && !m.deleted) {
    const del = document.createElement("button");
    del.type = "button";
    del.className = "delete";
    del.textContent = "delete";
    del.setAttribute("aria-label", "Delete this message from " + m.from);
    del.addEventListener("click", () => onDelete(m.room, m.id));
    li.append(" ", del);
  }
  return li;
}

/** A deleted message keeps its place, not its text (docs/protocol.md, `deleted`). */
function showDeleted(li, text) {
  li.classList.add("deleted");
  text.replaceChildren("message deleted");
  li.querySelector(".delete")?.remove();
}

/** Offer "delete" on the messages shown from now on, doing `fn(room, id)`; null: do not. */
export function offerDelete(fn) {
  onDelete = fn;
}

/** Message `id` of `room` was deleted: drop its text if it is shown. */
export function markDeleted(room, id) {
  const li = logs.get(room)?.nodes.get(id);
  if (li) showDeleted(li, li.querySelector(".text"));
}

function previousMessage(li) {
  let p = li.previousElementSibling;
  while (p && !p.classList.contains("msg")) p = p.previousElementSibling;
  return p;
}

/**
 * Give message `li` the day separator it needs right before it (the first message of a
 * day has one) and group it with the one before if both are from one sender.
 */
function decorate(li) {
  if (!li || !li.isConnected) return;
  const ts = Number(li.dataset.ts);
  const prev = previousMessage(li);
  const prevTs = prev ? Number(prev.dataset.ts) : NaN;
  const newDay = !prev || dayKey(new Date(prevTs * 1000)) !== dayKey(new Date(ts * 1000));
  let sep = li.previousElementSibling;
  if (sep && !sep.classList.contains("day")) sep = null;
  if (newDay) {
    if (!sep) {
      sep = document.createElement("li");
      sep.className = "day";
      li.before(sep);
    }
    sep.textContent = dayLabel(ts);
  } else if (sep) {
    sep.remove();
  }
  const grouped =
    !newDay &&
    prev === li.previousElementSibling &&
    prev.dataset.from === li.dataset.from &&
    ts - prevTs < GROUP_WITHIN_S;
  li.classList.toggle("grouped", grouped);
}

/** Decorate `li` and the message after it, whose neighbour it now is. */
function decorateAround(li) {
  decorate(li);
  let next = li.nextElementSibling;
  while (next && !next.classList.contains("msg")) next = next.nextElementSibling;
  decorate(next);
}

/** Show message `m` before the message `nextId` (null: after the last one). */
export function showMessage(m, nextId, { mine, current }) {
  const { log, nodes } = logOf(m.room);
  const li = messageNode(m, false, mine);
  let before = nextId !== null ? nodes.get(nextId) : log.querySelector(".pending, .sent");
  // Before the next message's day separator: it may belong to this one.
  if (before && before.previousElementSibling?.classList.contains("day")) before = before.previousElementSibling;
  sticking(m.room, current, () => {
    log.insertBefore(li, before || null);
    decorateAround(li);
  });
  nodes.set(m.id, li);
}

/**
 * Keep at most MAX_RENDERED messages of `room` in the DOM, if it has more than that and
 * some slack: drop the oldest (and what comes before them). Returns the ids dropped.
 */
export function trimLog(room) {
  const x = logs.get(room);
  if (!x || x.nodes.size <= MAX_RENDERED + TRIM_SLACK) return [];
  const ids = [...x.nodes.keys()].sort();
  const dropped = ids.slice(0, ids.length - MAX_RENDERED);
  const first = x.nodes.get(ids[dropped.length]);
  for (const id of dropped) x.nodes.delete(id);
  while (x.log.firstElementChild && x.log.firstElementChild !== first) x.log.firstElementChild.remove();
  decorate(first);
  return dropped;
}

/** Show an unacked send of ours (its message has no id yet) at the end of its room. */
export function showPending(o, from) {
  const li = messageNode({ from, text: o.text, cid: o.cid }, true, true);
  logOf(o.room).log.appendChild(li);
  decorate(li);
  pendingEls.set(o.cid, li);
}

/** A send came back from the server (as an ack or as message `id`): not pending any more. */
export function settlePending(cid, id) {
  const li = pendingEls.get(cid);
  if (!li) return;
  const x = logs.get(li.parentElement && li.parentElement.dataset.room);
  if (x && x.nodes.has(id)) {
    let next = li.nextElementSibling;
    if (li.previousElementSibling?.classList.contains("day")) li.previousElementSibling.remove();
    li.remove();
    pendingEls.delete(cid);
    while (next && !next.classList.contains("msg")) next = next.nextElementSibling;
    decorate(next);
  } else {
    // Acked before its message frame arrived: keep it visible, no longer pending.
    li.classList.remove("pending");
    li.classList.add("sent");
  }
}

/** A line of the page's own (who joined, a reset) at the end of the room's messages. */
export function systemLine(room, text, current) {
  const { log } = logOf(room);
  const li = document.createElement("li");
  li.className = "system";
  li.textContent = text;
  sticking(room, current, () => log.insertBefore(li, log.querySelector(".pending, .sent")));
}

/** Remove every message of `room` but our unacked sends. */
export function clearLog(room) {
  const x = logOf(room);
  x.nodes.clear();
  for (const li of [...x.log.children]) {
    if (!li.classList.contains("pending")) li.remove();
  }
  for (const li of [...x.log.querySelectorAll(".msg")]) decorate(li);
}

/** Run `change` (which adds older messages above) without moving what the reader sees. */
export function keepingView(change) {
  const fromBottom = el.messages.scrollHeight - el.messages.scrollTop;
  change();
  el.messages.scrollTop = el.messages.scrollHeight - fromBottom;
}

export function showRoomView(r) {
  for (const [room, x] of logs) x.box.hidden = room !== (r && r.name);
  if (r) logOf(r.name).box.hidden = false;
  el.roomTitle.textContent = r ? "#" + r.name : "no room: join one";
}

export function renderRooms(rooms, current, onLeave) {
  let unread = 0;
  for (const r of rooms.values()) unread += r.unread;
  document.title = (unread > 0 ? "(" + unread + ") " : "") + (current ? "#" + current + " · " : "") + "trio-chat";
  el.roomList.replaceChildren();
  for (const r of rooms.values()) {
    const li = document.createElement("li");
    li.dataset.room = r.name;
    if (r.name === current) li.className = "current";
    const open = document.createElement("a");
    open.href = "#" + encodeURIComponent(r.name);
    open.className = "room-link";
    open.textContent = "#" + r.name;
    if (r.name === current) open.setAttribute("aria-current", "page");
    if (r.unread > 0) {
      const badge = document.createElement("span");
      badge.className = "unread";
      badge.textContent = String(r.unread);
      badge.setAttribute("aria-label", r.unread + " unread");
      open.append(" ", badge);
    }
    const leave = document.createElement("button");
    leave.type = "button";
    leave.className = "leave";
    leave.textContent = "×";
    leave.title = "Leave #" + r.name;
    leave.setAttribute("aria-label", "Leave " + r.name);
    leave.addEventListener("click", () => onLeave(r.name));
    li.append(open, leave);
    el.roomList.appendChild(li);
  }
  // On a phone the rooms are a strip that scrolls sideways: keep the current one in it.
  el.roomList.querySelector("li.current")?.scrollIntoView({ block: "nearest", inline: "nearest" });
}

/** The room browser's list: `list` is /api/rooms' rooms, `onJoin(name)` joins one. */
export function renderRoomBrowser(list, onJoin) {
  el.roomsDialogList.replaceChildren();
  el.roomsDialogState.textContent = list.length ? "" : "No rooms with members yet.";
  for (const { room, members } of list) {
    const li = document.createElement("li");
    const name = document.createElement("span");
    name.className = "name";
    name.textContent = "#" + room;
    const count = document.createElement("span");
    count.className = "count";
    count.textContent = members + (members === 1 ? " member" : " members");
    const join = document.createElement("button");
    join.type = "button";
    join.textContent = "Join";
    join.setAttribute("aria-label", "Join " + room);
    join.addEventListener("click", () => onJoin(room));
    li.append(name, " ", count, " ", join);
    el.roomsDialogList.appendChild(li);
  }
}

/** "N left" under the box once the text is near the limit; over it, how much over. */
export function renderCounter(length, limit) {
  if (limit === null || length < limit * 0.9) {
    el.counter.textContent = "";
    el.counter.classList.remove("over");
    return;
  }
  const left = limit - length;
  const chars = (n) => n + (n === 1 ? " character" : " characters");
  el.counter.textContent = left >= 0 ? chars(left) + " left" : chars(-left) + " too many";
  el.counter.classList.toggle("over", left < 0);
}

/** Why our name is not the one asked for (it was taken), or nothing. */
export function renderNameNote(wanted, given) {
  const suffixed = wanted && given && given !== wanted;
  el.nameNote.hidden = !suffixed;
  el.nameNote.textContent = suffixed
    ? "\u201c" + wanted + "\u201d is in use, so you are \u201c" + given + "\u201d here. Change it with \u201cchange\u201d."
    : "";
}

export function renderMembers(r, myName) {
  el.memberList.replaceChildren();
  const names = r ? [...r.members].sort() : [];
  for (const n of names) {
    const li = document.createElement("li");
    li.textContent = n + (n === myName ? " (you)" : "");
    el.memberList.appendChild(li);
  }
  if (r && r.headCount !== null) {
    const li = document.createElement("li");
    li.className = "member-note";
    li.textContent = "too many to list";
    el.memberList.appendChild(li);
    el.memberCount.textContent = "(" + r.headCount.toLocaleString("en") + ")";
    return;
  }
  el.memberCount.textContent = names.length ? "(" + names.length + ")" : "";
}

export function renderTyping(r) {
  if (flashTimer !== null) return; // a flash is showing; it renders the typing line when done
  const who = r ? [...r.typing.keys()] : [];
  el.typing.textContent =
    who.length === 0 ? "" : who.join(", ") + (who.length === 1 ? " is typing…" : " are typing…");
}

export function renderLoadOlder(r) {
  el.loadOlder.hidden = !(r && r.joined && r.more);
}

/** Show `text` as an error in the typing line for a few seconds, then `after()`. */
export function flash(text, after) {
  el.typing.textContent = text;
  el.typing.classList.add("error");
  clearTimeout(flashTimer);
  flashTimer = setTimeout(() => {
    flashTimer = null;
    el.typing.classList.remove("error");
    after();
  }, 4000);
}

/** The connection's state and its words, with why it closed (or "") and "retry now" or not. */
export function setStatus(state, text, why = "", canRetry = false) {
  document.body.classList.toggle("offline", state !== "online");
  el.status.dataset.state = state;
  el.status.textContent = text;
  el.why.textContent = why;
  el.retryNow.hidden = !canRetry;
}

export function setTransport(kind) {
  el.status.dataset.transport = kind;
}

export function setMe(name) {
  el.meName.textContent = name;
}
