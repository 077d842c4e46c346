// The client against a real hub (see hub.js): punches, the durable queue across client and
// hub restarts, subscriptions with `since`, drain, token refresh, clock offset.
import assert from "node:assert/strict";
import { mkdtemp } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, afterEach, before, describe, test } from "node:test";
import WebSocket from "ws";

import { AttendanceClient, CONNECTED, DISCONNECTED } from "../src/index.js";
import { FileStore } from "../src/file-store.js";
import { Hub, freePort, missingHub, tenant, until } from "./hub.js";

const skip = missingHub();

/** A `ws` constructor that remembers its sockets, so a test can cut them as a network would. */
function trackedWebSocket() {
  const sockets = [];
  return class extends WebSocket {
    static sockets = sockets;

    constructor(...args) {
      super(...args);
      sockets.push(this);
    }
  };
}

const madeClients = [];

function client(options) {
  const made = new AttendanceClient({ WebSocket: trackedWebSocket(), backoffBaseMs: 100, backoffMaxMs: 1000, ...options });
  const states = [];
  made.on("state", (change) => states.push(change));
  made.states = states;
  madeClients.push(made);
  return made;
}

const connected = (c) => until(() => c.state === CONNECTED, 15_000, "connected");

describe("against a real hub", { skip: skip ?? false }, () => {
  let hub;
  let kit;

  before(async () => {
    hub = await Hub.start();
    kit = await tenant(hub);
  });

  afterEach(() => {
    // Also after a failed assertion: no client keeps retrying (and the process alive).
    for (const c of madeClients.splice(0)) c.close();
  });

  const ownHubs = [];
  const ownHub = async () => {
    const started = await Hub.start();
    ownHubs.push(started);
    return started;
  };

  after(async () => {
    for (const started of [hub, ...ownHubs]) await started?.stop();
  });

  test("a punch is acked once stored, and the states say why they changed", async () => {
    const c = client({ url: hub.ws, token: kit.terminal });
    const acks = [];
    c.on("ack", (frame, punch) => acks.push({ frame, punch }));
    c.connect();
    await connected(c);
    assert.deepEqual(
      c.states.map((s) => [s.state, s.reason]),
      [
        ["connecting", "connect"],
        ["connected", "welcome"],
      ],
    );
    assert.equal(c.session.role, "terminal");
    const queued = await c.punch({ badge: "b1", kind: "in", method: "badge" });
    await until(() => acks.length === 1, 10_000, "the ack");
    assert.equal(acks[0].frame.status, "accepted");
    assert.equal(acks[0].frame.id, queued.id);
    assert.equal(acks[0].punch.frame.offline, false);
    assert.deepEqual(c.pending(), []);
    const stored = (await kit.punches()).filter((p) => p.id === queued.id);
    assert.equal(stored.length, 1);
    assert.equal(stored[0].employee, "e1");
    c.close();
    assert.equal(c.state, DISCONNECTED);
    assert.equal(c.states.at(-1).reason, "closed_by_client");
  });

  test("a rejected punch is reported and leaves the queue", async () => {
    const c = client({ url: hub.ws, token: kit.terminal });
    const rejected = [];
    c.on("rejected", (frame) => rejected.push(frame));
    c.connect();
    await c.punch({ employee: "nobody", kind: "in" });
    await until(() => rejected.length === 1, 10_000, "the rejection");
    assert.equal(rejected[0].reason, "unknown_employee");
    assert.deepEqual(c.pending(), []);
    c.close();
  });

  test("punches queued while the hub is unreachable survive a client restart and are stored once", async () => {
    const path = join(await mkdtemp(join(tmpdir(), "punch-queue-")), "queue.jsonl");
    const nowhere = `ws://127.0.0.1:${await freePort()}/v1/ws`;
    const stores = [new FileStore(path), new FileStore(path), new FileStore(path)];
    const first = client({ url: nowhere, token: kit.terminal, store: stores[0] });
    first.connect();
    const made = [];
    for (let n = 0; n < 5; n += 1) made.push(await first.punch({ badge: "b2", kind: n % 2 ? "out" : "in" }));
    await until(() => first.states.some((s) => s.reason === "unreachable"), 5_000, "a failed attempt");
    first.close(); // the process "ends": only the file remains
    await stores[0].close();

    const second = client({ url: hub.ws, token: kit.terminal, store: stores[1] });
    await second.loaded;
    assert.deepEqual(
      second.pending().map((p) => p.id),
      made.map((p) => p.id),
      "the restarted client has every queued punch, in order",
    );
    assert.ok(second.pending().every((p) => p.frame.offline === true), "made while disconnected: offline");
    const acked = [];
    second.on("ack", (frame) => acked.push(frame.id));
    second.connect();
    await until(() => acked.length === 5, 15_000, "the queue to drain");
    assert.deepEqual(acked, made.map((p) => p.id), "sent in the order they were made");
    const stored = (await kit.punches()).filter((p) => made.some((m) => m.id === p.id));
    assert.equal(stored.length, 5);
    second.close();
    await stores[1].close();

    const third = client({ url: hub.ws, token: kit.terminal, store: stores[2] });
    await third.loaded;
    assert.deepEqual(third.pending(), [], "acked punches are gone from the file");
    await stores[2].close();
  });

  test("a hub killed and restarted mid-stream: nothing lost, nothing doubled", async () => {
    const own = await ownHub();
    const ownKit = await tenant(own, "js-kill");
    const c = client({ url: own.ws, token: ownKit.terminal, sendPerSecond: 400, window: 64 });
    const acked = new Set();
    let duplicates = 0;
    c.on("ack", (frame) => {
      acked.add(frame.id);
      if (frame.status === "duplicate") duplicates += 1;
    });
    c.connect();
    await connected(c);
    const ids = [];
    for (let n = 0; n < 300; n += 1) {
      ids.push((await c.punch({ badge: `b${(n % 5) + 1}`, kind: n % 2 ? "out" : "in" })).id);
      if (n === 150) await own.stop("SIGKILL");
    }
    assert.ok(c.pending().length > 0, "some punches wait for the hub");
    await own.start();
    await until(() => c.pending().length === 0, 30_000, "every punch to be acked");
    assert.equal(acked.size, 300);
    const stored = await ownKit.punches();
    assert.equal(stored.length, 300, `stored ${stored.length} of 300 (duplicates acked: ${duplicates})`);
    assert.equal(new Set(stored.map((p) => p.id)).size, 300);
    assert.deepEqual(new Set(stored.map((p) => p.id)), new Set(ids));
    c.close();
    await own.stop();
  });

  test("drain: the client waits the hub's reconnect_after_ms, then reconnects", async () => {
    const own = await ownHub();
    const ownKit = await tenant(own, "js-drain");
    const c = client({ url: own.ws, token: ownKit.terminal });
    const drains = [];
    c.on("drain", (frame) => drains.push(frame));
    c.connect();
    await connected(c);
    await own.stop("SIGTERM");
    const lost = c.states.at(-1);
    assert.equal(drains.length, 1);
    assert.equal(lost.state, DISCONNECTED);
    assert.equal(lost.reason, "drain");
    assert.equal(lost.retryInMs, drains[0].reconnect_after_ms);
    assert.ok(lost.retryInMs >= 500 && lost.retryInMs <= 3000);
    await own.start();
    await connected(c);
    c.close();
    await own.stop();
  });

  test("a subscription resubscribes with `since` after a dropped connection and recovers what it missed", async () => {
    const watcherSocket = trackedWebSocket();
    // A slow first retry (1-2 s), so that the break below is surely missed, not seen live.
    const watcher = client({ url: hub.ws, token: kit.supervisor, WebSocket: watcherSocket, backoffBaseMs: 2000 });
    const recovered = [];
    watcher.on("recovered", (frame) => recovered.push(frame));
    watcher.connect();
    const floor = watcher.subscribe("presence:hq");
    await until(() => floor.ready, 10_000, "the snapshot");
    const door = client({ url: hub.ws, token: kit.terminal });
    door.connect();
    await door.punch({ employee: "e3", kind: "in" });
    await until(() => floor.members.get("e3")?.state === "in", 10_000, "e3 in");
    const seen = floor.version;

    // Cut the supervisor's socket as a network would; meanwhile e3 goes on break.
    watcher.states.length = 0;
    for (const socket of watcherSocket.sockets) socket.terminate();
    await door.punch({ employee: "e3", kind: "break_start" });
    await until(() => door.pending().length === 0, 10_000, "the break to be stored");
    assert.notEqual(watcher.state, CONNECTED, "the break was stored while the supervisor was away");
    assert.equal(floor.members.get("e3").state, "in");
    await until(() => floor.members.get("e3")?.state === "break", 15_000, "the missed delta");
    assert.ok(watcher.states.some((s) => s.state === DISCONNECTED), "the cut was noticed");
    assert.ok(recovered.some((f) => f.channel === "presence:hq"), "recovered with since, no snapshot");
    assert.ok(floor.version > seen);
    watcher.close();
    door.close();
  });

  test("token refresh in place: the session outlives its first token", async () => {
    const first = kit.employeeToken("e4", 4);
    let fetched = 0;
    const c = client({
      url: hub.ws,
      token: first,
      refreshBeforeS: 2,
      getToken: async () => {
        fetched += 1;
        return kit.employeeToken("e4", 600);
      },
    });
    const refreshed = [];
    c.on("refreshed", (info) => refreshed.push(info));
    c.connect();
    await connected(c);
    const session = c.session.session;
    await until(() => refreshed.length === 1, 10_000, "the refresh");
    assert.equal(fetched, 1);
    assert.ok(Date.parse(refreshed[0].expiresAt) > Date.now() + 500_000);
    // Past the first token's expiry: still the same session, and it still punches.
    await new Promise((resolve) => setTimeout(resolve, 3_000));
    assert.equal(c.state, CONNECTED);
    assert.equal(c.session.session, session);
    const acks = [];
    c.on("ack", (frame) => acks.push(frame));
    await c.punch({ employee: "e4", kind: "in", method: "mobile" });
    await until(() => acks.length === 1, 10_000, "the ack");
    assert.equal(acks[0].status, "accepted");
    c.close();
  });

  test("the clock offset against the hub's clock is small on one machine", async () => {
    const c = client({ url: hub.ws, token: kit.supervisor });
    c.connect();
    await connected(c);
    const pong = await c.ping();
    assert.equal(pong.type, "pong");
    assert.ok(c.rttMs !== null && c.rttMs < 1000);
    assert.ok(Math.abs(c.offsetMs) < 1000, `offset ${c.offsetMs} ms`);
    c.close();
  });
});
