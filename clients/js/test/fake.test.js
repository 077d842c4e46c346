// The client against a small fake hub (a `ws` server), where a test must control timing:
// backoff bounds, a hub that goes silent, a gap in versions, the clock offset, the
// replay rate and window.
import assert from "node:assert/strict";
import { once } from "node:events";
import { afterEach, describe, test } from "node:test";
import WebSocket, { WebSocketServer } from "ws";

import { AttendanceClient, CONNECTED, MemoryStore, backoffDelay, uuid4 } from "../src/index.js";
import { until } from "./hub.js";

/** A fake hub: answers hello with welcome; `onFrame(frame, socket)` sees the rest. */
class FakeHub {
  constructor({ onFrame = () => {}, welcome = {}, answerPings = true, skewMs = 0, refuse = () => false } = {}) {
    this.frames = [];
    this.sockets = [];
    this.connections = 0;
    this.server = new WebSocketServer({ port: 0, host: "127.0.0.1" });
    this.server.on("connection", (socket, request) => {
      this.connections += 1;
      this.sockets.push(socket);
      this.protocol = request.headers["sec-websocket-protocol"];
      socket.on("message", (data) => {
        const frame = JSON.parse(String(data));
        this.frames.push({ frame, at: Date.now() });
        const send = (reply) => socket.send(JSON.stringify(reply));
        const serverTime = new Date(Date.now() + skewMs).toISOString();
        if (frame.type === "hello" && refuse(frame)) {
          send({ type: "error", code: "token_expired", message: "the token has expired" });
          socket.close(4001, "token_expired");
        } else if (frame.type === "hello") {
          send({ type: "welcome", session: uuid4(), server_time: serverTime, heartbeat_s: 30, role: "terminal", tenant: "t", sub: "door", ref: frame.ref, ...welcome });
        } else if (frame.type === "ping" && answerPings) {
          send({ type: "pong", t: frame.t, server_time: serverTime, ref: frame.ref });
        } else {
          onFrame(frame, send, socket);
        }
      });
    });
  }

  get url() {
    return `ws://127.0.0.1:${this.server.address().port}/v1/ws`;
  }

  sent(type) {
    return this.frames.filter((f) => f.frame.type === type);
  }

  async close() {
    for (const socket of this.sockets) socket.terminate();
    this.server.close();
    await once(this.server, "close");
  }
}

const open = [];
function client(options) {
  const made = new AttendanceClient({ WebSocket, token: "t.e.st", ...options });
  const states = [];
  made.on("state", (change) => states.push(change));
  made.states = states;
  open.push(made);
  return made;
}

const fakes = [];
async function fake(options) {
  const hub = new FakeHub(options);
  fakes.push(hub);
  await once(hub.server, "listening");
  return hub;
}

afterEach(async () => {
  for (const c of open.splice(0)) c.close();
  for (const hub of fakes.splice(0)) await hub.close();
});

describe("backoff", () => {
  test("full jitter: each delay lies between half the base and the doubling cap, up to 20 s", () => {
    for (let attempt = 0; attempt < 12; attempt += 1) {
      const cap = Math.min(20_000, 500 * 2 ** attempt);
      assert.equal(backoffDelay(attempt, 500, 20_000, () => 1), cap);
      assert.equal(backoffDelay(attempt, 500, 20_000, () => 0), 250);
      for (let n = 0; n < 200; n += 1) {
        const delay = backoffDelay(attempt);
        assert.ok(delay >= 250 && delay <= cap, `attempt ${attempt}: ${delay}`);
      }
    }
    // Jitter: a crowd of clients does not retry in step.
    const draws = Array.from({ length: 500 }, () => backoffDelay(6));
    assert.ok(Math.max(...draws) - Math.min(...draws) > 10_000);
  });

  test("reconnect attempts against a dead address wait the drawn delays, growing", async () => {
    const hub = await fake();
    const url = hub.url;
    await hub.close();
    fakes.length = 0;
    let draw = 0;
    const c = client({ url, backoffBaseMs: 50, backoffMaxMs: 400, random: () => [1, 1, 1, 1, 1, 0.5][draw++ % 6] });
    const started = Date.now();
    c.connect();
    await until(() => c.states.filter((s) => s.reason === "unreachable").length >= 6, 10_000, "six attempts");
    const waits = c.states.filter((s) => s.reason === "unreachable").map((s) => s.retryInMs);
    assert.deepEqual(waits.slice(0, 6), [50, 100, 200, 400, 400, 200]);
    // The attempts really waited: at least the sum of the first five delays.
    assert.ok(Date.now() - started >= 50 + 100 + 200 + 400 + 400);
    assert.ok(c.states.filter((s) => s.reason === "retry").length >= 5);
  });

  test("a welcome resets the backoff", async () => {
    const hub = await fake();
    const c = client({ url: hub.url, backoffBaseMs: 50, random: () => 1 });
    c.connect();
    await until(() => c.state === CONNECTED);
    hub.sockets[0].terminate();
    await until(() => hub.connections === 2 && c.state === CONNECTED);
    hub.sockets[1].terminate();
    await until(() => c.states.filter((s) => s.state === "disconnected").length === 2);
    assert.deepEqual(
      c.states.filter((s) => s.state === "disconnected").map((s) => s.retryInMs),
      [50, 50],
    );
  });
});

describe("liveness", () => {
  test("a hub that goes silent is detected and the client reconnects", async () => {
    const hub = await fake({ answerPings: false });
    const c = client({ url: hub.url, pingIntervalMs: 100, deadAfterMs: 300, backoffBaseMs: 50 });
    c.connect();
    await until(() => c.state === CONNECTED);
    const since = Date.now();
    await until(() => c.states.some((s) => s.reason === "dead"), 5_000, "dead");
    const noticed = Date.now() - since;
    assert.ok(noticed >= 250 && noticed < 2_000, `noticed after ${noticed} ms`);
    assert.ok(hub.sent("ping").length >= 2, "it pinged while waiting");
    await until(() => hub.connections >= 2, 5_000, "a new connection");
  });

  test("no welcome within the hello timeout: the client gives up on the socket and retries", async () => {
    const server = new WebSocketServer({ port: 0, host: "127.0.0.1" });
    let connections = 0;
    server.on("connection", () => (connections += 1));
    await once(server, "listening");
    const c = client({ url: `ws://127.0.0.1:${server.address().port}/v1/ws`, helloTimeoutMs: 200, backoffBaseMs: 50 });
    c.connect();
    await until(() => c.states.some((s) => s.reason === "hello_timeout"), 5_000, "hello_timeout");
    await until(() => connections >= 2, 5_000, "a retry");
    c.close();
    for (const socket of server.clients) socket.terminate();
    server.close();
  });

  test("offers the JSON subprotocol and says hello with the token first", async () => {
    const hub = await fake();
    const c = client({ url: hub.url, client: "door-7 fw 1.0" });
    c.connect();
    await until(() => c.state === CONNECTED);
    assert.equal(hub.protocol, "attendance.v1.json");
    assert.deepEqual(
      { ...hub.frames[0].frame, ref: undefined },
      { type: "hello", token: "t.e.st", client: "door-7 fw 1.0", ref: undefined },
    );
  });
});

describe("tokens", () => {
  test("closed 4001: without getToken the client stops; with it, it fetches a token and comes back", async () => {
    const hub = await fake({ refuse: (hello) => hello.token === "expired" });
    const stuck = client({ url: hub.url, token: "expired", backoffBaseMs: 50 });
    stuck.connect();
    await until(() => stuck.states.some((s) => s.reason === "auth"), 5_000, "the 4001");
    const auth = stuck.states.find((s) => s.reason === "auth");
    assert.equal(auth.code, 4001);
    assert.equal(auth.retryInMs, null, "a bad token is not retried");
    await new Promise((resolve) => setTimeout(resolve, 300));
    assert.equal(hub.connections, 1);

    let fetched = 0;
    const renewed = client({
      url: hub.url,
      token: "expired",
      backoffBaseMs: 50,
      getToken: async () => {
        fetched += 1;
        return "fresh.to.ken";
      },
    });
    renewed.connect();
    await until(() => renewed.state === CONNECTED, 5_000, "connected with the new token");
    assert.equal(fetched, 1);
    assert.equal(hub.sent("hello").at(-1).frame.token, "fresh.to.ken");
  });
});

describe("clock", () => {
  test("the offset comes from ping and pong, and punches are written in the hub's time", async () => {
    const skewMs = 90_000; // the hub's clock is 90 s ahead of ours
    // The welcome's server_time is 5 s off (say, it waited in a buffer): the pongs correct it.
    const welcome = { server_time: new Date(Date.now() + skewMs + 5_000).toISOString() };
    const hub = await fake({ skewMs, welcome });
    const c = client({ url: hub.url });
    c.connect();
    await until(() => c.rttMs !== null, 5_000, "a pong");
    assert.ok(Math.abs(c.offsetMs - skewMs) < 200, `offset ${c.offsetMs}`);
    const before = Date.now();
    const p = await c.punch({ employee: "e1", kind: "in" });
    const written = Date.parse(p.frame.at);
    assert.ok(Math.abs(written - (before + skewMs)) < 500, `at ${p.frame.at}`);
    assert.match(p.frame.at, /Z$/);
  });
});

describe("the queue", () => {
  test("replays a backlog in order, at the set rate and within the window, and acks empty it", async () => {
    const acks = [];
    const hub = await fake({
      onFrame: (frame, send) => {
        if (frame.type === "punch") acks.push(() => send({ type: "ack", id: frame.id, status: "accepted", received_at: new Date().toISOString() }));
      },
    });
    const store = new MemoryStore();
    const c = client({ url: hub.url, store, sendPerSecond: 20, window: 8 });
    const ids = [];
    for (let n = 0; n < 30; n += 1) ids.push((await c.punch({ badge: `b${n}`, kind: "in" })).id);
    assert.equal((await store.load()).length, 30, "stored before anything was sent");
    c.connect();
    await until(() => hub.sent("punch").length === 8, 5_000, "a full window");
    await new Promise((resolve) => setTimeout(resolve, 300));
    assert.equal(hub.sent("punch").length, 8, "no more than the window before acks");
    const started = Date.now();
    while (hub.sent("punch").length < 30 || acks.length) {
      acks.splice(0).forEach((ack) => ack());
      await new Promise((resolve) => setTimeout(resolve, 10));
    }
    const elapsed = Date.now() - started;
    const sent = hub.sent("punch");
    assert.deepEqual(sent.map((f) => f.frame.id), ids, "in the order made");
    assert.ok(sent.every((f) => f.frame.offline === true), "made before connecting: offline");
    // 30 punches at 20 a second: the last ones cannot all go in the first second.
    for (let n = 20; n < sent.length; n += 1) {
      assert.ok(sent[n].at - sent[n - 20].at >= 990, `punch ${n} came too soon after punch ${n - 20}`);
    }
    assert.ok(elapsed >= 900);
    await until(() => c.pending().length === 0);
    assert.deepEqual(await store.load(), []);
  });

  test("a punch the hub could not store is kept and sent again", async () => {
    let tries = 0;
    const hub = await fake({
      onFrame: (frame, send) => {
        if (frame.type !== "punch") return;
        tries += 1;
        if (tries === 1) send({ type: "error", code: "unavailable", id: frame.id, ref: frame.ref, message: "database unavailable" });
        else send({ type: "ack", id: frame.id, status: "duplicate", received_at: new Date().toISOString() });
      },
    });
    const c = client({ url: hub.url, retryAfterMs: 100 });
    const acked = [];
    c.on("ack", (frame) => acked.push(frame));
    c.connect();
    await c.punch({ employee: "e1", kind: "in" });
    await until(() => acked.length === 1, 5_000, "the retry's ack");
    assert.equal(tries, 2);
    assert.equal(acked[0].status, "duplicate");
    assert.deepEqual(c.pending(), []);
  });

  test("a punch the hub cannot read (bad_frame, named only by its ref) is rejected, not resent", async () => {
    const hub = await fake({
      onFrame: (frame, send) => {
        if (frame.type === "punch") send({ type: "error", code: "bad_frame", ref: frame.ref, message: "Expected `str` matching regex - at `$.employee`" });
      },
    });
    const c = client({ url: hub.url });
    const rejected = [];
    c.on("rejected", (frame, punch) => rejected.push({ frame, punch }));
    c.connect();
    const p = await c.punch({ employee: "not an id!", kind: "in" });
    await until(() => rejected.length === 1, 5_000, "the rejection");
    assert.equal(rejected[0].punch.id, p.id);
    assert.equal(rejected[0].frame.reason, "bad_frame");
    assert.deepEqual(c.pending(), []);
    await new Promise((resolve) => setTimeout(resolve, 200));
    assert.equal(hub.sent("punch").length, 1);
  });

  test("an unacked punch is resent after a reconnect with the same id", async () => {
    const hub = await fake();
    const c = client({ url: hub.url, backoffBaseMs: 50 });
    c.connect();
    await until(() => c.state === CONNECTED);
    const p = await c.punch({ employee: "e1", kind: "out" });
    await until(() => hub.sent("punch").length === 1);
    hub.sockets[0].terminate();
    await until(() => hub.sent("punch").length === 2, 5_000, "the resend");
    const [first, second] = hub.sent("punch").map((f) => f.frame);
    assert.equal(first.id, p.id);
    assert.equal(second.id, p.id);
    assert.equal(second.at, first.at);
    assert.equal(second.offline, false, "made while connected: not offline, also when resent");
  });
});

describe("subscriptions", () => {
  test("a gap in versions is detected and the client resubscribes with since", async () => {
    const hub = await fake({
      onFrame: (frame, send) => {
        if (frame.type !== "subscribe") return;
        send({ type: "subscribed", channel: frame.channel, version: 10, recovered: frame.since !== undefined, ref: frame.ref });
        if (frame.since === undefined) {
          send({ type: "snapshot", channel: frame.channel, version: 10, members: [{ employee: "e1", name: "One", state: "in", since: "2026-11-29T08:00:00.000Z", site: "hq" }] });
          send({ type: "delta", channel: frame.channel, version: 11, changes: [{ employee: "e2", name: "Two", state: "break", since: "2026-11-29T08:01:00.000Z", site: "hq" }] });
          // Version 12 is lost on the way.
          send({ type: "delta", channel: frame.channel, version: 13, changes: [{ employee: "e1", name: "One", state: "out", since: "2026-11-29T08:03:00.000Z", site: "hq" }] });
        } else {
          send({ type: "delta", channel: frame.channel, version: 12, changes: [{ employee: "e3", name: "Three", state: "in", since: "2026-11-29T08:02:00.000Z", site: "hq" }] });
          send({ type: "delta", channel: frame.channel, version: 13, changes: [{ employee: "e1", name: "One", state: "out", since: "2026-11-29T08:03:00.000Z", site: "hq" }] });
        }
      },
    });
    const c = client({ url: hub.url });
    c.connect();
    const sub = c.subscribe("presence:hq");
    const gaps = [];
    sub.on("gap", (gap) => gaps.push(gap));
    await until(() => sub.version === 13, 5_000, "version 13");
    assert.deepEqual(gaps, [{ expected: 12, got: 13 }]);
    const subscribes = hub.sent("subscribe").map((f) => f.frame);
    assert.equal(subscribes.length, 2);
    assert.equal(subscribes[0].since, undefined);
    assert.equal(subscribes[1].since, 11);
    assert.deepEqual([...sub.members.keys()].sort(), ["e2", "e3"], "e1 left (out), e3 came in");
    assert.equal(sub.members.get("e2").state, "break");
  });

  test("after a reconnect the subscription asks for what it missed, and a snapshot replaces the members", async () => {
    let round = 0;
    const hub = await fake({
      onFrame: (frame, send) => {
        if (frame.type !== "subscribe") return;
        round += 1;
        const version = round === 1 ? 5 : 900;
        send({ type: "subscribed", channel: frame.channel, version, recovered: false, ref: frame.ref });
        const members = round === 1 ? [{ device: "door", name: "Door", online: true, since: "2026-11-29T08:00:00.000Z" }] : [{ device: "gate", name: "Gate", online: false, since: "2026-11-29T09:00:00.000Z" }];
        send({ type: "snapshot", channel: frame.channel, version, members });
      },
    });
    const c = client({ url: hub.url, backoffBaseMs: 50 });
    c.connect();
    const sub = c.subscribe("terminals:hq");
    await until(() => sub.version === 5);
    assert.deepEqual([...sub.members.keys()], ["door"]);
    hub.sockets[0].terminate();
    await until(() => sub.version === 900, 5_000, "the second snapshot");
    assert.equal(hub.sent("subscribe")[1].frame.since, 5);
    assert.deepEqual([...sub.members.keys()], ["gate"]);
  });

  test("`me` deltas replace the member; alerts on a site channel are versioned members", async () => {
    const hub = await fake({
      onFrame: (frame, send) => {
        if (frame.type !== "subscribe") return;
        send({ type: "subscribed", channel: frame.channel, version: 1, recovered: false, ref: frame.ref });
        if (frame.channel === "me") {
          send({ type: "snapshot", channel: "me", version: 1, members: [{ employee: "e1", name: "One", state: "out", since: "2026-11-29T07:00:00.000Z", site: "hq" }] });
          send({ type: "delta", channel: "me", version: 2, changes: [{ employee: "e1", name: "One", state: "in", since: "2026-11-29T08:00:00.000Z", site: "hq" }] });
          send({ type: "alert", channel: "me", id: "a0", kind: "late", severity: "info", at: "2026-11-29T08:00:00.000Z", message: "late", detail: {}, raised_at: "2026-11-29T08:00:00.100Z" });
        } else {
          send({ type: "snapshot", channel: frame.channel, version: 1, members: [] });
          send({ type: "alert", channel: frame.channel, version: 2, id: "a1", kind: "buddy_punch", severity: "warning", employee: "e2", site: "hq", at: "2026-11-29T08:00:00.000Z", message: "m", detail: {}, raised_at: "2026-11-29T08:00:00.100Z" });
        }
      },
    });
    const c = client({ url: hub.url });
    c.connect();
    const me = c.subscribe("me");
    const alerts = c.subscribe("alerts:hq");
    const meAlerts = [];
    me.on("alert", (frame) => meAlerts.push(frame));
    await until(() => me.version === 2 && alerts.version === 2 && meAlerts.length === 1, 5_000, "both channels");
    assert.equal(me.members.get("e1").state, "in");
    assert.equal(alerts.members.get("a1").kind, "buddy_punch");
    assert.equal(alerts.members.get("a1").type, undefined, "members hold the alert, not the frame");
  });
});
