// trio-chat page: plain JS, no build step, no dependencies.
//
// How it fits together:
//   - One WebSocket at a time. The URL comes from /api/config (the chat socket); if that
//     socket cannot be opened, the /ws fallback on this page's origin is tried.
//     ?transport=fallback forces /ws.
//   - Each room keeps its messages sorted by id (ids sort in time order) and a Set of ids,
//     so a message is never shown twice whatever the server replays.
//   - On (re)connect every joined room is joined again with `since` = the last id seen in
//     it: the server replays what we missed, then live messages follow.
//   - Sends carry a client id (cid) and stay in `outbox` (also in sessionStorage) until acked;
//     they are re-sent after a reconnect and the server stores a cid only once per
//     `client_id`: a random secret sent as ?client_id=, kept per tab like the outbox.
//   - A send or join refused with `store_unavailable` (the server's disk failed) is tried
//     again after a backoff, on the same socket.
//   - User text only ever reaches the page through textContent, never innerHTML.
"use strict";

(() => {
  const params = new URLSearchParams(location.search);
  // Name and rooms are remembered per browser (localStorage); unsent messages per tab
  // (sessionStorage), so a second tab never re-sends the first one's outbox.
  const storage = (area) => ({
    get(key, fallback) {
      try {
        const raw = area().getItem("trio-chat." + key);
        return raw === null ? fallback : JSON.parse(raw);
      } catch (_) {
        return fallback;
      }
    },
    set(key, value) {
      try {
        area().setItem("trio-chat." + key, JSON.stringify(value));
      } catch (_) {
        // Private mode or full storage: the page still works, it just forgets on reload.
      }
    },
  });
  const store = storage(() => localStorage);
  const tabStore = storage(() => sessionStorage);

  const $ = (id) => document.getElementById(id);
  const el = {
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

  // Same rule as the server (trio_chat/protocol/_wire.py ROOM_PATTERN).
  const ROOM_RE = /^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$/;
  const TYPING_SEND_EVERY_MS = 2000;
  const TYPING_SHOW_MS = 4000;
  const PING_EVERY_MS = 20000;
  // No frame at all (not even a pong) for this long means the socket is dead.
  const SILENCE_LIMIT_MS = 45000;
  const BACKOFF_BASE_MS = 500;
  const BACKOFF_MAX_MS = 8000;
  const HISTORY_PAGE = 50;
  // After `store_unavailable`: the first retry's delay, doubled per refusal up to the max.
  const STORE_RETRY_BASE_MS = 1000;
  const STORE_RETRY_MAX_MS = 30000;

  let name = params.get("name") || store.get("name", "");
  let myName = name; // the name the server gave us (may carry a suffix)
  const forceFallback = params.get("transport") === "fallback";
  let config = null;

  /** room name -> room state; the Map's order is the sidebar order. */
  const rooms = new Map();
  let current = null;
  /** The room whose "joined" should move the focus to the message box (the user opened it). */
  let focusOnJoin = null;
  /** Unacked sends, oldest first: {cid, room, text}. */
  let outbox = tabStore.get("outbox", []);
  /** cid -> the <li> shown for a send not yet seen back from the server. */
  const pendingEls = new Map();

  let ws = null;
  let online = false; // welcome received on the current socket
  let attempt = 0; // consecutive failed connects, for the backoff
  let reconnectTimer = null;
  let pingTimer = null;
  let lastFrameAt = 0;
  let lastTypingSent = 0;
  let cidCounter = 0;
  let storeRefusals = 0; // consecutive store_unavailable errors, for the backoff
  let storeRetryTimer = null;
  const cidPrefix = "c-" + Math.random().toString(36).slice(2, 10) + "-" + Date.now().toString(36);
  // The server dedupes retried cids per client_id, never per name (anyone can ask for a
  // name). It lives as long as the outbox it protects: per tab, across reloads.
  const CLIENT_ID_RE = /^[A-Za-z0-9_-]{16,64}$/; // the server's rule (CLIENT_ID_PATTERN)
  let clientId = tabStore.get("clientId", "");
  if (typeof clientId !== "string" || !CLIENT_ID_RE.test(clientId)) {
    const bytes = new Uint8Array(16);
    crypto.getRandomValues(bytes);
    clientId = btoa(String.fromCharCode(...bytes)).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
    tabStore.set("clientId", clientId);
  }

  // ---------------------------------------------------------------- rooms & rendering

  function roomState(room) {
    let r = rooms.get(room);
    if (!r) {
      const log = document.createElement("ol");
      log.className = "log";
      log.dataset.room = room;
      log.setAttribute("role", "log");
      log.setAttribute("aria-live", "polite");
      log.hidden = true;
      el.messages.appendChild(log);
      r = {
        name: room,
        ids: [], // sorted message ids
        nodes: new Map(), // id -> <li>
        lastId: null, // highest id seen: the `since` of the next join
        members: new Set(),
        typing: new Map(), // name -> timer
        joined: false, // server said "joined" on the current socket
        replayed: 0, // messages received since the join was sent
        fullReplay: false, // that join asked for the latest page (no `since`)
        loaded: false, // first join of this page finished (later messages count as unread)
        storeRefused: false, // a send or the join was refused as store_unavailable
        more: true, // older history may exist
        unread: 0,
        log,
      };
      rooms.set(room, r);
      saveRooms();
    }
    return r;
  }

  function saveRooms() {
    store.set("rooms", [...rooms.keys()]);
  }

  function fmtTime(ts) {
    const d = new Date(ts * 1000);
    return d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
  }

  function messageNode(m, pending) {
    const li = document.createElement("li");
    li.className = "msg" + (pending ? " pending" : "") + (m.from === myName ? " mine" : "");
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

  function nearBottom() {
    const box = el.messages;
    return box.scrollHeight - box.scrollTop - box.clientHeight < 80;
  }

  function scrollToBottom() {
    el.messages.scrollTop = el.messages.scrollHeight;
  }

  /** Insert a message in id order. Returns false if it was already shown. */
  function addMessage(m, { countUnread = true } = {}) {
    if (typeof m.id !== "string" || typeof m.room !== "string") return false;
    const r = rooms.get(m.room);
    if (!r) return false; // a room we have left
    if (r.nodes.has(m.id)) {
      if (m.cid) settleCid(m.cid, m.id);
      return false;
    }
    const stick = r === rooms.get(current) && nearBottom();
    // Binary search: ids sort in time order, so this is display order.
    let lo = 0;
    let hi = r.ids.length;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if (r.ids[mid] < m.id) lo = mid + 1;
      else hi = mid;
    }
    const li = messageNode(m, false);
    const before = lo < r.ids.length ? r.nodes.get(r.ids[lo]) : r.log.querySelector(".pending, .sent");
    r.log.insertBefore(li, before || null);
    r.ids.splice(lo, 0, m.id);
    if (!r.joined) r.replayed += 1;
    r.nodes.set(m.id, li);
    if (m.cid) settleCid(m.cid, m.id); // after the insert, so its pending copy goes away
    if (r.lastId === null || m.id > r.lastId) r.lastId = m.id;
    stopTyping(r, m.from);
    if (countUnread && r.loaded && m.room !== current && m.from !== myName) {
      r.unread += 1;
      renderRooms();
    }
    if (stick) scrollToBottom();
    return true;
  }

  /** A send came back from the server (as an ack or as its message): stop showing it pending. */
  function settleCid(cid, id) {
    const idx = outbox.findIndex((o) => o.cid === cid);
    if (idx >= 0) {
      outbox.splice(idx, 1);
      tabStore.set("outbox", outbox);
    }
    const li = pendingEls.get(cid);
    if (!li) return;
    const r = rooms.get(li.parentElement && li.parentElement.dataset.room);
    if (r && r.nodes.has(id)) {
      li.remove();
      pendingEls.delete(cid);
    } else {
      // Acked before its message frame arrived: keep it visible, no longer pending.
      li.classList.remove("pending");
      li.classList.add("sent");
    }
  }

  function systemLine(room, text) {
    const r = roomState(room);
    const stick = r === rooms.get(current) && nearBottom();
    const li = document.createElement("li");
    li.className = "system";
    li.textContent = text;
    r.log.insertBefore(li, r.log.querySelector(".pending, .sent"));
    if (stick) scrollToBottom();
  }

  function renderRooms() {
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
      leave.addEventListener("click", () => leaveRoom(r.name));
      li.append(open, leave);
      el.roomList.appendChild(li);
    }
  }

  function renderMembers() {
    const r = rooms.get(current);
    el.memberList.replaceChildren();
    const names = r ? [...r.members].sort() : [];
    for (const n of names) {
      const li = document.createElement("li");
      li.textContent = n + (n === myName ? " (you)" : "");
      el.memberList.appendChild(li);
    }
    el.memberCount.textContent = names.length ? "(" + names.length + ")" : "";
  }

  function renderTyping() {
    const r = rooms.get(current);
    const who = r ? [...r.typing.keys()] : [];
    el.typing.textContent =
      who.length === 0 ? "" : who.join(", ") + (who.length === 1 ? " is typing…" : " are typing…");
  }

  function renderLoadOlder() {
    const r = rooms.get(current);
    el.loadOlder.hidden = !(r && r.joined && r.more && r.ids.length > 0);
  }

  function stopTyping(r, who) {
    const t = r.typing.get(who);
    if (t === undefined) return;
    clearTimeout(t);
    r.typing.delete(who);
    if (r.name === current) renderTyping();
  }

  function showRoom(room) {
    const r = roomState(room);
    current = room;
    for (const other of rooms.values()) other.log.hidden = other !== r;
    r.unread = 0;
    el.roomTitle.textContent = "#" + room;
    document.title = "#" + room + " · trio-chat";
    renderRooms();
    renderMembers();
    renderTyping();
    renderLoadOlder();
    scrollToBottom();
    if (r.joined) el.text.focus();
  }

  function openRoom(room) {
    if (!ROOM_RE.test(room)) {
      flash("bad room name: " + room);
      return;
    }
    const isNew = !rooms.has(room);
    showRoom(room);
    if (!rooms.get(room).joined) focusOnJoin = room; // the box gets focus once joined
    if (isNew || !rooms.get(room).joined) sendJoin(rooms.get(room));
    if (location.hash.slice(1) !== encodeURIComponent(room)) {
      history.replaceState(null, "", "#" + encodeURIComponent(room));
    }
  }

  function leaveRoom(room) {
    const r = rooms.get(room);
    if (!r) return;
    send({ type: "leave", room });
    for (const t of r.typing.values()) clearTimeout(t);
    r.log.remove();
    rooms.delete(room);
    outbox = outbox.filter((o) => o.room !== room);
    tabStore.set("outbox", outbox);
    saveRooms();
    if (current === room) {
      const next = rooms.keys().next();
      if (next.done) {
        current = null;
        history.replaceState(null, "", location.pathname + location.search);
        el.roomTitle.textContent = "no room: join one";
        renderRooms();
        renderMembers();
        renderTyping();
        renderLoadOlder();
        el.joinInput.focus();
      } else {
        openRoom(next.value);
      }
    } else {
      renderRooms();
    }
  }

  let flashTimer = null;
  function flash(text) {
    el.typing.textContent = text;
    el.typing.classList.add("error");
    clearTimeout(flashTimer);
    flashTimer = setTimeout(() => {
      el.typing.classList.remove("error");
      renderTyping();
    }, 4000);
  }

  // ---------------------------------------------------------------- connection

  function setStatus(state, text) {
    document.body.classList.toggle("offline", state !== "online");
    el.status.dataset.state = state;
    el.status.textContent = text;
  }

  function send(obj) {
    if (!ws || ws.readyState !== WebSocket.OPEN || !online) return false;
    ws.send(JSON.stringify(obj));
    return true;
  }

  function sendJoin(r) {
    r.joined = false;
    r.replayed = 0;
    r.fullReplay = !r.lastId; // a join without `since` replays the latest page
    const join = { type: "join", room: r.name };
    if (r.lastId) join.since = r.lastId;
    send(join);
  }

  function flushOutbox(room) {
    for (const o of outbox) {
      const r = rooms.get(o.room);
      if (o.room === room && r && r.joined) {
        send({ type: "send", room: o.room, text: o.text, cid: o.cid });
      }
    }
  }

  /** The server's store refused a send or a join in `room`: try again after a backoff. */
  function retryAfterStoreFailure(room) {
    const r = rooms.get(room);
    if (!r) return;
    r.storeRefused = true;
    if (storeRetryTimer !== null) return;
    const cap = Math.min(STORE_RETRY_MAX_MS, STORE_RETRY_BASE_MS * 2 ** storeRefusals);
    storeRefusals += 1;
    storeRetryTimer = setTimeout(() => {
      storeRetryTimer = null;
      for (const x of rooms.values()) {
        if (!x.storeRefused) continue;
        x.storeRefused = false;
        // Same cids: the server stores each once, however often it is sent.
        if (x.joined) flushOutbox(x.name);
        else if (online) sendJoin(x);
      }
    }, cap / 2 + Math.random() * (cap / 2));
  }

  function wsUrl(path) {
    const u = new URL(path, location.href);
    u.protocol = u.protocol === "https:" ? "wss:" : "ws:";
    return u;
  }

  /** Ask the server where its chat socket is. Returns false if the server is unreachable. */
  async function loadConfig() {
    try {
      const resp = await fetch("/api/config", { cache: "no-store" });
      // No usable config (an old server, a proxy): the /ws fallback alone will do.
      config = resp.ok ? await resp.json().catch(() => ({})) : {};
      return true;
    } catch (_) {
      return false;
    }
  }

  /** Where to connect, in order: the chat socket, then the /ws fallback on this origin. */
  function candidates() {
    const list = [];
    if (!forceFallback && config && config.ws_url) {
      list.push({ url: wsUrl(config.ws_url), kind: "chat" });
    }
    list.push({ url: wsUrl((config && config.fallback_ws_url) || "/ws"), kind: "fallback" });
    for (const c of list) {
      c.url.searchParams.set("name", name);
      c.url.searchParams.set("client_id", clientId);
    }
    return list;
  }

  async function connect() {
    reconnectTimer = null;
    // Server unreachable: back off. (Trying /ws now would work only if the server came
    // back within the last moment, and would pin this page to the slower fallback.)
    if (!config && !(await loadConfig())) {
      disconnected(1006, "");
      return;
    }
    setStatus(attempt === 0 ? "connecting" : "reconnecting", attempt === 0 ? "connecting…" : "reconnecting…");
    tryUrl(candidates(), 0);
  }

  function tryUrl(list, i) {
    let opened = false;
    const sock = new WebSocket(String(list[i].url));
    ws = sock;
    sock.addEventListener("open", () => {
      opened = true;
      el.status.dataset.transport = list[i].kind;
      lastFrameAt = Date.now();
    });
    sock.addEventListener("message", (ev) => {
      if (sock !== ws) return;
      lastFrameAt = Date.now();
      if (typeof ev.data !== "string") return;
      for (const line of ev.data.split("\n")) {
        if (!line) continue;
        let obj;
        try {
          obj = JSON.parse(line);
        } catch (_) {
          continue;
        }
        handle(obj);
      }
    });
    sock.addEventListener("close", (ev) => {
      if (sock !== ws) return;
      if (!opened && i + 1 < list.length) {
        tryUrl(list, i + 1); // chat socket unreachable: try the /ws fallback right away
        return;
      }
      disconnected(ev.code, ev.reason);
    });
  }

  function disconnected(code, reason) {
    ws = null;
    online = false;
    clearInterval(pingTimer);
    for (const r of rooms.values()) {
      r.joined = false;
      for (const t of r.typing.values()) clearTimeout(t);
      r.typing.clear();
    }
    renderTyping();
    renderLoadOlder();
    let delay;
    if (code === 4008) {
      // We fell behind; nothing is lost, the rejoin with `since` catches up.
      setStatus("slow", "disconnected: connection too slow; catching up…");
      delay = 250 + Math.random() * 750;
    } else {
      // Exponential backoff with full jitter, so a restarted server is not stampeded.
      const cap = Math.min(BACKOFF_MAX_MS, BACKOFF_BASE_MS * 2 ** attempt);
      delay = cap / 2 + Math.random() * (cap / 2);
      const why = code === 1008 ? " (refused: " + (reason || "policy") + ")" : "";
      setStatus("reconnecting", "reconnecting… in " + Math.ceil(delay / 1000) + " s" + why);
    }
    attempt += 1;
    if (code === 1001 || attempt > 1) config = null; // the server may have moved: ask again
    reconnectTimer = setTimeout(connect, delay);
  }

  function keepalive() {
    if (!ws || ws.readyState !== WebSocket.OPEN) return;
    if (Date.now() - lastFrameAt > SILENCE_LIMIT_MS) {
      ws.close(4000, "no answer");
      return;
    }
    send({ type: "ping" });
  }

  function handle(f) {
    switch (f.type) {
      case "welcome": {
        online = true;
        attempt = 0;
        myName = f.name;
        el.meName.textContent = myName;
        const transport = el.status.dataset.transport === "fallback" ? " (via /ws)" : "";
        setStatus("online", "online" + transport);
        clearInterval(pingTimer);
        pingTimer = setInterval(keepalive, PING_EVERY_MS);
        for (const r of rooms.values()) sendJoin(r);
        break;
      }
      case "message":
        addMessage(f);
        break;
      case "joined": {
        const r = rooms.get(f.room);
        if (!r) {
          send({ type: "leave", room: f.room }); // left while the join was in flight
          break;
        }
        r.joined = true;
        r.loaded = true;
        // A first page shorter than a full one is all there is.
        if (r.fullReplay && r.replayed < HISTORY_PAGE) r.more = false;
        r.members = new Set(Array.isArray(f.members) ? f.members : []);
        if (f.room === current) {
          renderMembers();
          renderLoadOlder();
          scrollToBottom();
          if (focusOnJoin === f.room && !el.nameDialog.open) el.text.focus();
          focusOnJoin = null;
        }
        flushOutbox(f.room);
        break;
      }
      case "reset": {
        // Our `since` is older than the server keeps for resume: start the room afresh.
        const r = rooms.get(f.room);
        if (!r) break;
        r.ids = [];
        r.nodes.clear();
        r.lastId = null;
        r.more = true;
        for (const li of [...r.log.children]) {
          if (!li.classList.contains("pending")) li.remove();
        }
        systemLine(f.room, "(too much was missed: reloaded the latest messages)");
        send({ type: "history", room: f.room, limit: HISTORY_PAGE });
        break;
      }
      case "ack":
        storeRefusals = 0;
        if (typeof f.cid === "string") settleCid(f.cid, f.id);
        break;
      case "presence": {
        const r = rooms.get(f.room);
        if (!r) break;
        if (f.joined) {
          if (!r.members.has(f.joined)) systemLine(f.room, f.joined + " joined");
          r.members.add(f.joined);
        }
        if (f.left) {
          r.members.delete(f.left);
          stopTyping(r, f.left);
          systemLine(f.room, f.left + " left");
        }
        if (f.room === current) renderMembers();
        break;
      }
      case "typing": {
        const r = rooms.get(f.room);
        if (!r || f.from === myName) break;
        clearTimeout(r.typing.get(f.from));
        r.typing.set(f.from, setTimeout(() => stopTyping(r, f.from), TYPING_SHOW_MS));
        if (f.room === current) renderTyping();
        break;
      }
      case "history": {
        const r = rooms.get(f.room);
        if (!r) break;
        const keepFromBottom = el.messages.scrollHeight - el.messages.scrollTop;
        for (const m of f.messages || []) addMessage(m, { countUnread: false });
        r.more = Boolean(f.more);
        if (f.room === current) {
          el.messages.scrollTop = el.messages.scrollHeight - keepFromBottom;
          renderLoadOlder();
        }
        break;
      }
      case "error":
        flash("error: " + (f.message || f.code));
        if (f.code === "rate_limited") setTimeout(() => flushOutbox(current), 1500);
        if (f.code === "store_unavailable" && f.room) retryAfterStoreFailure(f.room);
        if (f.code === "bad_room" && f.room && rooms.has(f.room)) leaveRoom(f.room);
        break;
      case "pong":
      default:
        break;
    }
  }

  // ---------------------------------------------------------------- user actions

  function newCid() {
    cidCounter += 1;
    return cidPrefix + "-" + cidCounter;
  }

  el.sendForm.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const text = el.text.value.trim();
    if (!text || !current) return;
    const r = rooms.get(current);
    const o = { cid: newCid(), room: current, text };
    outbox.push(o);
    tabStore.set("outbox", outbox);
    const li = messageNode({ from: myName, text, cid: o.cid }, true);
    r.log.appendChild(li);
    pendingEls.set(o.cid, li);
    scrollToBottom();
    el.text.value = "";
    lastTypingSent = 0; // the message ended the others' "is typing"; the next key says it again
    if (r.joined) send({ type: "send", room: o.room, text: o.text, cid: o.cid });
  });

  el.text.addEventListener("input", () => {
    const r = rooms.get(current);
    const now = Date.now();
    if (r && r.joined && el.text.value && now - lastTypingSent > TYPING_SEND_EVERY_MS) {
      lastTypingSent = now;
      send({ type: "typing", room: current });
    }
  });

  el.joinForm.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const room = el.joinInput.value.trim().replace(/^#/, "");
    if (!room) return;
    el.joinInput.value = "";
    location.hash = encodeURIComponent(room); // hashchange opens it
    if (room === current) el.text.focus();
  });

  el.loadOlder.addEventListener("click", () => {
    const r = rooms.get(current);
    if (!r || r.ids.length === 0) return;
    send({ type: "history", room: current, before: r.ids[0], limit: HISTORY_PAGE });
  });

  // Back on the network: do not wait out the backoff.
  window.addEventListener("online", () => {
    if (reconnectTimer === null) return;
    clearTimeout(reconnectTimer);
    attempt = 0;
    connect();
  });

  window.addEventListener("hashchange", () => {
    const room = hashRoom();
    if (room && room !== current) openRoom(room);
  });

  document.addEventListener("keydown", (ev) => {
    if (ev.altKey && (ev.key === "ArrowUp" || ev.key === "ArrowDown")) {
      const names = [...rooms.keys()];
      if (names.length < 2) return;
      ev.preventDefault();
      const i = names.indexOf(current);
      const next = names[(i + (ev.key === "ArrowUp" ? -1 : 1) + names.length) % names.length];
      location.hash = encodeURIComponent(next);
    } else if (ev.key === "Escape" && !el.nameDialog.open) {
      el.text.focus();
    }
  });

  el.rename.addEventListener("click", () => askName());

  function askName() {
    el.nameInput.value = name;
    el.nameDialog.showModal();
    el.nameInput.focus();
  }

  el.nameForm.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const n = el.nameInput.value.trim();
    if (!n) return;
    el.nameDialog.close();
    const changed = n !== name;
    name = n;
    store.set("name", name);
    if (!ws && !reconnectTimer) {
      start();
    } else if (changed && ws) {
      ws.close(1000, "renaming"); // reconnects under the new name
      attempt = 0;
    }
  });

  // ---------------------------------------------------------------- start

  function hashRoom() {
    try {
      return decodeURIComponent(location.hash.slice(1));
    } catch (_) {
      return "";
    }
  }

  function start() {
    el.meName.textContent = name;
    const saved = store.get("rooms", []);
    const fromHash = hashRoom();
    for (const room of saved) if (ROOM_RE.test(room)) roomState(room);
    const first = ROOM_RE.test(fromHash) ? fromHash : saved.find((x) => ROOM_RE.test(x)) || "general";
    roomState(first);
    showRoom(first);
    focusOnJoin = first;
    if (!location.hash) history.replaceState(null, "", "#" + encodeURIComponent(first));
    // Sends left unacked by a previous visit go out again once their room is joined.
    for (const o of outbox) {
      const r = roomState(o.room);
      const li = messageNode({ from: name, text: o.text, cid: o.cid }, true);
      r.log.appendChild(li);
      pendingEls.set(o.cid, li);
    }
    renderRooms();
    connect();
  }

  if (params.get("name")) store.set("name", name);
  if (name) start();
  else askName();
})();
