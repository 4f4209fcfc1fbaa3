// What the page knows: who it is, the rooms it is in, and what outlives a reload.
// No DOM and no socket here: render.js shows this state, app.js changes it.

/** A key-value store over localStorage or sessionStorage that never throws. */
function storage(area) {
  return {
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
  };
}

// Name and rooms are remembered per browser; unsent messages and the retry secret per
// tab, so a second tab never re-sends the first one's outbox.
export const browserStore = storage(() => localStorage);
export const tabStore = storage(() => sessionStorage);

/** 16 random bytes as base64url: what this page makes (the server takes 16-64 of these). */
const CLIENT_ID_RE = /^[A-Za-z0-9_-]{22}$/;

/**
 * The retry secret sent as ?client_id=: the server dedupes retried cids per client_id,
 * never per name (anyone can ask for a name). It lives as long as the outbox it
 * protects: per tab, across reloads.
 */
export const clientId = (() => {
  const saved = tabStore.get("clientId", "");
  if (typeof saved === "string" && CLIENT_ID_RE.test(saved)) return saved;
  const bytes = new Uint8Array(16);
  crypto.getRandomValues(bytes);
  const made = btoa(String.fromCharCode(...bytes)).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
  tabStore.set("clientId", made);
  return made;
})();

export const me = {
  /** The nickname asked for (?name=, or the one remembered). */
  wanted: "",
  /** The name the server gave us: `wanted`, or with a suffix if that was taken. */
  name: "",
  /** jwt mode: our token's `sub` (welcome's `user`), which messages carry as `uid`; else null. */
  user: null,
};

/** Whether message `m` is ours: by `uid` in jwt mode (names need not be unique there). */
export function isMine(m) {
  return me.user !== null ? m.uid === me.user : m.from === me.name;
}

export const view = {
  /** The room shown, or null. */
  current: null,
  /** The room whose "joined" should move the focus to the message box (the user opened it). */
  focusOnJoin: null,
};

export class Room {
  constructor(name) {
    this.name = name;
    /** Ids of the messages shown, sorted: string order is time order. */
    this.ids = [];
    /** The highest id seen: the `since` of the next join. */
    this.lastId = null;
    this.members = new Set();
    /** A big room's head count (the server lists nobody there), or null: `members` is all. */
    this.headCount = null;
    /** name -> the timer that ends their "is typing". */
    this.typing = new Map();
    /** The server said "joined" on the current socket. */
    this.joined = false;
    /** The join in flight replays the latest page (no `since`, or a reset), not a resume. */
    this.fullReplay = false;
    /** The store refused the join: it is tried again after a backoff. */
    this.joinRefused = false;
    /** The first join finished: later messages count as unread. */
    this.loaded = false;
    /** Older history exists (the server says so in `joined` and `history`). */
    this.more = false;
    this.unread = 0;
  }

  /** Record message `id`. Returns its index in display order, or -1 if already shown. */
  add(id) {
    let lo = 0;
    let hi = this.ids.length;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if (this.ids[mid] < id) lo = mid + 1;
      else hi = mid;
    }
    if (this.ids[lo] === id) return -1;
    this.ids.splice(lo, 0, id);
    if (this.lastId === null || id > this.lastId) this.lastId = id;
    return lo;
  }

  /** Forget the messages `dropped` (no longer shown; "load older" brings them back). */
  forget(dropped) {
    const gone = new Set(dropped);
    this.ids = this.ids.filter((id) => !gone.has(id));
  }

  /** Forget every message (the server reset the room). */
  clear() {
    this.ids = [];
    this.lastId = null;
    this.more = false;
  }
}

/** room name -> Room; the Map's order is the sidebar order. */
export const rooms = new Map();

export function savedRooms() {
  const saved = browserStore.get("rooms", []);
  return Array.isArray(saved) ? saved.filter((x) => typeof x === "string") : [];
}

function saveRooms() {
  browserStore.set("rooms", [...rooms.keys()]);
}

/** The room called `name`, added (and remembered) if new. */
export function roomNamed(name) {
  let r = rooms.get(name);
  if (!r) {
    r = new Room(name);
    rooms.set(name, r);
    saveRooms();
  }
  return r;
}

export function forgetRoom(name) {
  const r = rooms.get(name);
  if (!r) return;
  for (const t of r.typing.values()) clearTimeout(t);
  rooms.delete(name);
  saveRooms();
}
