// The kiosk at the door: a badge or an employee id, then in / out / break start / break end.
// Punches are written to IndexedDB before they are sent and stay there until the hub answers,
// so a reload, a crash or a hub that is down loses none of them.

import { AttendanceClient, CONNECTED, DISCONNECTED, IndexedDBStore, tokenClaims } from "/js/index.js";
import { cleanToken, el, keep, showConnection, showOnly, showSignIn, socketUrl, storedToken } from "./common.js";

const TOKEN_KEY = "attendance-hub.kiosk.token";
const IDENTIFY_KEY = "attendance-hub.kiosk.identify";
const SECTIONS = ["sign-in", "punching"];
// A result stays up this long, so that the next person does not read the last one's name.
const RESULT_MS = 8_000;
const RECENT = 10;
const EMPLOYEE_ID = /^[A-Za-z0-9._-]{1,64}$/;

const $ = (id) => document.getElementById(id);

const KINDS = { in: "In", out: "Out", break_start: "Break start", break_end: "Break end" };
// The floor state each kind leads to: how a presence change is matched to the punch behind it.
const STATE_AFTER = { in: "in", break_end: "in", break_start: "break", out: "out" };
const REJECTIONS = {
  unknown_employee: "nobody has this badge or employee ID",
  forbidden: "this kiosk may not punch for this person",
  invalid_time: "this tablet's clock is ahead of the hub's; ask for it to be set right",
  id_conflict: "another punch already has this punch's id",
  geofence: "the punch is outside the site",
  invalid: "the hub could not store it",
};
const TOKEN_ERRORS = {
  token_expired: "This kiosk's token has expired",
  token_revoked: "This kiosk's token was revoked",
  bad_token: "The hub does not accept this kiosk's token",
};

const clockFormat = new Intl.DateTimeFormat(undefined, { hour: "2-digit", minute: "2-digit" });
const timeFormat = new Intl.DateTimeFormat(undefined, { hour: "2-digit", minute: "2-digit", second: "2-digit" });

/** Why a pasted token cannot drive the kiosk, or null. */
function tokenProblem(token) {
  const claims = tokenClaims(token);
  if (typeof claims.role !== "string") return "This is not a token: paste the whole terminal token.";
  if (claims.role !== "terminal") return `This is a ${claims.role} token: the kiosk needs a terminal token.`;
  if (typeof claims.site !== "string" || typeof claims.tenant !== "string" || typeof claims.sub !== "string") {
    return "This terminal token names no site.";
  }
  if (typeof claims.exp === "number" && claims.exp * 1000 < Date.now()) return "This token has expired: ask an admin for a new one.";
  return null;
}

function identifying() {
  return document.querySelector('input[name="identify"]:checked').value;
}

function showIdentify(mode) {
  $("who-label").textContent = mode === "badge" ? "Scan or type your badge" : "Type your employee ID";
  $("who").placeholder = mode === "badge" ? "Badge" : "Employee ID";
}

/** One door's kiosk: a client whose queue lives in IndexedDB under the device's name. */
class Kiosk {
  constructor(token) {
    this.claims = tokenClaims(token);
    const { tenant, sub, site } = this.claims;
    // One database per device: punches made under one door's token are sent under it.
    this.client = new AttendanceClient({
      url: socketUrl(),
      token,
      store: new IndexedDBStore(`attendance-hub-kiosk:${tenant}:${sub}`),
      client: "kiosk",
    });
    // The floor of this site, held in memory only: it gives the names behind punches.
    this.floor = this.client.subscribe(`presence:${site}`);
    this.entries = new Map(); // punch id -> {id, frame, created, status, reason, name}
    this.names = new Map(); // employee id -> name
    this.badges = new Map(); // badge -> {employee, name}, as the floor showed them
    this.latest = null;
    this.hideTimer = null;
    this.renderTimer = null;
    this.stops = [showConnection(this.client, $("connection"))];
    const on = (emitter, event, handler) => this.stops.push(emitter.on(event, handler));
    on(this.client, "queued", (punch) => this.queued(punch));
    on(this.client, "ack", (frame, punch) => this.answered(frame, punch));
    on(this.client, "rejected", (frame, punch) => this.answered(frame, punch));
    on(this.client, "state", (change) => this.connection(change));
    on(this.client, "store_error", (err) => this.problem(`This tablet could not update its saved punches: ${err}`));
    on(this.floor, "snapshot", (members) => this.learn([...members.values()]));
    on(this.floor, "change", (changes) => this.learn(changes));
    $("device").textContent = `${sub} at ${site} (${tenant})`;
    $("title").textContent = `Clock in · ${site}`;
    this.ticking = setInterval(() => this.tick(), 1000);
    this.tick();
    this.client.loaded.then(
      () => {
        for (const punch of this.client.pending()) this.remember(punch, "pending");
        this.render();
      },
      (err) => this.problem(`This tablet cannot keep punches (IndexedDB: ${err}); punches made now may be lost.`),
    );
    this.client.connect();
    this.render();
  }

  close() {
    clearInterval(this.ticking);
    clearTimeout(this.hideTimer);
    clearTimeout(this.renderTimer);
    for (const stop of this.stops) stop();
    this.client.close();
  }

  tick() {
    $("clock").textContent = clockFormat.format(new Date(this.client.serverNow()));
  }

  problem(message) {
    $("who-problem").textContent = message ?? "";
  }

  connection({ state, reason }) {
    if (state === DISCONNECTED && reason === "auth") {
      const code = this.client.tokenError ?? "bad_token";
      const waiting = this.client.pending().length;
      let message = `${TOKEN_ERRORS[code] ?? "The hub refused this kiosk's token"} (${code}). Paste a new terminal token for this door.`;
      if (waiting) message += ` The ${waiting} punches waiting on this tablet are sent once it is accepted.`;
      signOut(message);
      return;
    }
    this.render();
  }

  async punch(kind) {
    const mode = identifying();
    const value = $("who").value.trim();
    if (!value) {
      this.problem(mode === "badge" ? "Scan your badge first." : "Type your employee ID first.");
      $("who").focus();
      return;
    }
    if (mode === "employee" && !EMPLOYEE_ID.test(value)) {
      this.problem("An employee ID is 1 to 64 letters, digits, dots, dashes or underscores.");
      $("who").focus();
      return;
    }
    this.problem(null);
    $("who").value = "";
    $("who").focus();
    // A badge was presented; an employee id was only typed, which proves nothing: no method.
    const fields = mode === "badge" ? { badge: value, kind, method: "badge" } : { employee: value, kind };
    try {
      await this.client.punch(fields);
    } catch (err) {
      this.problem(`The punch could not be saved on this tablet: ${err.message ?? err}`);
    }
  }

  remember(punch, status) {
    const entry = { id: punch.id, frame: punch.frame, created: punch.created, status, reason: null, name: null };
    entry.name = this.nameOf(entry.frame);
    this.entries.set(punch.id, entry);
    return entry;
  }

  nameOf(frame) {
    if (frame.employee !== undefined) return this.names.get(frame.employee) ?? null;
    return this.badges.get(frame.badge)?.name ?? null;
  }

  queued(punch) {
    const entry = this.remember(punch, "pending");
    this.show(entry);
    this.render();
  }

  answered(frame, punch) {
    const entry = this.entries.get(punch.id) ?? this.remember(punch, "pending");
    entry.status = frame.status;
    entry.reason = frame.reason ?? null;
    entry.answered = Date.now();
    entry.name ??= this.nameOf(entry.frame);
    if (this.latest === entry.id) this.show(entry);
    this.render();
  }

  /** Names from the floor; a change whose `since` is a punch's `at` names that punch. */
  learn(members) {
    for (const member of members) {
      this.names.set(member.employee, member.name);
      if (member.late) continue;
      const at = Date.parse(member.since);
      for (const entry of this.entries.values()) {
        const { frame } = entry;
        if (Date.parse(frame.at) !== at || STATE_AFTER[frame.kind] !== member.state) continue;
        if (frame.employee !== undefined && frame.employee !== member.employee) continue;
        entry.name = member.name;
        if (frame.badge !== undefined) this.badges.set(frame.badge, { employee: member.employee, name: member.name });
      }
    }
    if (this.latest && this.entries.has(this.latest)) this.show(this.entries.get(this.latest));
    this.render();
  }

  who(entry) {
    const { frame } = entry;
    const id = frame.badge !== undefined ? `badge ${frame.badge}` : `employee ${frame.employee}`;
    return entry.name ? `${entry.name} (${id})` : id.charAt(0).toUpperCase() + id.slice(1);
  }

  /** The big line under the buttons: the latest punch and what became of it. */
  show(entry) {
    this.latest = entry.id;
    const result = $("result");
    const kind = KINDS[entry.frame.kind] ?? entry.frame.kind;
    const time = timeFormat.format(new Date(entry.frame.at));
    let head;
    let detail;
    if (entry.status === "accepted") {
      head = `${entry.name ?? this.who(entry)}: ${kind}`;
      detail = `Recorded at ${time}.`;
    } else if (entry.status === "duplicate") {
      head = `${entry.name ?? this.who(entry)}: ${kind}`;
      detail = `Already recorded (${time}).`;
    } else if (entry.status === "rejected") {
      head = `Not recorded: ${REJECTIONS[entry.reason] ?? entry.reason ?? "refused"}`;
      detail = `${this.who(entry)}, ${kind}, ${time}.`;
    } else if (this.client.state === CONNECTED) {
      head = `Sending: ${this.who(entry)}, ${kind}`;
      detail = "";
    } else {
      head = `Saved on this tablet: ${this.who(entry)}, ${kind}`;
      detail = "The hub cannot be reached; the punch is sent as soon as it can.";
    }
    result.dataset.status = entry.status;
    result.dataset.id = entry.id;
    result.replaceChildren(el("strong", {}, head), detail ? el("span", {}, detail) : null);
    result.hidden = false;
    clearTimeout(this.hideTimer);
    this.hideTimer = setTimeout(() => {
      result.hidden = true;
      result.replaceChildren();
      result.dataset.status = "";
      this.latest = null;
    }, RESULT_MS);
  }

  /** Lists are redrawn at most every 100 ms: a queue of hundreds drains without redrawing each time. */
  render() {
    if (this.renderTimer !== null) return;
    this.renderTimer = setTimeout(() => {
      this.renderTimer = null;
      this.draw();
    }, 100);
  }

  draw() {
    const pending = this.client.pending();
    const connected = this.client.state === CONNECTED;
    $("pending").replaceChildren(
      ...pending.map((punch) => {
        const entry = this.entries.get(punch.id) ?? this.remember(punch, "pending");
        return el(
          "li",
          { "data-id": punch.id, "data-status": "pending" },
          el("span", { class: "person" }, this.who(entry)),
          el("span", { class: `kind-label ${punch.frame.kind}` }, KINDS[punch.frame.kind] ?? punch.frame.kind),
          el("time", { dateTime: punch.frame.at }, timeFormat.format(new Date(punch.frame.at))),
          el("span", { class: "note" }, connected ? "sending" : "saved here"),
        );
      }),
    );
    $("pending-count").textContent = String(pending.length);
    $("pending-empty").hidden = pending.length > 0;
    const answered = [...this.entries.values()]
      .filter((entry) => entry.status !== "pending")
      .sort((a, b) => b.answered - a.answered)
      .slice(0, RECENT);
    $("recent").replaceChildren(
      ...answered.map((entry) =>
        el(
          "li",
          { "data-id": entry.id, "data-status": entry.status },
          el("span", { class: "person" }, this.who(entry)),
          el("span", { class: `kind-label ${entry.frame.kind}` }, KINDS[entry.frame.kind] ?? entry.frame.kind),
          el("time", { dateTime: entry.frame.at }, timeFormat.format(new Date(entry.frame.at))),
          el(
            "span",
            { class: `note ${entry.status}` },
            entry.status === "rejected" ? `not recorded: ${REJECTIONS[entry.reason] ?? entry.reason}` : entry.status === "duplicate" ? "already recorded" : "recorded",
          ),
        ),
      ),
    );
    $("recent-empty").hidden = answered.length > 0;
    // Forget answered punches beyond what the list shows.
    for (const entry of [...this.entries.values()].filter((e) => e.status !== "pending" && !answered.includes(e))) {
      this.entries.delete(entry.id);
    }
    // Signing out with punches still queued would strand them: not until they have gone.
    $("sign-out").disabled = pending.length > 0;
    $("sign-out-note").textContent = pending.length > 0 ? "Sign out is possible once every punch has been sent." : "";
  }
}

let kiosk = null;

function signOut(message = "") {
  kiosk?.close();
  kiosk = null;
  keep(TOKEN_KEY, null);
  showSignIn(SECTIONS, "Clock in", message);
}

function start(token) {
  kiosk?.close();
  showOnly(SECTIONS, "punching");
  kiosk = new Kiosk(token);
  $("who").focus();
}

$("sign-in-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const token = cleanToken($("token").value);
  const problem = tokenProblem(token);
  if (problem) {
    $("sign-in-error").textContent = problem;
    return;
  }
  keep(TOKEN_KEY, token);
  $("token").value = "";
  $("sign-in-error").textContent = "";
  start(token);
});

// Enter (a badge reader ends with it) does not choose a kind: the buttons do.
$("punch-form").addEventListener("submit", (event) => event.preventDefault());

for (const button of document.querySelectorAll("button[data-kind]")) {
  button.addEventListener("click", () => kiosk?.punch(button.dataset.kind));
}

for (const radio of document.querySelectorAll('input[name="identify"]')) {
  radio.addEventListener("change", () => {
    keep(IDENTIFY_KEY, identifying());
    showIdentify(identifying());
    $("who").focus();
  });
}

$("sign-out").addEventListener("click", () => {
  if (confirm("Sign this kiosk out? Punching stops until a terminal token is pasted again.")) signOut();
});

/** Lets the page open again while the hub is down (see kiosk-worker.js), where browsers allow it. */
async function workOffline() {
  const note = $("offline-ready");
  if (!("serviceWorker" in navigator)) {
    note.textContent = "Reloading this page needs the hub (offline reloads need https).";
    return;
  }
  try {
    await navigator.serviceWorker.register("/kiosk-worker.js", { scope: "/kiosk" });
    await navigator.serviceWorker.ready;
    note.dataset.ready = "true";
    note.textContent = "This page also opens while the hub is down.";
  } catch (err) {
    note.textContent = `Reloading this page needs the hub (${err.message ?? err}).`;
  }
}

workOffline();

const remembered = storedToken(IDENTIFY_KEY);
if (remembered === "badge" || remembered === "employee") {
  document.querySelector(`input[name="identify"][value="${remembered}"]`).checked = true;
}
showIdentify(identifying());

const token = storedToken(TOKEN_KEY);
if (token && !tokenProblem(token)) start(token);
else signOut(token ? tokenProblem(token) : "");
