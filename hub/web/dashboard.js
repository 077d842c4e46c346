// The supervisor's dashboard: sign in with a token, pick a site, then watch its floor,
// terminals and alerts live over one WebSocket (presence:, terminals: and alerts:<site>).

import { AttendanceClient, CONNECTED, DISCONNECTED, MemoryStore, tokenClaims } from "/js/index.js";
import { cleanToken, duration, el, keep, showConnection, showOnly, showSignIn, socketUrl, storedToken } from "./common.js";

const TOKEN_KEY = "attendance-hub.dashboard.token";
// The chosen site as {id, name, timezone, choices}: a reload opens the board at once,
// even while the hub is down, and catches up when it answers.
const SITE_KEY = "attendance-hub.dashboard.site";
const SECTIONS = ["sign-in", "pick-site", "board"];

const $ = (id) => document.getElementById(id);

const KINDS = {
  buddy_punch: "Buddy punch",
  geofence: "Outside the site",
  impossible_travel: "Impossible travel",
  clock_skew: "Clock skew",
  rapid_repeat: "Rapid repeat",
  unusual_time: "Unusual time",
  overtime_approaching: "Overtime approaching",
  overtime: "Overtime",
  meal_break: "Meal break",
  rest_period: "Rest period",
  missing_clock_out: "Missing clock-out",
  late: "Late",
};
const SEVERITIES = { critical: "Critical", warning: "Warning", info: "Info" };
const TOKEN_ERRORS = {
  token_expired: "Your token has expired",
  token_revoked: "Your token was revoked",
  bad_token: "The hub does not accept this token",
};

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

async function api(token, path) {
  let response;
  try {
    response = await fetch(path, { headers: { authorization: `Bearer ${token}` }, cache: "no-store" });
  } catch {
    throw new ApiError(0, "unreachable", "The hub cannot be reached.");
  }
  const body = await response.json().catch(() => null);
  if (!response.ok) {
    const error = body?.error ?? {};
    throw new ApiError(response.status, error.code ?? "error", error.message ?? `HTTP ${response.status}`);
  }
  return body;
}

/** Why a token cannot open the dashboard, for the person who pasted it. */
function refusal(err, token) {
  if (err.status === 401) return `The hub refused this token: ${err.message}`;
  if (err.status === 403) {
    const role = tokenClaims(token).role;
    const what = typeof role === "string" ? `A ${role} token` : "This token";
    return `${what} cannot open the dashboard: paste a supervisor or admin token.`;
  }
  if (err.status === 0) return "The hub cannot be reached: check the network and try again.";
  return err.message;
}

const NO_SITE = "This token covers no site. Ask an admin for a supervisor token that lists your sites.";

function savedSite() {
  try {
    const site = JSON.parse(storedToken(SITE_KEY) ?? "null");
    return site && typeof site.id === "string" ? site : null;
  } catch {
    return null;
  }
}

/** A formatter in `timeZone`, or in the browser's own if the name is unknown to it. */
function formatter(timeZone, options) {
  try {
    return new Intl.DateTimeFormat(undefined, { ...options, timeZone });
  } catch {
    return new Intl.DateTimeFormat(undefined, options);
  }
}

/** One site's live board: a client of its own, closed when the board goes. */
class Board {
  constructor(token, site) {
    this.site = site;
    this.names = new Map(); // employee id -> name, for alerts about people not on the floor
    this.client = new AttendanceClient({ url: socketUrl(), token, store: new MemoryStore(), client: "dashboard" });
    this.setZone(site.timezone);
    this.stops = [showConnection(this.client, $("connection"))];
    this.presence = this.client.subscribe(`presence:${site.id}`);
    this.terminals = this.client.subscribe(`terminals:${site.id}`);
    this.alerts = this.client.subscribe(`alerts:${site.id}`);
    this.fresh = new Set(); // alerts that arrived while watching, highlighted for a while
    this.live = false;
    this.lastLive = null;
    for (const sub of [this.presence, this.terminals, this.alerts]) {
      this.stops.push(sub.on("snapshot", () => this.render()));
      this.stops.push(sub.on("change", () => this.render()));
      this.stops.push(sub.on("error", (frame) => this.problem(frame.message)));
    }
    this.stops.push(
      this.alerts.on("alert", (frame) => {
        this.fresh.add(frame.id);
        setTimeout(() => this.fresh.delete(frame.id), 10_000);
      }),
    );
    this.stops.push(this.client.on("state", (change) => this.connection(change)));
    // Durations ("for 12 min") and the clock move on even when nothing happens.
    this.ticking = setInterval(() => this.tick(), 15_000);
    $("title").textContent = site.name || site.id;
    this.problem(null);
    this.render();
    this.tick();
    this.client.connect();
    this.loadNames(token);
  }

  setZone(timeZone) {
    this.time = formatter(timeZone, { hour: "2-digit", minute: "2-digit" });
    this.dayTime = formatter(timeZone, { weekday: "short", hour: "2-digit", minute: "2-digit" });
    this.clock = formatter(timeZone, { hour: "2-digit", minute: "2-digit", timeZoneName: "short" });
    this.day = formatter(timeZone, { year: "numeric", month: "2-digit", day: "2-digit" });
  }

  /** Name, time zone or the number of sites changed: shown from now on. */
  update(site) {
    this.site = site;
    $("title").textContent = site.name || site.id;
    this.setZone(site.timezone);
    this.render();
    this.tick();
  }

  async loadNames(token) {
    try {
      const { employees } = await api(token, "/v1/employees");
      for (const employee of employees) this.names.set(employee.id, employee.name);
      this.render();
    } catch {
      // Alerts then name people by id until the floor shows them.
    }
  }

  close() {
    clearInterval(this.ticking);
    for (const stop of this.stops) stop();
    this.client.close();
  }

  problem(message) {
    const node = $("board-problem");
    node.hidden = !message;
    node.textContent = message ?? "";
  }

  connection({ state, reason }) {
    // Stale only once it has been live: before that there is nothing old to warn about.
    if (state === CONNECTED) this.lastLive = null;
    else if (this.live) this.lastLive = Date.now();
    this.live = state === CONNECTED;
    if (state === DISCONNECTED && reason === "auth") {
      const code = this.client.tokenError ?? "bad_token";
      signOut(`${TOKEN_ERRORS[code] ?? "The hub refused the token"} (${code}). Paste a new one.`);
      return;
    }
    this.tick();
  }

  /** A time in the site's zone: "08:02", or with the weekday when it is not today. */
  when(iso) {
    const date = new Date(iso);
    if (Number.isNaN(date.getTime())) return "";
    const today = this.day.format(new Date(this.client.serverNow()));
    return this.day.format(date) === today ? this.time.format(date) : this.dayTime.format(date);
  }

  tick() {
    const now = this.client.serverNow();
    $("clock").textContent = this.clock.format(new Date(now));
    const stale = this.client.state !== CONNECTED && this.lastLive !== null;
    $("board").classList.toggle("stale", stale);
    $("stale").hidden = !stale;
    if (stale) {
      const since = this.time.format(new Date(this.lastLive + this.client.offsetMs));
      $("stale").textContent = `Not live since ${since}: this is what was known then. It updates once reconnected.`;
    }
    this.renderPeople(now);
  }

  render() {
    const now = this.client.serverNow();
    this.renderPeople(now);
    this.renderTerminals();
    this.renderAlerts();
  }

  renderPeople(now) {
    const order = { late: 0, break: 1, in: 2 };
    const people = [...this.presence.members.values()].map((m) => ({ ...m, shown: m.late ? "late" : m.state }));
    for (const person of people) this.names.set(person.employee, person.name);
    people.sort((a, b) => order[a.shown] - order[b.shown] || a.name.localeCompare(b.name));
    const labels = { in: "In", break: "On break", late: "Late" };
    $("people").replaceChildren(
      ...people.map((p) =>
        el(
          "tr",
          { "data-employee": p.employee, "data-state": p.shown },
          el("td", { class: "name" }, p.name),
          el("td", {}, el("span", { class: `state ${p.shown}` }, labels[p.shown] ?? p.state)),
          el(
            "td",
            { class: "since" },
            el("time", { dateTime: p.since }, this.when(p.since)),
            el("span", { class: "ago" }, p.shown === "late" ? `shift start, ${duration(Date.parse(p.since), now)} ago` : `for ${duration(Date.parse(p.since), now)}`),
          ),
        ),
      ),
    );
    $("people-empty").hidden = people.length > 0 || !this.presence.ready;
    const count = (shown) => people.filter((p) => p.shown === shown).length;
    $("count-in").textContent = String(count("in"));
    $("count-break").textContent = String(count("break"));
    $("count-late").textContent = String(count("late"));
  }

  renderTerminals() {
    const terminals = [...this.terminals.members.values()].sort((a, b) => a.name.localeCompare(b.name));
    $("terminals").replaceChildren(
      ...terminals.map((t) =>
        el(
          "li",
          { "data-device": t.device, "data-online": t.online ? "true" : "false" },
          el("span", { class: "dot", "aria-hidden": "true" }),
          el("span", { class: "name" }, t.name),
          el("span", { class: "ago" }, `${t.online ? "online" : "offline"} since `, el("time", { dateTime: t.since }, this.when(t.since))),
        ),
      ),
    );
    $("terminals-empty").hidden = terminals.length > 0 || !this.terminals.ready;
    const online = terminals.filter((t) => t.online).length;
    $("count-terminals").textContent = `${online} / ${terminals.length}`;
  }

  renderAlerts() {
    // Kept in the order the hub sent them (oldest first): newest first on screen.
    const alerts = [...this.alerts.members.values()].reverse();
    $("alerts").replaceChildren(
      ...alerts.map((a) =>
        el(
          "li",
          { "data-alert": a.id, "data-kind": a.kind, "data-severity": a.severity, class: this.fresh.has(a.id) ? "fresh" : "" },
          el(
            "div",
            { class: "alert-head" },
            el("time", { dateTime: a.at }, this.when(a.at)),
            el("span", { class: `severity ${a.severity}` }, SEVERITIES[a.severity] ?? a.severity),
            el("strong", { class: "kind" }, KINDS[a.kind] ?? a.kind.replaceAll("_", " ")),
            a.employee ? el("span", { class: "employee" }, this.names.get(a.employee) ?? a.employee) : null,
          ),
          el("p", { class: "message" }, a.message),
        ),
      ),
    );
    $("alerts-empty").hidden = alerts.length > 0 || !this.alerts.ready;
  }
}

let board = null;

function closeBoard() {
  board?.close();
  board = null;
}

function signOut(message = "") {
  closeBoard();
  keep(TOKEN_KEY, null);
  keep(SITE_KEY, null);
  $("sign-out").hidden = true;
  $("change-site").hidden = true;
  showSignIn(SECTIONS, "Floor", message);
}

function openBoard(token, site) {
  closeBoard();
  $("sign-out").hidden = false;
  $("change-site").hidden = !(site.choices > 1);
  showOnly(SECTIONS, "board");
  board = new Board(token, site);
}

function pick(token, site, choices) {
  const chosen = { id: site.id, name: site.name, timezone: site.timezone, choices };
  keep(SITE_KEY, JSON.stringify(chosen));
  openBoard(token, chosen);
}

/** The sites this token may watch: opens the only one, or the one chosen before, or asks. */
function offer(token, sites, { ask = false } = {}) {
  const before = savedSite();
  const again = sites.find((s) => s.id === before?.id);
  if (sites.length === 1 || (again && !ask)) {
    pick(token, again ?? sites[0], sites.length);
    return;
  }
  $("site-list").replaceChildren(
    ...sites.map((site) =>
      el(
        "li",
        {},
        el(
          "button",
          { type: "button", "data-site": site.id, onclick: () => pick(token, site, sites.length) },
          el("span", { class: "name" }, site.name || site.id),
          el("span", { class: "ago" }, `${site.id} · ${site.timezone}`),
        ),
      ),
    ),
  );
  $("sign-out").hidden = false;
  $("change-site").hidden = true;
  $("title").textContent = "Floor";
  showOnly(SECTIONS, "pick-site");
}

async function chooseSite(token, options) {
  let sites;
  try {
    ({ sites } = await api(token, "/v1/sites"));
  } catch (err) {
    signOut(refusal(err, token));
    return;
  }
  if (sites.length === 0) signOut(NO_SITE);
  else offer(token, sites, options);
}

/** With a saved site the board is already open: bring its name and zone up to date. */
async function recheck(token, site) {
  let sites;
  try {
    ({ sites } = await api(token, "/v1/sites"));
  } catch (err) {
    if (err.status === 401 || err.status === 403) signOut(refusal(err, token));
    return; // unreachable: the board shows the connection and catches up by itself
  }
  const current = sites.find((s) => s.id === site.id);
  if (!current) {
    if (sites.length === 0) signOut(NO_SITE);
    else offer(token, sites, { ask: true });
    return;
  }
  const chosen = { id: current.id, name: current.name, timezone: current.timezone, choices: sites.length };
  keep(SITE_KEY, JSON.stringify(chosen));
  $("change-site").hidden = !(sites.length > 1);
  board?.update(chosen);
}

$("sign-in-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const token = cleanToken($("token").value);
  const button = event.target.querySelector("button");
  if (!token) return;
  $("sign-in-error").textContent = "";
  button.disabled = true;
  try {
    const { sites } = await api(token, "/v1/sites");
    if (sites.length === 0) {
      $("sign-in-error").textContent = NO_SITE;
      return;
    }
    keep(TOKEN_KEY, token);
    $("token").value = "";
    offer(token, sites);
  } catch (err) {
    $("sign-in-error").textContent = refusal(err, token);
  } finally {
    button.disabled = false;
  }
});

$("sign-out").addEventListener("click", () => signOut());

$("change-site").addEventListener("click", () => {
  const token = storedToken(TOKEN_KEY);
  closeBoard();
  if (token) chooseSite(token, { ask: true });
});

const token = storedToken(TOKEN_KEY);
const site = savedSite();
if (!token) signOut();
else if (site) {
  openBoard(token, site);
  recheck(token, site);
} else chooseSite(token);
