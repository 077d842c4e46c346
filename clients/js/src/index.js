// The attendance-hub client: one WebSocket session that reconnects, a durable queue of
// punches that are resent until acked, subscriptions that survive reconnects, the
// server's clock, and token refresh. No runtime dependencies; browsers and Node 20+.

export const PROTOCOL = "attendance.v1.json";

/** Connection states. */
export const DISCONNECTED = "disconnected";
export const CONNECTING = "connecting";
export const CONNECTED = "connected";

const DEFAULTS = {
  backoffBaseMs: 500,
  backoffMaxMs: 20_000,
  helloTimeoutMs: 10_000,
  pingIntervalMs: null, // from the welcome's heartbeat_s: a third of it, at most 10 s
  deadAfterMs: null, // two and a half ping intervals without a frame
  sendPerSecond: 20, // punches replayed from the queue, at most this many a second
  window: 32, // punches sent and not yet answered
  retryAfterMs: 2_000, // a punch the hub could not store (unavailable, rate_limited)
  refreshBeforeS: 60, // ask getToken for a new token this long before the old one expires
};

/**
 * Full-jitter exponential backoff: a uniform draw from 0 to min(max, base * 2^attempt),
 * never below `base / 2` so that a crowd of clients does not hammer a hub that came back.
 */
export function backoffDelay(attempt, baseMs = DEFAULTS.backoffBaseMs, maxMs = DEFAULTS.backoffMaxMs, random = Math.random) {
  const cap = Math.min(maxMs, baseMs * 2 ** Math.min(attempt, 30));
  return Math.max(baseMs / 2, random() * cap);
}

/** A random (version 4) UUID; `crypto.randomUUID` is missing on plain-http pages. */
export function uuid4() {
  const b = new Uint8Array(16);
  globalThis.crypto.getRandomValues(b);
  b[6] = (b[6] & 0x0f) | 0x40;
  b[8] = (b[8] & 0x3f) | 0x80;
  const h = Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

/** The claims of a JWT, without checking its signature (the hub does that). */
export function tokenClaims(token) {
  const part = String(token).split(".")[1];
  if (!part) return {};
  const b64 = part.replace(/-/g, "+").replace(/_/g, "/").padEnd(Math.ceil(part.length / 4) * 4, "=");
  try {
    const text = new TextDecoder().decode(Uint8Array.from(atob(b64), (c) => c.charCodeAt(0)));
    return JSON.parse(text);
  } catch {
    return {};
  }
}

class Emitter {
  #handlers = new Map();

  /** Calls `handler` on every `event`; returns a function that stops it. */
  on(event, handler) {
    if (!this.#handlers.has(event)) this.#handlers.set(event, new Set());
    this.#handlers.get(event).add(handler);
    return () => this.off(event, handler);
  }

  off(event, handler) {
    this.#handlers.get(event)?.delete(handler);
  }

  emit(event, ...args) {
    for (const handler of [...(this.#handlers.get(event) ?? [])]) {
      try {
        handler(...args);
      } catch (err) {
        queueMicrotask(() => {
          throw err;
        });
      }
    }
  }
}

/** Keeps punches in memory only: for tests, and for callers that keep them elsewhere. */
export class MemoryStore {
  #punches = new Map();

  async load() {
    return [...this.#punches.values()].map((p) => structuredClone(p));
  }

  async put(punch) {
    this.#punches.set(punch.id, structuredClone(punch));
  }

  async delete(id) {
    this.#punches.delete(id);
  }
}

/** Keeps punches in the browser's IndexedDB, so that a reload or a crash loses none. */
export class IndexedDBStore {
  #db;

  constructor(name = "attendance-hub-punches", indexedDB = globalThis.indexedDB) {
    this.#db = new Promise((resolve, reject) => {
      const open = indexedDB.open(name, 1);
      open.onupgradeneeded = () => open.result.createObjectStore("punches", { keyPath: "id" });
      open.onsuccess = () => resolve(open.result);
      open.onerror = () => reject(open.error);
    });
  }

  async #run(mode, work) {
    const db = await this.#db;
    return new Promise((resolve, reject) => {
      const tx = db.transaction("punches", mode);
      const request = work(tx.objectStore("punches"));
      // "complete" only once the write is durable, not when the request succeeds.
      tx.oncomplete = () => resolve(request.result);
      tx.onerror = () => reject(tx.error);
      tx.onabort = () => reject(tx.error);
    });
  }

  async load() {
    const all = await this.#run("readonly", (store) => store.getAll());
    return all.sort((a, b) => a.order - b.order);
  }

  async put(punch) {
    await this.#run("readwrite", (store) => store.put(punch));
  }

  async delete(id) {
    await this.#run("readwrite", (store) => store.delete(id));
  }
}

const SERVER_FRAME_TYPES = new Set([
  "welcome", "ack", "pong", "refreshed", "error", "drain", "subscribed", "unsubscribed",
  "snapshot", "delta", "alert", "notice",
]);

/** What to do when the hub closes the socket with a code, by code. */
const CLOSE_REASONS = {
  1009: "frame_too_large",
  1012: "restart",
  1013: "try_later",
  4001: "auth",
  4002: "hello",
  4008: "flood",
  4009: "slow_consumer",
};

/**
 * A live view of one channel: its members (by key) and version, kept across reconnects.
 * Events: "snapshot" (members), "change" (changes, members), "alert" (frame), "notice"
 * (frame), "ack" (frame, on `me`), "gap" ({expected, got}), "error" (error frame).
 */
export class Subscription extends Emitter {
  constructor(client, channel) {
    super();
    this.client = client;
    this.channel = channel;
    /** @type {number | null} */
    this.version = null;
    this.members = new Map();
    this.ready = false;
    this.closed = false;
    this.resyncing = false;
    this.kind = channel.split(":")[0];
  }

  /** The key a member is held under. */
  keyOf(member) {
    if (this.kind === "terminals") return member.device;
    if (this.kind === "alerts") return member.id;
    return member.employee;
  }

  /** Stops the subscription (and tells the hub, when connected). */
  close() {
    if (this.closed) return;
    this.closed = true;
    this.client._unsubscribe(this);
  }

  _snapshot(frame) {
    this.version = frame.version;
    this.members = new Map(frame.members.map((m) => [this.keyOf(m), m]));
    this.ready = true;
    this.resyncing = false;
    this.emit("snapshot", this.members);
  }

  _versioned(frame, apply) {
    if (this.version === null || this.resyncing) return;
    if (frame.version <= this.version) return; // already applied (a replay that overlaps)
    if (frame.version !== this.version + 1) {
      this.emit("gap", { expected: this.version + 1, got: frame.version });
      this.resyncing = true;
      this.client._resubscribe(this);
      return;
    }
    this.version = frame.version;
    apply();
  }

  _delta(frame) {
    this._versioned(frame, () => {
      if (this.kind === "me") {
        // Each delta of `me` holds everything it shows now: one member or none.
        this.members = new Map(frame.changes.map((m) => [this.keyOf(m), m]));
      } else {
        for (const change of frame.changes) {
          const key = this.keyOf(change);
          if (this.kind === "presence" && change.state === "out" && !change.late) {
            this.members.delete(key);
          } else {
            this.members.set(key, change);
          }
        }
      }
      this.emit("change", frame.changes, this.members);
    });
  }

  _alert(frame) {
    if (frame.version === undefined || frame.version === null) {
      this.emit("alert", frame); // on `me`: not versioned
      return;
    }
    this._versioned(frame, () => {
      const { type: _type, channel: _channel, version: _version, ...member } = frame;
      this.members.set(member.id, member);
      // An alerts channel's snapshot holds the 50 most recent; keep no more than that.
      while (this.members.size > 50) this.members.delete(this.members.keys().next().value);
      this.emit("alert", frame);
      this.emit("change", [member], this.members);
    });
  }
}

/**
 * One client session with a hub. See index.d.ts for the options and events.
 */
export class AttendanceClient extends Emitter {
  #options;
  #WebSocket;
  #store;
  #socket = null;
  #state = DISCONNECTED;
  #wanted = false;
  #attempt = 0;
  #timers = new Set();
  #reconnectTimer = null;
  #pingTimer = null;
  #helloTimer = null;
  #refreshTimer = null;
  #lastFrameAt = 0;
  #drainMs = null;
  #queue = []; // punches in order of creation: {id, frame, order, created, sentAt, retryAt}
  #loaded;
  #order = 0;
  #subs = new Map();
  #pending = new Map(); // ref -> {resolve, reject}
  #refs = 0;
  #offsetSamples = [];
  #pumpTimer = null;
  #sentTimes = [];
  #onOnline;
  #onOffline;

  constructor(options) {
    super();
    if (!options?.url) throw new TypeError("AttendanceClient needs `url`");
    if (!options.token && !options.getToken) throw new TypeError("AttendanceClient needs `token` or `getToken`");
    this.#options = { ...DEFAULTS, ...options };
    this.#WebSocket = options.WebSocket ?? globalThis.WebSocket;
    if (!this.#WebSocket) throw new TypeError("no WebSocket: pass `WebSocket` (in Node 20, the `ws` package's)");
    this.#store = options.store ?? new MemoryStore();
    this.token = options.token ?? null;
    this.random = options.random ?? Math.random;
    this.now = options.now ?? (() => Date.now());
    /** The welcome of the current session, null while not connected. */
    this.session = null;
    /** Server time minus local time, in ms, from the best ping round trip; 0 until known. */
    this.offsetMs = options.offsetMs ?? 0;
    /** The round trip of the ping the offset came from, ms; null until measured. */
    this.rttMs = null;
    // Browsers: when the network comes back, try at once rather than after the backoff;
    // when it goes, say so at once rather than after the heartbeat finds out.
    this.#onOnline = () => this.#retryNow();
    this.#onOffline = () => this.#kill("offline");
    globalThis.addEventListener?.("online", this.#onOnline);
    globalThis.addEventListener?.("offline", this.#onOffline);
    this.#loaded = this.#store.load().then((punches) => {
      for (const p of punches) {
        this.#order = Math.max(this.#order, p.order);
        this.#queue.push({ ...p, sentAt: null, retryAt: 0 });
      }
      this.#queue.sort((a, b) => a.order - b.order);
    });
  }

  /** `disconnected`, `connecting` or `connected`. */
  get state() {
    return this.#state;
  }

  /** Resolves once the punches kept by the store from an earlier run are loaded. */
  get loaded() {
    return this.#loaded;
  }

  /** The punches not yet answered by the hub, oldest first. */
  pending() {
    return this.#queue.map((p) => ({ id: p.id, frame: { ...p.frame }, created: p.created }));
  }

  /** The server's clock now, as far as the offset is known (ms since the epoch). */
  serverNow() {
    return this.now() + this.offsetMs;
  }

  /** Starts connecting, and keeps reconnecting until `close()`. */
  connect() {
    this.#wanted = true;
    if (this.#state === DISCONNECTED && this.#reconnectTimer === null) this.#open("connect");
    return this;
  }

  /** Closes the session for good (queued punches stay in the store). */
  close() {
    this.#wanted = false;
    globalThis.removeEventListener?.("online", this.#onOnline);
    globalThis.removeEventListener?.("offline", this.#onOffline);
    this.#clearTimers();
    const socket = this.#socket;
    this.#socket = null;
    if (socket) {
      this.#detach(socket);
      try {
        socket.close(1000, "client closing");
      } catch {
        // already closed
      }
    }
    this.#settlePending(new Error("client closed"));
    this.#setState(DISCONNECTED, { reason: "closed_by_client" });
  }

  /**
   * Queues a punch: it gets its id now, is stored before it is sent, and stays until the
   * hub answers `accepted` or `duplicate` (event "ack") or `rejected` (event "rejected").
   * `at` defaults to now in server-corrected time. Resolves with the queued punch once stored.
   */
  async punch(fields) {
    if ((fields.employee === undefined) === (fields.badge === undefined)) {
      throw new TypeError("a punch needs exactly one of `employee` or `badge`");
    }
    if (!["in", "out", "break_start", "break_end"].includes(fields.kind)) {
      throw new TypeError(`unknown punch kind ${JSON.stringify(fields.kind)}`);
    }
    await this.#loaded;
    const at = fields.at ?? new Date(this.serverNow());
    const frame = {
      type: "punch",
      id: fields.id ?? uuid4(),
      kind: fields.kind,
      at: at instanceof Date ? at.toISOString() : String(at),
    };
    if (fields.employee !== undefined) frame.employee = fields.employee;
    if (fields.badge !== undefined) frame.badge = fields.badge;
    for (const key of ["method", "seq", "geo"]) {
      if (fields[key] !== undefined && fields[key] !== null) frame[key] = fields[key];
    }
    // Made while the hub could not hear it: the hub is told so when it is finally sent.
    frame.offline = this.#state !== CONNECTED;
    const entry = { id: frame.id, frame, order: ++this.#order, created: this.now() };
    await this.#store.put(entry);
    this.#queue.push({ ...entry, sentAt: null, retryAt: 0 });
    this.emit("queued", this.pending().at(-1));
    this.#pump();
    return { id: entry.id, frame: { ...frame }, created: entry.created };
  }

  /**
   * Subscribes to a channel; the subscription resubscribes with `since` after every
   * reconnect, and on a gap in versions.
   */
  subscribe(channel) {
    const existing = this.#subs.get(channel);
    if (existing && !existing.closed) return existing;
    const sub = new Subscription(this, channel);
    this.#subs.set(channel, sub);
    if (this.#state === CONNECTED) this.#sendSubscribe(sub);
    return sub;
  }

  /** Replaces the session's token in place; resolves with the hub's `expires_at`. */
  async refresh(token) {
    const next = token ?? (await this.#options.getToken?.());
    if (!next) throw new Error("no token to refresh with");
    this.token = next;
    this.#scheduleRefresh();
    if (this.#state !== CONNECTED) return null;
    const reply = await this.#request({ type: "refresh", token: next });
    return reply.expires_at;
  }

  /** Sends an application ping now; resolves with the pong (and updates the offset). */
  async ping() {
    return this.#request({ type: "ping", t: Math.round(this.now()) });
  }

  _unsubscribe(sub) {
    if (this.#subs.get(sub.channel) === sub) this.#subs.delete(sub.channel);
    if (this.#state === CONNECTED) this.#send({ type: "unsubscribe", channel: sub.channel });
  }

  _resubscribe(sub) {
    if (this.#state === CONNECTED) this.#sendSubscribe(sub);
  }

  // -- the socket -------------------------------------------------------------------------

  #setState(state, info) {
    if (state === this.#state && state !== DISCONNECTED) return;
    if (state === this.#state && info.reason === this.lastReason) return;
    this.#state = state;
    this.lastReason = info.reason;
    this.emit("state", { state, ...info });
  }

  async #open(reason) {
    this.#reconnectTimer = null;
    if (!this.#wanted) return;
    this.#setState(CONNECTING, { reason });
    if (this.#options.getToken && this.token && this.#expiresWithinMs(this.token) < this.#options.refreshBeforeS * 1000) {
      this.token = null; // about to run out while we were away: start with a new one
    }
    if (!this.token && this.#options.getToken) {
      try {
        this.token = await this.#options.getToken();
      } catch (err) {
        this.#lost({ reason: "auth", error: err });
        return;
      }
    }
    if (!this.#wanted) return;
    let socket;
    try {
      socket = new this.#WebSocket(this.#options.url, [PROTOCOL]);
    } catch (err) {
      this.#lost({ reason: "unreachable", error: err });
      return;
    }
    this.#socket = socket;
    let opened = false;
    socket.onopen = () => {
      opened = true;
      this.#lastFrameAt = this.now();
      const hello = { type: "hello", token: this.token, ref: this.#ref() };
      if (this.#options.client) hello.client = this.#options.client;
      this.#sendRaw(hello);
      this.#helloTimer = this.#timer(() => this.#kill("hello_timeout"), this.#options.helloTimeoutMs);
    };
    socket.onmessage = (event) => this.#receive(event.data);
    socket.onerror = () => {};
    socket.onclose = (event) => {
      if (this.#socket !== socket) return;
      this.#socket = null;
      const code = event.code;
      const reason = opened ? (CLOSE_REASONS[code] ?? "closed") : "unreachable";
      this.#lost({ reason, code });
    };
  }

  #retryNow() {
    if (!this.#wanted || this.#reconnectTimer === null) return;
    this.#clear(this.#reconnectTimer);
    this.#open("online");
  }

  #detach(socket) {
    socket.onopen = socket.onmessage = socket.onerror = socket.onclose = null;
  }

  /** Gives up on the socket (silent hub, no welcome) and reconnects. */
  #kill(reason) {
    const socket = this.#socket;
    if (!socket) return;
    this.#socket = null;
    this.#detach(socket);
    try {
      socket.close(4000, reason);
    } catch {
      // nothing to close
    }
    this.#lost({ reason });
  }

  #lost(info) {
    this.#clearSessionTimers();
    this.session = null;
    for (const p of this.#queue) p.sentAt = null; // unanswered: resent after reconnecting
    this.#settlePending(new Error(`disconnected (${info.reason})`));
    for (const sub of this.#subs.values()) sub.resyncing = false;
    let delay = null;
    if (this.#wanted) {
      if (info.reason === "auth" && !this.#options.getToken) {
        this.#wanted = false; // a bad token does not get better by retrying
      } else if (this.#drainMs !== null) {
        delay = this.#drainMs;
        info = { ...info, reason: "drain" };
      } else {
        delay = backoffDelay(this.#attempt++, this.#options.backoffBaseMs, this.#options.backoffMaxMs, this.random);
      }
      if (info.reason === "auth" && this.#options.getToken) this.token = null;
    }
    this.#drainMs = null;
    this.#setState(DISCONNECTED, { ...info, retryInMs: delay });
    if (delay !== null) {
      this.#reconnectTimer = this.#timer(() => this.#open("retry"), delay);
    }
  }

  #receive(data) {
    this.#lastFrameAt = this.now();
    let frame;
    try {
      frame = JSON.parse(typeof data === "string" ? data : new TextDecoder().decode(data));
    } catch {
      this.emit("protocol_error", { message: "a frame that is not JSON", data });
      return;
    }
    if (!frame || typeof frame !== "object" || !SERVER_FRAME_TYPES.has(frame.type)) {
      this.emit("frame", frame); // a newer hub's frame type: offered, not acted on
      return;
    }
    this.emit("frame", frame);
    switch (frame.type) {
      case "welcome":
        return this.#welcome(frame);
      case "ack":
        return this.#ack(frame);
      case "pong":
        this.#pong(frame);
        return this.#answer(frame);
      case "refreshed":
        return this.#answer(frame);
      case "error":
        return this.#error(frame);
      case "drain":
        this.#drainMs = frame.reconnect_after_ms;
        this.emit("drain", frame);
        return;
      case "subscribed":
        return this.#subscribed(frame);
      case "unsubscribed":
        return;
      case "snapshot":
        return this.#subs.get(frame.channel)?._snapshot(frame);
      case "delta":
        return this.#subs.get(frame.channel)?._delta(frame);
      case "alert":
        this.#subs.get(frame.channel)?._alert(frame);
        this.emit("alert", frame);
        return;
      case "notice":
        this.#subs.get(frame.channel)?.emit("notice", frame);
        this.emit("notice", frame);
        return;
    }
  }

  #welcome(frame) {
    this.#clear(this.#helloTimer);
    this.#helloTimer = null;
    this.#attempt = 0;
    this.session = frame;
    const sent = this.now();
    const server = Date.parse(frame.server_time);
    if (this.rttMs === null && Number.isFinite(server)) this.offsetMs = server - sent;
    this.#setState(CONNECTED, { reason: "welcome" });
    const heartbeatMs = (frame.heartbeat_s || 30) * 1000;
    const interval = this.#options.pingIntervalMs ?? Math.min(10_000, heartbeatMs / 3);
    const dead = this.#options.deadAfterMs ?? interval * 2.5;
    this.#pingTimer = setInterval(() => {
      if (this.now() - this.#lastFrameAt > dead) {
        this.#kill("dead");
        return;
      }
      this.#sendRaw({ type: "ping", t: Math.round(this.now()) });
    }, Math.min(interval, dead / 2));
    this.#timers.add(this.#pingTimer);
    this.#sendRaw({ type: "ping", t: Math.round(this.now()) });
    for (const sub of this.#subs.values()) this.#sendSubscribe(sub);
    this.#scheduleRefresh();
    this.#pump();
  }

  #pong(frame) {
    if (typeof frame.t !== "number") return;
    const back = this.now();
    const rtt = back - frame.t;
    const server = Date.parse(frame.server_time);
    if (!Number.isFinite(server) || rtt < 0) return;
    // NTP's idea: the sample with the shortest round trip has the least asymmetry in it.
    this.#offsetSamples.push({ rtt, offset: server - (frame.t + rtt / 2), at: back });
    this.#offsetSamples = this.#offsetSamples.filter((s) => back - s.at < 10 * 60_000).slice(-16);
    const best = this.#offsetSamples.reduce((a, b) => (b.rtt < a.rtt ? b : a));
    this.offsetMs = best.offset;
    this.rttMs = best.rtt;
    this.emit("offset", { offsetMs: this.offsetMs, rttMs: this.rttMs });
  }

  #error(frame) {
    // Punches are sent with ref `p:<id>`: an error about one names it by `id` or by `ref`.
    const punchId = frame.id ?? (frame.ref?.startsWith("p:") ? frame.ref.slice(2) : null);
    if (punchId && frame.code === "bad_frame") {
      // The hub cannot read it: resending it unchanged would fail the same way.
      this.#answered(punchId, { type: "ack", id: punchId, status: "rejected", reason: "bad_frame", message: frame.message });
    } else if (punchId) {
      const p = this.#queue.find((q) => q.id === punchId);
      if (p) {
        // Not stored (unavailable, rate_limited, internal): keep it and send it again later.
        p.sentAt = null;
        p.retryAt = this.now() + this.#options.retryAfterMs;
        this.#pumpLater(this.#options.retryAfterMs);
      }
    }
    if (frame.ref && this.#pending.has(frame.ref)) {
      const { reject } = this.#pending.get(frame.ref);
      this.#pending.delete(frame.ref);
      reject(Object.assign(new Error(frame.message), { code: frame.code, frame }));
    }
    if (frame.ref && frame.ref.startsWith("sub:")) {
      const sub = this.#subs.get(frame.ref.slice(4).split("#")[0]);
      sub?.emit("error", frame);
    }
    if (frame.code === "bad_token" || frame.code === "token_expired" || frame.code === "token_revoked") {
      this.tokenError = frame.code;
    }
    this.emit("error", frame);
  }

  #ack(frame) {
    if (frame.channel === "me") {
      this.#subs.get("me")?.emit("ack", frame);
      return;
    }
    this.#answered(frame.id, frame);
  }

  #answered(id, frame) {
    const index = this.#queue.findIndex((q) => q.id === id);
    if (index < 0) return; // answered already (a resend's second answer)
    const [entry] = this.#queue.splice(index, 1);
    const punch = { id: entry.id, frame: entry.frame, created: entry.created };
    // Forget it only once the store has; a crash before then resends it (a duplicate).
    this.#store.delete(entry.id).then(
      () => this.emit(frame.status === "rejected" ? "rejected" : "ack", frame, punch),
      (err) => this.emit("store_error", err),
    );
    this.#pump();
  }

  #subscribed(frame) {
    const sub = this.#subs.get(frame.channel);
    if (!sub) return;
    if (frame.recovered) {
      sub.resyncing = false;
      sub.ready = true;
      this.emit("recovered", frame);
    }
    // Not recovered: the snapshot that follows sets the members and version.
  }

  #sendSubscribe(sub) {
    const frame = { type: "subscribe", channel: sub.channel, ref: `sub:${sub.channel}#${++this.#refs}` };
    if (sub.version !== null) frame.since = sub.version;
    this.#send(frame);
  }

  #request(frame) {
    const ref = this.#ref();
    return new Promise((resolve, reject) => {
      this.#pending.set(ref, { resolve, reject });
      if (!this.#send({ ...frame, ref })) {
        this.#pending.delete(ref);
        reject(new Error("not connected"));
      }
    });
  }

  #answer(frame) {
    const pending = frame.ref && this.#pending.get(frame.ref);
    if (!pending) return;
    this.#pending.delete(frame.ref);
    pending.resolve(frame);
  }

  #settlePending(error) {
    for (const { reject } of this.#pending.values()) reject(error);
    this.#pending.clear();
  }

  #ref() {
    return `r${++this.#refs}`;
  }

  #send(frame) {
    if (this.#state !== CONNECTED) return false;
    return this.#sendRaw(frame);
  }

  #sendRaw(frame) {
    const socket = this.#socket;
    if (!socket || socket.readyState !== 1) return false;
    socket.send(JSON.stringify(frame));
    return true;
  }

  // -- the queue --------------------------------------------------------------------------

  /** Sends queued punches in order, within the window and the rate. */
  #pump() {
    if (this.#state !== CONNECTED) return;
    const now = this.now();
    this.#sentTimes = this.#sentTimes.filter((t) => now - t < 1000);
    let inFlight = this.#queue.filter((p) => p.sentAt !== null).length;
    let wait = null;
    for (const p of this.#queue) {
      if (p.sentAt !== null) continue;
      if (inFlight >= this.#options.window) break;
      if (p.retryAt > now) {
        wait = Math.min(wait ?? Infinity, p.retryAt - now);
        continue;
      }
      if (this.#sentTimes.length >= this.#options.sendPerSecond) {
        wait = Math.min(wait ?? Infinity, 1000 - (now - this.#sentTimes[0]) + 1);
        break;
      }
      if (!this.#send({ ...p.frame, ref: `p:${p.id}` })) return;
      p.sentAt = now;
      inFlight += 1;
      this.#sentTimes.push(now);
    }
    if (wait !== null) this.#pumpLater(wait);
  }

  #pumpLater(ms) {
    if (this.#pumpTimer !== null) return;
    this.#pumpTimer = this.#timer(() => {
      this.#pumpTimer = null;
      this.#pump();
    }, ms);
  }

  // -- tokens -----------------------------------------------------------------------------

  #expiresWithinMs(token) {
    const exp = tokenClaims(token).exp;
    return typeof exp === "number" ? exp * 1000 - this.serverNow() : Infinity;
  }

  #scheduleRefresh() {
    this.#clear(this.#refreshTimer);
    this.#refreshTimer = null;
    if (!this.#options.getToken || !this.token) return;
    const left = this.#expiresWithinMs(this.token);
    if (left === Infinity) return;
    const ms = Math.max(1000, left - this.#options.refreshBeforeS * 1000);
    this.#refreshTimer = this.#timer(async () => {
      this.#refreshTimer = null;
      try {
        const expiresAt = await this.refresh();
        this.emit("refreshed", { expiresAt });
      } catch (err) {
        this.emit("refresh_error", err);
        this.#refreshTimer = this.#timer(() => this.#scheduleRefresh(), 5_000);
      }
    }, Math.min(ms, 2 ** 31 - 1));
  }

  // -- timers -----------------------------------------------------------------------------

  #timer(fn, ms) {
    const id = setTimeout(() => {
      this.#timers.delete(id);
      fn();
    }, ms);
    this.#timers.add(id);
    return id;
  }

  #clear(id) {
    if (id === null) return;
    clearTimeout(id);
    clearInterval(id);
    this.#timers.delete(id);
  }

  #clearSessionTimers() {
    for (const id of [this.#pingTimer, this.#helloTimer, this.#pumpTimer, this.#refreshTimer]) this.#clear(id);
    this.#pingTimer = this.#helloTimer = this.#pumpTimer = this.#refreshTimer = null;
  }

  #clearTimers() {
    for (const id of this.#timers) {
      clearTimeout(id);
      clearInterval(id);
    }
    this.#timers.clear();
    this.#pingTimer = this.#helloTimer = this.#pumpTimer = this.#refreshTimer = this.#reconnectTimer = null;
  }
}
