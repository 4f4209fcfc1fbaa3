// The DOM: one <ol class="log"> per room (only the current one shown), the sidebar, the
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
};

/** room name -> {log: <ol>, nodes: Map(id -> <li>)} */
const logs = new Map();
/** cid -> the <li> shown for a send not yet seen back from the server. */
const pendingEls = new Map();
let flashTimer = null;

function logOf(room) {
  let x = logs.get(room);
  if (!x) {
    const log = document.createElement("ol");
    log.className = "log";
    log.dataset.room = room;
    log.setAttribute("role", "log");
    log.setAttribute("aria-live", "polite");
    log.hidden = true;
    el.messages.appendChild(log);
    x = { log, nodes: new Map() };
    logs.set(room, x);
  }
  return x;
}

export function dropLog(room) {
  const x = logs.get(room);
  if (!x) return;
  x.log.remove();
  logs.delete(room);
  for (const [cid, li] of pendingEls) if (!li.isConnected) pendingEls.delete(cid);
}

function nearBottom() {
  const box = el.messages;
  return box.scrollHeight - box.scrollTop - box.clientHeight < 80;
}

export function scrollToBottom() {
  el.messages.scrollTop = el.messages.scrollHeight;
}

/** Run `change` (which adds to the log) keeping the view at the bottom if it was there. */
function sticking(room, current, change) {
  const stick = room === current && nearBottom();
  change();
  if (stick) scrollToBottom();
}

function fmtTime(ts) {
  return new Date(ts * 1000).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
}

function messageNode(m, pending, mine) {
  const li = document.createElement("li");
  li.className = "msg" + (pending ? " pending" : "") + (mine ? " mine" : "");
  if (m.id) li.dataset.id = m.id;
  if (m.cid) li.dataset.cid = m.cid;
  li.dataset.from = m.from;
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
  text.textContent = m.text;
  li.append(time, " ", from, " ", text);
  return li;
}

/** Show message `m` before the message `nextId` (null: after the last one). */
export function showMessage(m, nextId, { mine, current }) {
  const { log, nodes } = logOf(m.room);
  const li = messageNode(m, false, mine);
  const before = nextId !== null ? nodes.get(nextId) : log.querySelector(".pending, .sent");
  sticking(m.room, current, () => log.insertBefore(li, before || null));
  nodes.set(m.id, li);
}

/** Show an unacked send of ours (its message has no id yet) at the end of its room. */
export function showPending(o, from) {
  const li = messageNode({ from, text: o.text, cid: o.cid }, true, true);
  logOf(o.room).log.appendChild(li);
  pendingEls.set(o.cid, li);
}

/** A send came back from the server (as an ack or as message `id`): not pending any more. */
export function settlePending(cid, id) {
  const li = pendingEls.get(cid);
  if (!li) return;
  const x = logs.get(li.parentElement && li.parentElement.dataset.room);
  if (x && x.nodes.has(id)) {
    li.remove();
    pendingEls.delete(cid);
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
}

/** Run `change` (which adds older messages above) without moving what the reader sees. */
export function keepingView(change) {
  const fromBottom = el.messages.scrollHeight - el.messages.scrollTop;
  change();
  el.messages.scrollTop = el.messages.scrollHeight - fromBottom;
}

export function showRoomView(r) {
  for (const [room, x] of logs) x.log.hidden = room !== (r && r.name);
  if (r) logOf(r.name).log.hidden = false;
  el.roomTitle.textContent = r ? "#" + r.name : "no room: join one";
  if (r) document.title = "#" + r.name + " · trio-chat";
}

export function renderRooms(rooms, current, onLeave) {
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
}

export function renderMembers(r, myName) {
  el.memberList.replaceChildren();
  const names = r ? [...r.members].sort() : [];
  for (const n of names) {
    const li = document.createElement("li");
    li.textContent = n + (n === myName ? " (you)" : "");
    el.memberList.appendChild(li);
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

export function setStatus(state, text) {
  document.body.classList.toggle("offline", state !== "online");
  el.status.dataset.state = state;
  el.status.textContent = text;
}

export function setTransport(kind) {
  el.status.dataset.transport = kind;
}

export function setMe(name) {
  el.meName.textContent = name;
}
