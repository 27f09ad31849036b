// The client against a real hub (one for this file): rooms, presence, direct,
// refusals, tasks, kicks, recovery through a cut network, token refresh.
import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import { Switchboard, SwitchboardError } from "../dist/switchboard.js";
import { WebSocket, api, mintToken, nextEvent, record, sleep, startHub, startProxy, waitFor } from "./helpers.mjs";

let hub;
const clients = [];

before(async () => {
  hub = await startHub({ extraConfig: "\n[auth]\ndev_tokens = true\n" });
});

after(async () => {
  await Promise.all(clients.map((c) => c.close()));
  await hub?.stop();
});

/** A client of `user` on the test hub (or `url`), closed after the file. */
function client(user, options = {}, url = hub.ws) {
  const sb = new Switchboard(url, {
    token: () => mintToken(user),
    WebSocket,
    backoffInitialMs: 50,
    backoffMaxMs: 250,
    ...options,
  });
  clients.push(sb);
  return sb;
}

test("chat: join, joined, publish to every member, presence, direct, broadcast", async () => {
  const alice = client("alice");
  const bob = client("bob");
  const aliceSeen = record(alice, ["message", "joined", "direct", "broadcast"]);
  const bobSeen = record(bob, ["message"]);

  assert.deepEqual(await alice.join("lobby"), { room: "lobby" });
  const bobJoined = nextEvent(alice, "joined", { pred: (d) => d.user === "bob" });
  await bob.join("lobby");
  assert.deepEqual(await bobJoined, { type: "joined", room: "lobby", user: "bob" });
  assert.equal(alice.user, "alice");

  const id = await alice.publish("lobby", { text: "hello" });
  assert.match(id, /^\d+-\d+$/);
  await waitFor(() => bobSeen.length === 1 && aliceSeen.some((e) => e.type === "message"), { what: "the message" });
  assert.deepEqual(bobSeen[0].detail, {
    type: "message",
    id,
    room: "lobby",
    from: "alice",
    data: { text: "hello" },
    ts: bobSeen[0].detail.ts,
  });

  const users = await alice.presence("lobby");
  assert.deepEqual(users.map((u) => u.user).sort(), ["alice", "bob"]);

  const directId = await bob.direct("alice", { psst: 1 });
  const direct = await waitFor(() => aliceSeen.find((e) => e.type === "direct"), { what: "the direct" });
  assert.equal(direct.detail.id, directId);
  assert.equal(direct.detail.from, "bob");

  await api(hub, "POST", "/api/publish", { broadcast: true, data: "maintenance" });
  const bc = await waitFor(() => aliceSeen.find((e) => e.type === "broadcast"), { what: "the broadcast" });
  assert.equal(bc.detail.data, "maintenance");

  const bobLeft = nextEvent(alice, "left", { pred: (d) => d.user === "bob" });
  await bob.leave("lobby");
  assert.equal((await bobLeft).room, "lobby");
  assert.deepEqual(bob.joinedRooms, []);
});

test("the README's token function: POST /dev/token, asked on connect", async () => {
  const user = "dana";
  const token = () =>
    fetch(`${hub.http}/dev/token`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ user }),
    })
      .then((r) => r.json())
      .then((t) => t.token);
  const dana = client(user, { token });
  const seen = [];
  dana.on("message", (m) => seen.push(`${m.from}: ${m.data.text}`));
  await dana.join("lobby");
  await dana.publish("lobby", { text: "hi from the README" });
  await waitFor(() => seen.length === 1, { what: "the echo of our message" });
  assert.deepEqual(seen, ["dana: hi from the README"]);
});

test("refusals reject the promise with the hub's code", async () => {
  const carol = client("carol", { token: () => mintToken("carol", { rooms: ["chat.*"] }) });
  await carol.join("chat.one");
  await assert.rejects(carol.publish("chat.two", { text: "not joined" }), (e) => {
    assert.ok(e instanceof SwitchboardError);
    assert.equal(e.code, "forbidden");
    assert.equal(e.frame.type, "error");
    return true;
  });
  await assert.rejects(carol.join("secret"), (e) => e.code === "forbidden");
  assert.deepEqual(carol.joinedRooms, ["chat.one"]);
  await assert.rejects(carol.join("bad room!"), (e) => e.code === "bad_request");
  await assert.rejects(carol.task("no-such-task", {}), (e) => e.code === "not_found");
  // The connection stays usable after refusals.
  assert.match(await carol.publish("chat.one", "still here"), /^\d+-\d+$/);
  assert.equal(carol.state, "connected");
});

test("a task: task() resolves with its id; queued, running, done with the result, in order", async () => {
  const tess = client("tess");
  const events = record(tess, ["task"]);
  const updates = [];
  const payload = { report: "november", rows: [1, 2, 3] };
  const id = await tess.task("echo", payload, { onUpdate: (u) => updates.push(u) });
  assert.match(id, /^\S+$/);
  await waitFor(() => updates.some((u) => u.status === "done"), { what: "the task to finish" });
  assert.deepEqual(
    updates.map((u) => u.status),
    ["queued", "running", "done"],
  );
  assert.ok(updates.every((u) => u.task_id === id));
  assert.deepEqual(updates[2].result, payload);
  assert.deepEqual(
    events.filter((e) => e.detail.task_id === id).map((e) => e.detail.status),
    ["queued", "running", "done"],
  );
  const rec = await tess.taskStatus(id);
  assert.equal(rec.task_id, id);
  assert.equal(rec.status, "done");
  assert.deepEqual(rec.result, payload);
  assert.equal(rec.user, "tess");
  await assert.rejects(tess.taskCancel(id), (e) => e.code === "forbidden");
  // The same idempotency key answers with the first task's id.
  const k1 = await tess.task("echo", { n: 1 }, { idempotencyKey: "once" });
  const k2 = await tess.task("echo", { n: 2 }, { idempotencyKey: "once" });
  assert.equal(k1, k2);
});

test("a publish that timed out waiting for the pacing is never sent", async () => {
  // One frame per second, a bucket of one: the second of two publishes made together waits.
  const paula = client("paula", { maxFramesPerSecond: 1, frameBurst: 1 });
  await paula.join("late.paced");
  const first = paula.publish("late.paced", "first");
  const late = paula.publish("late.paced", "timed out", { timeoutMs: 50 });
  await assert.rejects(late, (e) => {
    assert.equal(e.code, "timeout");
    assert.match(e.message, /not sent/);
    return true;
  });
  // Sent after where the timed-out one waited: once it is stored, the other would be too.
  const ids = [await first, await paula.publish("late.paced", "after")];
  const { messages } = await api(hub, "GET", "/api/rooms/late.paced/history");
  assert.deepEqual(
    messages.map((m) => [m.id, m.data]),
    [
      [ids[0], "first"],
      [ids[1], "after"],
    ],
  );
});

test("a publish that timed out waiting for the connection is not sent when it comes up", async () => {
  const otto = client("otto", { autoConnect: false });
  const bob = client("bob-witness");
  const witnessed = record(bob, ["message"]);
  await bob.join("late.offline");
  const joined = otto.join("late.offline");
  await assert.rejects(otto.publish("late.offline", "timed out", { timeoutMs: 50 }), (e) => {
    assert.equal(e.code, "timeout");
    assert.match(e.message, /not sent/);
    return true;
  });
  otto.connect();
  await joined;
  const id = await otto.publish("late.offline", "after");
  await waitFor(() => witnessed.some((e) => e.detail.id === id), { what: "the publish made after the time-out" });
  assert.deepEqual(
    witnessed.map((e) => e.detail.data),
    ["after"],
  );
  const { messages } = await api(hub, "GET", "/api/rooms/late.offline/history");
  assert.deepEqual(
    messages.map((m) => m.data),
    ["after"],
  );
});

test("kicked by the API: an event with 1008 kicked, and no new connection attempt", async () => {
  const kim = client("kim");
  const seen = record(kim, ["connecting", "disconnected", "closed"]);
  await kim.ready(5000);
  await kim.join("lobby");
  const queued = kim.publish("lobby", "x"); // settles before or after the kick, never hangs
  await queued.catch(() => {});
  const closed = nextEvent(kim, "closed");
  assert.deepEqual(await api(hub, "POST", "/api/users/kim/disconnect"), { disconnected: 1 });
  assert.deepEqual(await closed, { code: 1008, reason: "kicked" });
  const disc = seen.find((e) => e.type === "disconnected").detail;
  assert.deepEqual(disc, { code: 1008, reason: "kicked", willReconnect: false });
  await sleep(1000);
  assert.equal(seen.filter((e) => e.type === "connecting").length, 1);
  assert.equal(kim.state, "closed");
  assert.deepEqual(await api(hub, "GET", "/api/users/kim/connections"), { user: "kim", connections: 0 });
  await assert.rejects(kim.publish("lobby", "after"), (e) => e.code === "closed");
});

test("recovery: a network cut mid-stream loses nothing and doubles nothing", async () => {
  const proxy = await startProxy(hub.port);
  try {
    const rita = client("rita", {}, proxy.ws);
    const seen = [];
    rita.on("message", (m) => seen.push(m));
    const log = record(rita, ["disconnected", "connected", "recovery"]);
    await rita.join("recov");

    const total = 40;
    const published = [];
    let cutAt = -1;
    let restoredAt = -1;
    for (let n = 0; n < total; n++) {
      published.push((await api(hub, "POST", "/api/publish", { room: "recov", data: { n } })).id);
      if (cutAt < 0 && seen.length >= 5) {
        proxy.cut(); // messages on the wire now are lost with the socket
        cutAt = n;
      }
      if (cutAt >= 0 && restoredAt < 0 && n >= cutAt + 10) {
        await waitFor(() => log.some((e) => e.type === "disconnected"), { what: "the client to notice the cut" });
        proxy.restore();
        restoredAt = n;
      }
      await sleep(5);
    }
    assert.ok(cutAt >= 0 && restoredAt > cutAt, `cut at ${cutAt}, restored at ${restoredAt}`);
    await waitFor(() => seen.length >= total, { what: `all ${total} messages (have ${seen.length})`, timeoutMs: 15_000 });
    await sleep(300); // anything doubled would show up now
    assert.deepEqual(
      seen.map((m) => m.data.n),
      published.map((_, n) => n),
    );
    assert.deepEqual(
      seen.map((m) => m.id),
      published,
    );
    const recovery = log.find((e) => e.type === "recovery").detail;
    assert.equal(recovery.room, "recov");
    assert.equal(recovery.recovered, true);
    assert.match(recovery.since, /^\d+-\d+$/);
    assert.equal(log.filter((e) => e.type === "connected").length, 2);
  } finally {
    await proxy.close();
  }
});

test("refresh: 5-second tokens are refreshed before they expire; the session outlives them", async () => {
  const sentFrames = [];
  class SpyWebSocket extends WebSocket {
    send(data, ...rest) {
      sentFrames.push({ at: Date.now(), frame: JSON.parse(data) });
      return super.send(data, ...rest);
    }
  }
  const issued = [];
  const fred = client("fred", {
    WebSocket: SpyWebSocket,
    token: async () => {
      const token = mintToken("fred", { ttlS: 5 });
      issued.push(JSON.parse(Buffer.from(token.split(".")[1], "base64url")).exp * 1000);
      return token;
    },
  });
  const log = record(fred, ["disconnected", "error", "connected"]);
  await fred.ready(5000);
  await fred.join("fresh");
  const firstExpiry = issued[0];
  await sleep(Math.max(0, firstExpiry - Date.now()) + 2500); // well past the first token's exp
  assert.deepEqual(
    log.filter((e) => e.type !== "connected"),
    [],
    "no disconnect, no error",
  );
  assert.equal(log.filter((e) => e.type === "connected").length, 1);
  const refreshes = sentFrames.filter((s) => s.frame.type === "refresh");
  assert.ok(refreshes.length >= 1, "a refresh was sent");
  assert.ok(refreshes[0].at < firstExpiry, `first refresh ${firstExpiry - refreshes[0].at} ms before expiry`);
  assert.ok(issued.length >= 2);
  // The session still works on the refreshed token.
  assert.match(await fred.publish("fresh", "alive"), /^\d+-\d+$/);
  assert.equal(fred.state, "connected");
});

test("refresh to a token with fewer rooms: revoked event, and those rooms are not rejoined", async () => {
  let narrow = false;
  const vera = client("vera", {
    token: () => mintToken("vera", narrow ? { rooms: ["keep"] } : {}),
  });
  await vera.join("keep");
  await vera.join("drop");
  narrow = true;
  const revoked = nextEvent(vera, "revoked");
  await vera.refreshToken();
  assert.deepEqual(await revoked, { rooms: ["drop"], reason: "refresh" });
  assert.deepEqual(vera.joinedRooms, ["keep"]);
  await assert.rejects(vera.publish("drop", 1), (e) => e.code === "forbidden");
});

test("a fixed token that expires: closed 1008 token expired, not retried", async () => {
  const ivan = client("ivan", { token: mintToken("ivan", { ttlS: 2 }) });
  const attempts = record(ivan, ["connecting"]);
  await ivan.ready(5000);
  assert.deepEqual(await nextEvent(ivan, "closed", { timeoutMs: 5000 }), { code: 1008, reason: "token expired" });
  await sleep(300);
  assert.equal(attempts.length, 1);
});

test("pacing: a reconnect flushing a full queue stays under the hub's rate limit", async () => {
  const flush = async (user, options) => {
    const sb = client(user, { autoConnect: false, maxQueue: 120, ...options });
    const joins = [sb.join("flood.a"), sb.join("flood.b")];
    const publishes = [];
    for (let n = 0; n < 110; n++) publishes.push(sb.publish(n % 2 ? "flood.a" : "flood.b", { n }));
    sb.connect();
    await Promise.all(joins);
    const results = await Promise.allSettled(publishes);
    return results.filter((r) => r.status === "rejected").map((r) => r.reason.code);
  };
  // 112 frames at once: over the hub's burst of 100.
  const unpaced = await flush("flood-raw", { maxFramesPerSecond: 0 });
  assert.ok(unpaced.length > 0 && unpaced.every((c) => c === "rate_limited"), `unpaced: ${unpaced.length} refused`);
  assert.deepEqual(await flush("flood-paced", {}), []);
});
