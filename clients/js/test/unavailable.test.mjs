// Hubs on Redis (the `redis` broker, `redis.timeout_s` = 1) whose Redis stalls
// for longer than that: a publish is answered `unavailable`, the client
// resends it with the same idempotency key, and the message is stored and
// delivered once. Each test has its own hub and `redis.prefix`; the Redis is
// a private `redis-server` when one is installed, else $REDIS_URL (see
// startRedis); skipped when there is neither.
import assert from "node:assert/strict";
import { randomUUID } from "node:crypto";
import { after, test } from "node:test";
import { Switchboard } from "../dist/switchboard.js";
import { WebSocket, api, mintToken, redisCli, sleep, startHub, startRedis, waitFor } from "./helpers.mjs";

const redis = await startRedis();
after(() => redis?.stop());
const skip = !redis && "no Redis: neither redis-server nor REDIS_URL (with redis-cli)";

/** Keeps Redis busy for ARGV[1] ms: it reads no socket meanwhile, then handles what came in. */
const BUSY_SCRIPT =
  "local s = redis.call('TIME') local t0 = s[1] * 1000000 + s[2] " +
  "while true do local n = redis.call('TIME') if n[1] * 1000000 + n[2] - t0 > tonumber(ARGV[1]) * 1000 then return 1 end end";

/**
 * A hub on Redis, a listener and a publisher in `room`, and a first message
 * ("before"); the publisher's frames, both ways, are recorded.
 */
async function setUp(t, room) {
  const hub = await startHub({
    env: {
      SWITCHBOARD__BROKER__KIND: "redis",
      SWITCHBOARD__REDIS__URL: redis.url,
      SWITCHBOARD__REDIS__PREFIX: `sbjs-${randomUUID().slice(0, 8)}`,
      SWITCHBOARD__REDIS__TIMEOUT_S: "1",
    },
  });
  const sent = [];
  const received = [];
  class SpyWebSocket extends WebSocket {
    constructor(...args) {
      super(...args);
      this.addEventListener("message", (ev) => received.push(JSON.parse(String(ev.data))));
    }
    send(data, ...rest) {
      sent.push(JSON.parse(data));
      return super.send(data, ...rest);
    }
  }
  const options = { WebSocket, backoffInitialMs: 50, backoffMaxMs: 250 };
  const clients = [];
  const client = (user, extra = {}) => {
    const sb = new Switchboard(hub.ws, { ...options, token: () => mintToken(user), ...extra });
    clients.push(sb);
    return sb;
  };
  t.after(async () => {
    await Promise.all(clients.map((c) => c.close()));
    await hub.stop();
  });
  const listener = client("lena");
  const publisher = client("pete", { WebSocket: SpyWebSocket });
  const heard = [];
  listener.on("message", (m) => heard.push(m));
  await listener.join(room);
  await publisher.join(room);
  const before = await publisher.publish(room, "before");
  await waitFor(() => heard.length === 1, { what: "the first message" });

  /** The publish frames sent with `data`, and the publisher's answers to them. */
  const attemptsOf = (data) => {
    const attempts = sent.filter((f) => f.type === "publish" && JSON.stringify(f.data) === JSON.stringify(data));
    const refs = new Set(attempts.map((f) => f.ref));
    return { attempts, refs, answers: received.filter((f) => f.type !== "message" && refs.has(f.ref)) };
  };

  /** `id` (with `data`) reached the listener, the room's history and a late joiner once, and no other copy did. */
  const assertOnce = async (id, data) => {
    await waitFor(() => heard.some((m) => m.id === id), { what: "the message at the listener", timeoutMs: 10_000 });
    await sleep(1500); // a second copy would show up by now
    assert.deepEqual(
      heard.filter((m) => JSON.stringify(m.data) === JSON.stringify(data)).map((m) => m.id),
      [id],
      "the listener got it once",
    );
    const { messages } = await api(hub, "GET", `/api/rooms/${room}/history?since=${before}`);
    assert.deepEqual(
      messages.map((m) => [m.id, m.data]),
      [[id, data]],
      "the room's history holds it once",
    );
    const late = client("lara");
    const replayed = [];
    late.on("message", (m) => replayed.push(m.id));
    await late.join(room, { since: before });
    await sleep(300);
    assert.deepEqual(replayed, [id], "a join with since replays it once");
  };
  return { hub, publisher, attemptsOf, assertOnce };
}

/** Every attempt had the same key and its own ref; one ack, with `id`; at least one `unavailable` before it. */
function assertResent({ attempts, refs, answers }, id) {
  const unavailable = answers.filter((f) => f.type === "error" && f.code === "unavailable");
  assert.ok(unavailable.length >= 1, `the hub answered unavailable first: ${JSON.stringify(answers)}`);
  assert.ok(attempts.length >= 2, `resent after unavailable: ${attempts.length} attempts`);
  assert.equal(refs.size, attempts.length, "each attempt with a fresh ref");
  assert.equal(new Set(attempts.map((f) => f.idempotency_key)).size, 1, "every attempt with the same key");
  assert.deepEqual(
    answers.filter((f) => f.type === "ack").map((f) => f.id),
    [id],
    "one ack",
  );
  assert.equal(answers.length, attempts.length, "every attempt answered");
}

test("Redis paused for writes past redis.timeout_s: the publish is resent with its key until it is stored, once", { skip }, async (t) => {
  const room = "idem.pause";
  const { publisher, attemptsOf, assertOnce } = await setUp(t, room);
  await redisCli(redis.url, "CLIENT", "PAUSE", "2500", "WRITE");
  const pausedAt = Date.now();
  const data = { text: "paused" };
  const id = await publisher.publish(room, data, { timeoutMs: 10_000 });
  const took = Date.now() - pausedAt;
  assert.match(id, /^\d+-\d+$/);
  assert.ok(took >= 1000, `it waited for Redis (${took} ms)`);
  assertResent(attemptsOf(data), id);
  await assertOnce(id, data);
});

test("Redis busy past redis.timeout_s, then running the publish it had read: the resend is acked with that id, nothing doubled", { skip }, async (t) => {
  // The hub gives up on its command after 1 s (`unavailable`) and drops that connection, but
  // Redis has the command and runs it once the script ends: the first attempt takes effect
  // although it was answered `unavailable`. A resend with another key would be stored again.
  const room = "idem.busy";
  const { publisher, attemptsOf, assertOnce } = await setUp(t, room);
  const busy = redisCli(redis.url, "EVAL", BUSY_SCRIPT, "0", "1800");
  await sleep(200); // the script runs
  const data = { text: "busy" };
  const id = await publisher.publish(room, data, { timeoutMs: 10_000 });
  assert.equal(await busy, "1");
  assertResent(attemptsOf(data), id);
  await assertOnce(id, data);
});
