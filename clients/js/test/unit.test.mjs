// The client against a scripted fake socket: the rules that a real hub cannot
// easily be made to exercise (duplicates, refusals, back-off, queue bounds).
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { mock, test } from "node:test";
import { Switchboard, SwitchboardError, compareIds, decodeJwt } from "../dist/switchboard.js";
import { mintToken, nextEvent, record, sleep, waitFor } from "./helpers.mjs";

/** A fake WebSocket class with its own list of instances, driven by the test. */
function fakeSocketClass({ autoAck = true } = {}) {
  class FakeSocket {
    static instances = [];
    constructor(url) {
      this.url = url;
      this.readyState = 0;
      this.sent = [];
      this.onopen = this.onmessage = this.onclose = this.onerror = null;
      FakeSocket.instances.push(this);
    }
    send(text) {
      const f = JSON.parse(text);
      this.sent.push(f);
      if (!autoAck) return;
      if (f.type === "join") this.receive({ type: "ack", ref: f.ref, room: f.room, ...(f.since ? { recovered: true } : {}) });
      else if (f.type === "leave") this.receive({ type: "ack", ref: f.ref, room: f.room });
      else if (f.type === "publish") this.receive({ type: "ack", ref: f.ref, id: `${Date.now()}-0` });
      else if (f.type === "ping") this.receive({ type: "pong", ref: f.ref });
    }
    close(code = 1005, reason = "") {
      if (this.readyState >= 2) return;
      this.readyState = 3;
      setTimeout(() => this.onclose?.({ code, reason }), 0);
    }
    // --- driven by the test ---
    welcome(user = "alice") {
      this.readyState = 1;
      this.onopen?.({});
      this.receive({ type: "welcome", connection_id: `c${FakeSocket.instances.length}`, user, instance: "fake", heartbeat_s: 20 });
    }
    receive(frame) {
      this.onmessage?.({ data: JSON.stringify(frame) });
    }
    serverClose(code, reason = "") {
      this.readyState = 3;
      this.onclose?.({ code, reason });
    }
    static get last() {
      return FakeSocket.instances[FakeSocket.instances.length - 1];
    }
  }
  return FakeSocket;
}

const fast = { backoffInitialMs: 10, backoffMaxMs: 40, goingAwayReconnectWindowMs: 40 };

/**
 * Lets the client's promises and the fake socket's callbacks run (`setImmediate` stays real
 * when the test mocks `setTimeout`, `setInterval` and `Date`).
 */
const settle = () => new Promise((resolve) => setImmediate(resolve));

/** Under mocked timers: a client connected to a fake socket, pacing at one frame per second. */
async function mockedClient(t, options = {}) {
  t.mock.timers.enable({ apis: ["setTimeout", "setInterval", "Date"] });
  const FakeSocket = fakeSocketClass(options.fake);
  const sb = new Switchboard("ws://x/ws", {
    token: "t",
    WebSocket: FakeSocket,
    autoConnect: false,
    pingIntervalMs: 0,
    maxFramesPerSecond: 1,
    frameBurst: 1,
    ...options.client,
  });
  sb.connect();
  await settle();
  FakeSocket.last.welcome();
  assert.equal(sb.state, "connected");
  const close = async () => {
    t.mock.timers.reset(); // the close handshake runs on real timers
    await sb.close();
  };
  return { sb, FakeSocket, sock: FakeSocket.last, close };
}

async function connected(FakeSocket, sb, user) {
  await waitFor(() => FakeSocket.last && FakeSocket.last.readyState === 0 && FakeSocket.last, { what: "a socket" });
  const sock = FakeSocket.last;
  const ready = sb.ready(2000);
  sock.welcome(user);
  await ready;
  return sock;
}

test("message ids compare as (ms, seq) numerically", () => {
  assert.equal(compareIds("1700000000000-2", "1700000000000-10"), -1);
  assert.equal(compareIds("1700000000001-0", "1700000000000-99"), 1);
  assert.equal(compareIds("5-5", "5-5"), 0);
  assert.equal(compareIds("999-0", "1000-0"), -1);
});

test("decodeJwt reads the claims without verifying", () => {
  const claims = decodeJwt(mintToken("zoë", { ttlS: 60 }));
  assert.equal(claims.sub, "zoë");
  assert.equal(typeof claims.exp, "number");
  assert.equal(decodeJwt("not-a-jwt"), undefined);
});

test("the browser bundle is one ES module without imports", () => {
  const js = readFileSync(new URL("../dist/switchboard.js", import.meta.url), "utf8");
  assert.doesNotMatch(js, /^\s*import\s/m);
  assert.doesNotMatch(js, /\brequire\(/);
  assert.doesNotMatch(js, /^\s*export\s.*\sfrom\s/m);
  assert.match(js, /export class Switchboard\b/);
});

test("the token goes in the query string; a bare origin gets /ws", async () => {
  const FakeSocket = fakeSocketClass();
  const sb = new Switchboard("http://hub.example:8000", { token: "t0k", WebSocket: FakeSocket });
  await waitFor(() => FakeSocket.last);
  assert.equal(FakeSocket.last.url, "ws://hub.example:8000/ws?token=t0k");
  await sb.close();
});

test("no duplicates across a reconnect, rejoin with since, recovery event", async () => {
  const FakeSocket = fakeSocketClass();
  const sb = new Switchboard("ws://x/ws", { token: "t", WebSocket: FakeSocket, ...fast });
  const seen = [];
  sb.on("message", (m) => seen.push(m.id));
  let sock = await connected(FakeSocket, sb);
  assert.deepEqual(await sb.join("r"), { room: "r" });
  for (const id of ["100-0", "100-1", "101-0"]) sock.receive({ type: "message", id, room: "r", from: "a", data: id, ts: 1 });
  sock.receive({ type: "message", id: "100-1", room: "r", from: "a", data: "dup", ts: 1 });
  assert.deepEqual(seen, ["100-0", "100-1", "101-0"]);
  assert.equal(sb.lastMessageId("r"), "101-0");

  const recovery = nextEvent(sb, "recovery");
  sock.serverClose(1001, "going away");
  sock = await connected(FakeSocket, sb);
  const rejoin = sock.sent.find((f) => f.type === "join");
  assert.deepEqual({ room: rejoin.room, since: rejoin.since }, { room: "r", since: "101-0" });
  assert.deepEqual(await recovery, { room: "r", recovered: true, since: "101-0" });
  // A hub that replays too much (or a live copy of a replayed message): dropped.
  for (const id of ["100-1", "101-0", "101-1", "101-1", "102-0"]) {
    sock.receive({ type: "message", id, room: "r", from: "a", data: id, ts: 1 });
  }
  assert.deepEqual(seen, ["100-0", "100-1", "101-0", "101-1", "102-0"]);
  await sb.close();
});

test("a room never seen a message in rejoins without since and reports recovered:false", async () => {
  const FakeSocket = fakeSocketClass();
  const sb = new Switchboard("ws://x/ws", { token: "t", WebSocket: FakeSocket, ...fast });
  let sock = await connected(FakeSocket, sb);
  await sb.join("quiet");
  const recovery = nextEvent(sb, "recovery");
  sock.serverClose(1006, "");
  sock = await connected(FakeSocket, sb);
  assert.equal(sock.sent.find((f) => f.type === "join").since, undefined);
  assert.deepEqual(await recovery, { room: "quiet", recovered: false, since: null });
  await sb.close();
});

test("requests while disconnected: queued in order (bounded), sent after the rejoins", async () => {
  const FakeSocket = fakeSocketClass();
  const sb = new Switchboard("ws://x/ws", { token: "t", WebSocket: FakeSocket, maxQueue: 2, ...fast });
  const p1 = sb.join("a");
  const p2 = sb.publish("a", 1);
  const p3 = sb.publish("a", 2);
  const p4 = sb.publish("a", 3);
  await assert.rejects(p4, (e) => e instanceof SwitchboardError && e.code === "queue_full");
  const sock = await connected(FakeSocket, sb);
  await Promise.all([p1, p2, p3]);
  assert.deepEqual(
    sock.sent.map((f) => [f.type, f.data ?? f.room]),
    [["join", "a"], ["publish", 1], ["publish", 2]],
  );
  await sb.close();
});

test("offline: reject refuses at once; per-call override queues", async () => {
  const FakeSocket = fakeSocketClass();
  const sb = new Switchboard("ws://x/ws", { token: "t", WebSocket: FakeSocket, offline: "reject", ...fast });
  await assert.rejects(sb.publish("a", 1), (e) => e.code === "offline");
  await assert.rejects(sb.join("a"), (e) => e.code === "offline");
  const queued = sb.ping({ offline: "queue" });
  await connected(FakeSocket, sb);
  assert.equal(typeof (await queued), "number");
  await sb.close();
});

test("time-outs reject; a late reply is ignored; in-flight requests fail on disconnect", async () => {
  const FakeSocket = fakeSocketClass({ autoAck: false });
  const sb = new Switchboard("ws://x/ws", { token: "t", WebSocket: FakeSocket, requestTimeoutMs: 50, ...fast });
  const sock = await connected(FakeSocket, sb);
  await assert.rejects(sb.presence("r"), (e) => e.code === "timeout");
  sock.receive({ type: "presence", ref: sock.sent[0].ref, room: "r", users: [] }); // late: ignored
  const pending = sb.direct("bob", { hi: 1 }, { timeoutMs: 5000 });
  sock.serverClose(1006, "");
  await assert.rejects(pending, (e) => e.code === "disconnected");
  await sb.close();
});

test("hub errors reject with the code, and replies are matched by ref", async () => {
  const FakeSocket = fakeSocketClass({ autoAck: false });
  const sb = new Switchboard("ws://x/ws", { token: "t", WebSocket: FakeSocket });
  const sock = await connected(FakeSocket, sb);
  const a = sb.publish("r", 1);
  const b = sb.presence("r");
  const [fa, fb] = sock.sent;
  sock.receive({ type: "error", code: "forbidden", message: "join r before publishing to it", ref: fa.ref });
  sock.receive({ type: "presence", ref: fb.ref, room: "r", users: [{ user: "alice", connections: 1 }] });
  await assert.rejects(a, (e) => e instanceof SwitchboardError && e.code === "forbidden" && /join r/.test(e.message));
  assert.deepEqual(await b, [{ user: "alice", connections: 1 }]);
  await sb.close();
});

for (const reason of ["unauthorized", "kicked", "forbidden origin"]) {
  test(`no retry after 1008 ${reason}`, async () => {
    const FakeSocket = fakeSocketClass();
    const sb = new Switchboard("ws://x/ws", { token: () => "t", WebSocket: FakeSocket, ...fast });
    const sock = await connected(FakeSocket, sb);
    const queued = [];
    const closed = nextEvent(sb, "closed");
    sock.serverClose(1008, reason);
    assert.deepEqual(await closed, { code: 1008, reason });
    queued.push(sb.publish("r", 1));
    await assert.rejects(queued[0], (e) => e.code === "closed");
    await sleep(150);
    assert.equal(FakeSocket.instances.length, 1);
    assert.equal(sb.state, "closed");
  });
}

test("connection limit is retried a few times, then given up", async () => {
  const FakeSocket = fakeSocketClass();
  const sb = new Switchboard("ws://x/ws", { token: "t", WebSocket: FakeSocket, connectionLimitRetries: 2, ...fast });
  const closed = nextEvent(sb, "closed");
  for (let i = 0; i < 3; i++) {
    await waitFor(() => FakeSocket.instances.length === i + 1);
    FakeSocket.last.serverClose(1008, "connection limit");
  }
  assert.deepEqual(await closed, { code: 1008, reason: "connection limit" });
  await sleep(100);
  assert.equal(FakeSocket.instances.length, 3);
});

test("token expired: retried with a token function, not with a fixed token", async () => {
  const FakeSocket = fakeSocketClass();
  let calls = 0;
  const sb = new Switchboard("ws://x/ws", { token: async () => `t${++calls}`, WebSocket: FakeSocket, ...fast });
  let sock = await connected(FakeSocket, sb);
  sock.serverClose(1008, "token expired");
  sock = await connected(FakeSocket, sb);
  assert.match(sock.url, /token=t2$/);
  await sb.close();

  const Fixed = fakeSocketClass();
  const fixed = new Switchboard("ws://x/ws", { token: "t", WebSocket: Fixed, ...fast });
  const s2 = await connected(Fixed, fixed);
  const closed = nextEvent(fixed, "closed");
  s2.serverClose(1008, "token expired");
  assert.deepEqual(await closed, { code: 1008, reason: "token expired" });
});

test("a failing or silent token function is an attempt that failed: error event, retry", async () => {
  const FakeSocket = fakeSocketClass();
  let calls = 0;
  const sb = new Switchboard("ws://x/ws", {
    token: () => {
      calls++;
      if (calls === 1) throw new Error("auth backend down");
      if (calls === 2) return new Promise(() => {}); // never answers
      return "t3";
    },
    WebSocket: FakeSocket,
    connectTimeoutMs: 100,
    ...fast,
  });
  const errors = record(sb, ["error"]);
  const sock = await connected(FakeSocket, sb);
  assert.match(sock.url, /token=t3$/);
  assert.deepEqual(
    errors.map((e) => [e.detail.during, e.detail.error.message]),
    [
      ["token", "auth backend down"],
      ["token", "the token function did not answer"],
    ],
  );
  assert.equal(FakeSocket.instances.length, 1);
  await sb.close();
});

test("backoff: full jitter under an exponential cap, reset after a stable connection", async () => {
  const FakeSocket = fakeSocketClass();
  const sb = new Switchboard("ws://x/ws", {
    token: "t",
    WebSocket: FakeSocket,
    backoffInitialMs: 20,
    backoffMaxMs: 80,
    stableAfterMs: 100,
  });
  const delays = [];
  sb.on("disconnected", (d) => delays.push(d.delayMs));
  for (let i = 0; i < 6; i++) {
    await waitFor(() => FakeSocket.instances.length === i + 1);
    FakeSocket.last.serverClose(1006, "");
  }
  const caps = [20, 40, 80, 80, 80, 80];
  delays.forEach((d, i) => assert.ok(d >= 0 && d < caps[i], `delay ${i} = ${d} under ${caps[i]}`));
  const attempts = record(sb, ["connecting"]);
  await connected(FakeSocket, sb);
  await sleep(150); // stable: the next failure starts from the first cap again
  FakeSocket.last.serverClose(1006, "");
  await waitFor(() => attempts.length >= 1);
  assert.ok(delays[6] < 20, `after a stable connection the delay is under the first cap (${delays[6]})`);
  await sb.close();
});

test("a join made while connecting survives a dropped attempt and resolves on the next connection", async () => {
  const FakeSocket = fakeSocketClass();
  const sb = new Switchboard("ws://x/ws", { token: "t", WebSocket: FakeSocket, ...fast });
  const joined = sb.join("later");
  await waitFor(() => FakeSocket.last);
  FakeSocket.last.serverClose(1006, "");
  await connected(FakeSocket, sb);
  assert.deepEqual(await joined, { room: "later" });
  assert.deepEqual(sb.joinedRooms, ["later"]);
  await sb.close();
});

test("a silent connection is dropped after a ping goes unanswered, then reconnected", async () => {
  const FakeSocket = fakeSocketClass({ autoAck: false });
  const sb = new Switchboard("ws://x/ws", { token: "t", WebSocket: FakeSocket, pingIntervalMs: 60, pingTimeoutMs: 60, ...fast });
  const sock = await connected(FakeSocket, sb);
  const gone = await nextEvent(sb, "disconnected", { timeoutMs: 2000 });
  assert.equal(gone.reason, "ping timeout");
  assert.ok(sock.sent.some((f) => f.type === "ping"));
  await waitFor(() => FakeSocket.instances.length === 2);
  await sb.close();
});

test("task updates reach onUpdate from queued on, and task events", async () => {
  const FakeSocket = fakeSocketClass({ autoAck: false });
  const sb = new Switchboard("ws://x/ws", { token: "t", WebSocket: FakeSocket });
  const sock = await connected(FakeSocket, sb);
  const updates = [];
  const events = record(sb, ["task"]);
  const id = sb.task("echo", { a: 1 }, { idempotencyKey: "k", onUpdate: (u) => updates.push(u.status) });
  const f = sock.sent[0];
  assert.deepEqual([f.type, f.name, f.idempotency_key], ["task", "echo", "k"]);
  // The ack and the first update in one go, as one TCP read gives them.
  sock.receive({ type: "ack", ref: f.ref, task_id: "T1" });
  sock.receive({ type: "task", task_id: "T1", status: "queued" });
  sock.receive({ type: "task", task_id: "T1", status: "done", result: { a: 1 } });
  assert.equal(await id, "T1");
  assert.deepEqual(updates, ["queued", "done"]);
  assert.deepEqual(events.map((e) => e.detail.status), ["queued", "done"]);
  await sb.close();
});

test("close() rejects what waits and stops for good; connect() starts again and rejoins", async () => {
  const FakeSocket = fakeSocketClass();
  const sb = new Switchboard("ws://x/ws", { token: "t", WebSocket: FakeSocket, ...fast });
  await connected(FakeSocket, sb);
  await sb.join("kept");
  await sb.close();
  assert.equal(sb.state, "closed");
  await assert.rejects(sb.publish("kept", 1), (e) => e.code === "closed");
  sb.connect();
  const sock = await connected(FakeSocket, sb);
  assert.equal(sock.sent[0].type, "join");
  assert.equal(sock.sent[0].room, "kept");
  await sb.close();
});

test("the constructor wants a token and a WebSocket", () => {
  assert.throws(() => new Switchboard("ws://x/ws", {}), /token/);
  if (typeof globalThis.WebSocket === "undefined") {
    assert.throws(() => new Switchboard("ws://x/ws", { token: "t" }), /WebSocket/);
  }
  assert.throws(() => new Switchboard("ftp://x/", { token: "t", WebSocket: fakeSocketClass() }), /WebSocket URL/);
});

test("pacing: past the burst, frames go out at the configured rate, in order", async () => {
  const FakeSocket = fakeSocketClass();
  const sb = new Switchboard("ws://x/ws", { token: "t", WebSocket: FakeSocket, maxFramesPerSecond: 100, frameBurst: 5 });
  const sock = await connected(FakeSocket, sb);
  const start = Date.now();
  const all = Promise.all(Array.from({ length: 15 }, (_, n) => sb.direct("bob", n)));
  assert.equal(sock.sent.length, 5);
  // From now on, answer every direct as it arrives.
  sock.send = function (text) {
    const f = JSON.parse(text);
    this.sent.push(f);
    this.receive({ type: "ack", ref: f.ref, id: `1-${f.data}` });
  };
  for (const f of sock.sent) sock.receive({ type: "ack", ref: f.ref, id: `1-${f.data}` });
  await all;
  const took = Date.now() - start;
  assert.ok(took >= 80, `10 frames over the burst at 100/s took ${took} ms`);
  assert.deepEqual(sock.sent.map((f) => f.data), Array.from({ length: 15 }, (_, i) => i));
  await sb.close();
});

test("a request that times out while it waits for the pacing is taken back: never sent", async (t) => {
  const { sb, sock, close } = await mockedClient(t);
  const first = sb.publish("r", "first"); // the bucket's only token
  const late = sb.publish("r", "late", { timeoutMs: 100 });
  const lateJoin = sb.join("late-room", { timeoutMs: 100 });
  assert.deepEqual(sock.sent.map((f) => f.data), ["first"]);
  t.mock.timers.tick(100);
  await assert.rejects(late, (e) => e instanceof SwitchboardError && e.code === "timeout" && /not sent/.test(e.message));
  await assert.rejects(lateJoin, (e) => e.code === "timeout");
  assert.deepEqual(sb.joinedRooms, [], "a join that timed out before it was sent is forgotten");
  const after = sb.publish("r", "after");
  t.mock.timers.tick(1000); // the next token of the bucket
  await Promise.all([first, after]);
  // Neither the timed-out publish nor the join went out, and no leave undoes a join never sent.
  assert.deepEqual(
    sock.sent.map((f) => [f.type, f.data ?? f.room]),
    [
      ["publish", "first"],
      ["publish", "after"],
    ],
  );
  await close();
});

test("a request that times out after it was sent: outcome unknown", async (t) => {
  const { sb, sock, close } = await mockedClient(t, { fake: { autoAck: false } });
  const sent = sb.direct("bob", "hi", { timeoutMs: 100 }); // directs are not answered by this fake
  assert.equal(sock.sent.length, 1);
  t.mock.timers.tick(100);
  await assert.rejects(sent, (e) => e.code === "timeout" && /sent, its outcome is unknown/.test(e.message));
  await close();
});

test("the pacing buffer is bounded: past maxBufferedFrames a request is refused at once with queue_full", async (t) => {
  const { sb, sock, close } = await mockedClient(t, { client: { maxBufferedFrames: 2 } });
  await sb.join("kept"); // the bucket's only token
  const waiting = [sb.publish("kept", 1), sb.publish("kept", 2)];
  const full = (e) => e instanceof SwitchboardError && e.code === "queue_full" && /maxBufferedFrames/.test(e.message);
  await assert.rejects(sb.publish("kept", 3), full);
  await assert.rejects(sb.join("other"), full);
  await assert.rejects(sb.leave("kept"), full);
  assert.deepEqual(sb.joinedRooms, ["kept"], "a refused join or leave changes nothing");
  t.mock.timers.tick(1000); // one frame goes: room for one more
  waiting.push(sb.publish("kept", 4));
  // One frame a second (a timer set during a tick counts from the tick's end: one second a tick).
  t.mock.timers.tick(1000);
  t.mock.timers.tick(1000);
  await Promise.all(waiting);
  assert.deepEqual(
    sock.sent.map((f) => [f.type, f.data ?? f.room]),
    [
      ["join", "kept"],
      ["publish", 1],
      ["publish", 2],
      ["publish", 4],
    ],
  );
  await close();
});

test("after 1001 going away the first retry waits a delay drawn from goingAwayReconnectWindowMs, later ones back off", async (t) => {
  const draws = [0.75, 0.5, 0.999];
  t.mock.method(Math, "random", () => draws.shift());
  const { sb, FakeSocket, close } = await mockedClient(t, {
    client: { goingAwayReconnectWindowMs: 4000, backoffInitialMs: 100, backoffMaxMs: 100 },
  });
  const delays = [];
  sb.on("disconnected", (d) => delays.push(d.delayMs));
  FakeSocket.last.serverClose(1001, "going away");
  assert.deepEqual(delays, [3000], "0.75 of the window");
  t.mock.timers.tick(2999);
  await settle();
  assert.equal(FakeSocket.instances.length, 1, "no attempt before the drawn delay");
  t.mock.timers.tick(1);
  await settle();
  assert.equal(FakeSocket.instances.length, 2, "the attempt at the drawn delay");
  // That attempt fails: the usual backoff (full jitter under the cap), not the window.
  FakeSocket.last.serverClose(1006, "");
  assert.deepEqual(delays, [3000, 50]);
  t.mock.timers.tick(50);
  await settle();
  assert.equal(FakeSocket.instances.length, 3);
  FakeSocket.last.welcome();
  FakeSocket.last.serverClose(1001, "going away");
  assert.deepEqual(delays, [3000, 50, 3996], "every 1001 draws from the window again");
  await close();
});

test("goingAwayReconnectWindowMs: 0: a 1001 is retried with the usual backoff", async (t) => {
  t.mock.method(Math, "random", () => 0.5);
  const { sb, FakeSocket, close } = await mockedClient(t, {
    client: { goingAwayReconnectWindowMs: 0, backoffInitialMs: 100, backoffMaxMs: 100 },
  });
  const gone = nextEvent(sb, "disconnected");
  FakeSocket.last.serverClose(1001, "going away");
  assert.deepEqual(await gone, { code: 1001, reason: "going away", willReconnect: true, delayMs: 50 });
  await close();
});

// ------------------------------------------------ publish: idempotency --

/** `mockedClient`, closed after the test whatever its outcome (a failed assertion leaves no client behind). */
async function mockedClientClosedAfter(t, options) {
  const client = await mockedClient(t, options);
  t.after(client.close);
  return client;
}

const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;
const unavailable = (ref) => ({ type: "error", code: "unavailable", message: "redis unavailable", ref });

test("publish: every frame carries an idempotency key, a fresh one per call or the caller's", async (t) => {
  const FakeSocket = fakeSocketClass();
  const sb = new Switchboard("ws://x/ws", { token: "t", WebSocket: FakeSocket });
  t.after(() => sb.close());
  const sock = await connected(FakeSocket, sb);
  await sb.publish("r", 1);
  await sb.publish("r", 2);
  await sb.publish("r", 3, { idempotencyKey: "order-42" });
  await sb.publish("r", 4, { idempotencyKey: "é".repeat(128) }); // 256 bytes: the most the hub takes
  const keys = sock.sent.map((f) => f.idempotency_key);
  assert.match(keys[0], UUID);
  assert.match(keys[1], UUID);
  assert.notEqual(keys[0], keys[1]);
  assert.deepEqual(keys.slice(2), ["order-42", "é".repeat(128)]);
  // Other requests carry none.
  await sb.ping();
  assert.equal(sock.sent.at(-1).idempotency_key, undefined);
});

test("publish: without crypto.randomUUID the key is 32 random hex digits from getRandomValues", async (t) => {
  const FakeSocket = fakeSocketClass();
  const sb = new Switchboard("ws://x/ws", { token: "t", WebSocket: FakeSocket });
  t.after(() => sb.close());
  const sock = await connected(FakeSocket, sb);
  const descriptor = Object.getOwnPropertyDescriptor(globalThis, "crypto");
  const real = globalThis.crypto;
  let drawn = 0;
  const getRandomValues = (a) => {
    drawn++;
    return real.getRandomValues(a);
  };
  Object.defineProperty(globalThis, "crypto", { value: { getRandomValues }, configurable: true, writable: true });
  try {
    await sb.publish("r", 1);
    await sb.publish("r", 2);
  } finally {
    Object.defineProperty(globalThis, "crypto", descriptor);
  }
  const [a, b] = sock.sent.map((f) => f.idempotency_key);
  assert.match(a, /^[0-9a-f]{32}$/);
  assert.match(b, /^[0-9a-f]{32}$/);
  assert.notEqual(a, b);
  assert.equal(drawn, 2);
});

test("publish: a bad idempotencyKey is refused in the client, before anything is sent", async (t) => {
  const FakeSocket = fakeSocketClass();
  const sb = new Switchboard("ws://x/ws", { token: "t", WebSocket: FakeSocket });
  t.after(() => sb.close());
  const sock = await connected(FakeSocket, sb);
  const bad = [
    ["", /1–256 bytes of UTF-8, not 0/],
    ["k".repeat(257), /1–256 bytes of UTF-8, not 257/],
    ["é".repeat(129), /1–256 bytes of UTF-8, not 258/],
    ["half a pair \uD83D", /lone surrogate/],
    [42, /must be a string, not number/],
    [null, /must be a string, not null/],
  ];
  for (const [key, why] of bad) {
    await assert.rejects(sb.publish("r", 1, { idempotencyKey: key }), (e) => {
      assert.ok(e instanceof TypeError, `${JSON.stringify(key)}: a TypeError`);
      assert.match(e.message, /^Switchboard: publish: idempotencyKey /);
      assert.match(e.message, why);
      return true;
    });
  }
  assert.deepEqual(sock.sent, [], "nothing was sent");
  // Also while disconnected: refused at once, never queued.
  sock.serverClose(1006, "");
  await assert.rejects(sb.publish("r", 1, { idempotencyKey: "" }), TypeError);
  const next = await connected(FakeSocket, sb);
  assert.deepEqual(next.sent, []);
});

test("publish answered unavailable: resent with the same key and a fresh ref after a backoff, acked once", async (t) => {
  t.mock.method(Math, "random", () => 0); // the shortest delays: half the cap
  const { sb, sock } = await mockedClientClosedAfter(t, { fake: { autoAck: false }, client: { maxFramesPerSecond: 0 } });
  const published = sb.publish("r", { text: "hi" });
  const first = sock.sent[0];
  assert.equal(first.type, "publish");
  sock.receive(unavailable(first.ref));
  await settle();
  t.mock.timers.tick(49);
  assert.equal(sock.sent.length, 1, "no resend before the backoff (100 ms cap, half of it at least)");
  t.mock.timers.tick(1);
  assert.equal(sock.sent.length, 2, "resent after 50 ms");
  const second = sock.sent[1];
  assert.deepEqual({ ...second, ref: undefined }, { ...first, ref: undefined }, "the same frame");
  assert.notEqual(second.ref, first.ref, "a fresh ref");
  sock.receive(unavailable(second.ref));
  t.mock.timers.tick(99);
  assert.equal(sock.sent.length, 2);
  t.mock.timers.tick(1);
  assert.equal(sock.sent.length, 3, "the backoff doubles: 100 ms");
  const third = sock.sent[2];
  assert.equal(third.idempotency_key, first.idempotency_key);
  sock.receive({ type: "ack", ref: third.ref, id: "7-0" });
  assert.equal(await published, "7-0");
  // An answer to an earlier attempt's ref (there is none, but a hub bug must not matter): ignored.
  sock.receive({ type: "ack", ref: first.ref, id: "8-0" });

  // Other requests are not resent: unavailable rejects a direct at once.
  const direct = sb.direct("bob", 1);
  sock.receive(unavailable(sock.sent[3].ref));
  await assert.rejects(direct, (e) => e.code === "unavailable" && e.frame.code === "unavailable");
  t.mock.timers.tick(5000);
  assert.equal(sock.sent.length, 4, "the direct was sent once");
});

test("publish unavailable until its time-out: resent with backoff within it, then rejected with unavailable", async (t) => {
  t.mock.method(Math, "random", () => 0);
  const { sb, sock } = await mockedClientClosedAfter(t, { fake: { autoAck: false }, client: { maxFramesPerSecond: 0 } });
  const at = [];
  sock.send = function (text) {
    const f = JSON.parse(text);
    this.sent.push(f);
    at.push(Date.now());
    this.receive(unavailable(f.ref)); // Redis stays away
  };
  const start = Date.now();
  const published = sb.publish("r", "x", { timeoutMs: 1000, idempotencyKey: "k-1" });
  let outcome;
  published.then(
    () => (outcome = "resolved"),
    (e) => (outcome = e),
  );
  for (let i = 0; i < 200 && outcome === undefined; i++) {
    t.mock.timers.tick(10);
    await settle();
  }
  // 50, 100, 200, 400 ms apart; the next wait (800 ms) would end past the time-out: given up at once.
  assert.deepEqual(
    at.map((ms) => ms - start),
    [0, 50, 150, 350, 750],
  );
  assert.ok(outcome instanceof SwitchboardError, `rejected (${outcome})`);
  assert.equal(outcome.code, "unavailable");
  assert.equal(outcome.frame.code, "unavailable");
  assert.match(outcome.message, /still unavailable after 5 attempts/);
  assert.match(outcome.message, /idempotencyKey "k-1"/);
  assert.ok(Date.now() - start < 1000, "rejected as soon as no attempt could fit, not at the time-out");
  assert.ok(sock.sent.every((f) => f.idempotency_key === "k-1" && f.data === "x"));
  assert.equal(new Set(sock.sent.map((f) => f.ref)).size, 5, "a fresh ref each time");
  t.mock.timers.tick(10_000);
  assert.equal(sock.sent.length, 5, "nothing after");
});

test("publish: the time-out firing during the backoff rejects with the last unavailable", async (t) => {
  t.mock.method(Math, "random", () => 0.999); // the longest delays: almost the cap
  const { sb, sock } = await mockedClientClosedAfter(t, { fake: { autoAck: false }, client: { maxFramesPerSecond: 0 } });
  const published = sb.publish("r", "x", { timeoutMs: 120 });
  sock.receive(unavailable(sock.sent[0].ref)); // the next attempt at ~100 ms
  t.mock.timers.tick(99);
  sock.receive(unavailable(sock.sent[1].ref)); // answered at 99 ms: the next one after 199 ms: past 120
  await assert.rejects(published, (e) => e.code === "unavailable" && /after 2 attempts/.test(e.message));
  t.mock.timers.tick(1000);
  assert.equal(sock.sent.length, 2);
});

test("publish: a resend in flight at the time-out rejects with timeout (sent, outcome unknown)", async (t) => {
  t.mock.method(Math, "random", () => 0);
  const { sb, sock } = await mockedClientClosedAfter(t, { fake: { autoAck: false }, client: { maxFramesPerSecond: 0 } });
  const published = sb.publish("r", "x", { timeoutMs: 1000 });
  sock.receive(unavailable(sock.sent[0].ref));
  t.mock.timers.tick(50);
  assert.equal(sock.sent.length, 2, "resent, and never answered");
  t.mock.timers.tick(950);
  await assert.rejects(published, (e) => {
    assert.equal(e.code, "timeout");
    assert.match(e.message, /no reply within 1000 ms \(it was sent, its outcome is unknown; attempt 2; resend it with idempotencyKey "[0-9a-f-]{36}"\)/);
    return true;
  });
});

test("publish: close() during the backoff rejects it with closed, and nothing more is sent", async (t) => {
  const { sb, sock, close } = await mockedClientClosedAfter(t, { fake: { autoAck: false }, client: { maxFramesPerSecond: 0 } });
  const published = sb.publish("r", "x");
  sock.receive(unavailable(sock.sent[0].ref));
  const rejected = assert.rejects(published, (e) => e.code === "closed");
  await close();
  await rejected;
  await sleep(2500);
  assert.equal(sock.sent.length, 1);
});

test("a publish in flight when the connection drops is resent after the reconnect with the same key; other requests are not", async (t) => {
  const FakeSocket = fakeSocketClass({ autoAck: false });
  const sb = new Switchboard("ws://x/ws", { token: "t", WebSocket: FakeSocket, ...fast });
  t.after(() => sb.close());
  let sock = await connected(FakeSocket, sb);
  const joined = sb.join("r");
  sock.receive({ type: "ack", ref: sock.sent[0].ref, room: "r" });
  await joined;
  const published = sb.publish("r", "kept", { timeoutMs: 5000 });
  const direct = sb.direct("bob", 1, { timeoutMs: 5000 });
  const strict = sb.publish("r", "offline: reject", { timeoutMs: 5000, offline: "reject" });
  const sent = sock.sent.find((f) => f.data === "kept");
  sock.serverClose(1006, "");
  await assert.rejects(direct, (e) => e.code === "disconnected");
  await assert.rejects(strict, (e) => e.code === "disconnected");
  const queued = sb.publish("r", "queued while down");
  sock = await connected(FakeSocket, sb);
  // The rejoin first (a publish wants membership), then the publish in flight, then what was queued.
  assert.deepEqual(
    sock.sent.map((f) => [f.type, f.room, f.data]),
    [
      ["join", "r", undefined],
      ["publish", "r", "kept"],
      ["publish", "r", "queued while down"],
    ],
  );
  const resent = sock.sent[1];
  assert.equal(resent.idempotency_key, sent.idempotency_key);
  assert.notEqual(resent.ref, sent.ref);
  for (const f of sock.sent) {
    sock.receive(f.type === "join" ? { type: "ack", ref: f.ref, room: "r" } : { type: "ack", ref: f.ref, id: `9-${f.ref}` });
  }
  assert.equal(await published, `9-${resent.ref}`);
  assert.equal(await queued, `9-${sock.sent[2].ref}`);
});

test("publish: a backoff that ends while disconnected queues it (offline: queue) or rejects it (offline: reject)", async (t) => {
  t.mock.method(Math, "random", () => 0);
  const { sb, sock, FakeSocket } = await mockedClientClosedAfter(t, { fake: { autoAck: false }, client: { maxFramesPerSecond: 0 } });
  const queued = sb.publish("r", "queue", { idempotencyKey: "q" });
  const strict = sb.publish("r", "reject", { idempotencyKey: "s", offline: "reject" });
  for (const f of sock.sent) sock.receive(unavailable(f.ref));
  sock.serverClose(1006, "");
  t.mock.timers.tick(50); // the backoffs end; the new socket has no welcome yet
  assert.equal(sb.state, "connecting");
  await assert.rejects(strict, (e) => {
    assert.equal(e.code, "offline");
    assert.match(e.message, /not connected .* to resend it after "redis unavailable".*idempotencyKey "s"/);
    return true;
  });
  await settle();
  assert.equal(FakeSocket.instances.length, 2);
  FakeSocket.last.welcome();
  const resent = FakeSocket.last.sent;
  assert.deepEqual(
    resent.map((f) => [f.type, f.data, f.idempotency_key]),
    [["publish", "queue", "q"]],
  );
  FakeSocket.last.receive({ type: "ack", ref: resent[0].ref, id: "5-0" });
  assert.equal(await queued, "5-0");
});
