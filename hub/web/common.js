// What the dashboard and the kiosk share: the hub's address, elements built without
// innerHTML (names and messages come from the hub and are never parsed as HTML), the
// connection badge, and the token kept in localStorage.

import { CONNECTED, CONNECTING, DISCONNECTED } from "/js/index.js";

/** The hub's WebSocket on the page's own host: wss: under https:, ws: under http:. */
export function socketUrl(location = globalThis.location) {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  return `${scheme}//${location.host}/v1/ws`;
}

/** An element with attributes and children; strings become text nodes. */
export function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (value === undefined || value === null || value === false) continue;
    if (name === "class") node.className = value;
    else if (name.startsWith("data-")) node.setAttribute(name, String(value));
    else if (name in node) node[name] = value;
    else node.setAttribute(name, String(value));
  }
  node.append(...children.flat().filter((c) => c !== null && c !== undefined && c !== false));
  return node;
}

/** A token as pasted: without surrounding blanks or a leading "Bearer ". */
export function cleanToken(text) {
  return String(text).trim().replace(/^bearer\s+/i, "").replace(/\s+/g, "");
}

/** The token kept under `key`, or null; reading never throws (private mode, quota). */
export function storedToken(key) {
  try {
    return localStorage.getItem(key);
  } catch {
    return null;
  }
}

export function keep(key, value) {
  try {
    if (value === null || value === undefined) localStorage.removeItem(key);
    else localStorage.setItem(key, value);
  } catch {
    // Not kept: the page still works until it is reloaded.
  }
}

/** Why the connection is down, in words; the code stays visible for whoever debugs it. */
const REASONS = {
  connect: "starting",
  retry: "trying again",
  unreachable: "the hub cannot be reached",
  closed: "the connection closed",
  dead: "the hub stopped answering",
  offline: "this device has no network",
  online: "the network is back",
  hello_timeout: "the hub did not answer the sign-in",
  drain: "the hub is restarting",
  restart: "the hub is restarting",
  try_later: "the hub is busy",
  frame_too_large: "a message was too large",
  hello: "the sign-in was too slow",
  flood: "too many messages were sent",
  slow_consumer: "this screen fell behind",
  auth: "the token was refused",
  closed_by_client: "signed out",
};

export function reasonText(reason) {
  return REASONS[reason] ?? reason ?? "";
}

/**
 * Keeps `badge` showing the client's connection state and why it last changed, with a
 * countdown to the next attempt while disconnected. Returns a function that stops it.
 */
export function showConnection(client, badge) {
  let retryAt = null;
  let last = { state: client.state, reason: client.lastReason };
  const render = () => {
    const { state, reason } = last;
    badge.dataset.state = state;
    badge.dataset.reason = reason ?? "";
    let text;
    if (state === CONNECTED) text = "Connected";
    else if (state === CONNECTING) text = "Connecting…";
    else {
      text = `Disconnected: ${reasonText(reason)}`;
      if (retryAt !== null) {
        const seconds = Math.max(0, Math.ceil((retryAt - Date.now()) / 1000));
        text += seconds > 0 ? `; next try in ${seconds} s` : "; trying again";
      }
    }
    badge.replaceChildren(el("span", { class: "dot", "aria-hidden": "true" }), text);
    badge.title = reason ? `${state} (${reason})` : state;
  };
  const stop = client.on("state", (change) => {
    last = change;
    retryAt = typeof change.retryInMs === "number" ? Date.now() + change.retryInMs : null;
    render();
  });
  const ticking = setInterval(() => {
    if (last.state !== CONNECTED && retryAt !== null) render();
  }, 1000);
  render();
  return () => {
    stop();
    clearInterval(ticking);
  };
}

/** Shows one of several sections (by id) and hides the others. */
export function showOnly(ids, visible) {
  for (const id of ids) document.getElementById(id).hidden = id !== visible;
}

/** The sign-in form, under `title`, saying `message` (why, when the hub signed the page out). */
export function showSignIn(sections, title, message) {
  const $ = (id) => document.getElementById(id);
  $("title").textContent = title;
  $("clock").textContent = "";
  const badge = $("connection");
  badge.dataset.state = DISCONNECTED;
  badge.dataset.reason = "";
  badge.textContent = "Not signed in";
  $("sign-in-error").textContent = message;
  showOnly(sections, "sign-in");
  $("token").focus();
}

/** "1 h 5 min", "12 min", "under a minute": how long since `ms` (epoch ms) at `now`. */
export function duration(ms, now) {
  const minutes = Math.floor((now - ms) / 60_000);
  if (minutes < 1) return "under a minute";
  if (minutes < 60) return `${minutes} min`;
  const hours = Math.floor(minutes / 60);
  const rest = minutes % 60;
  return rest ? `${hours} h ${rest} min` : `${hours} h`;
}
