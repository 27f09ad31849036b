// The hub goes away (SIGTERM: 1001 going away) and a new one comes up on the
// same port: the client retries with backoff, reconnects and rejoins.
import assert from "node:assert/strict";
import { test } from "node:test";
import { Switchboard } from "../dist/switchboard.js";
import { WebSocket, api, mintToken, nextEvent, record, sleep, startHub, waitFor } from "./helpers.mjs";

test("reconnect after the hub restarts on the same port, rooms rejoined", async () => {
  let hub = await startHub();
  const port = hub.port;
  let tokens = 0;
  const sb = new Switchboard(hub.ws, {
    token: () => {
      tokens++;
      return mintToken("rex");
    },
    WebSocket,
    backoffInitialMs: 100,
    backoffMaxMs: 400,
    goingAwayReconnectWindowMs: 200,
  });
  try {
    const log = record(sb, ["connecting", "connected", "disconnected", "recovery", "closed"]);
    const seen = [];
    sb.on("message", (m) => seen.push(m));
    await sb.ready(5000);
    await sb.join("restart");
    const firstId = (await api(hub, "POST", "/api/publish", { room: "restart", data: "before" })).id;
    await waitFor(() => seen.length === 1, { what: "the first message" });

    const gone = nextEvent(sb, "disconnected");
    await hub.stop();
    const d = await gone;
    assert.equal(d.code, 1001);
    assert.equal(d.reason, "going away");
    assert.equal(d.willReconnect, true);
    assert.ok(d.delayMs >= 0 && d.delayMs < 200, `the first retry after 1001 is drawn from the window: ${d.delayMs}`);

    await sleep(800); // a few attempts against a closed port (1006, backing off)
    const failed = log.filter((e) => e.type === "disconnected");
    assert.ok(failed.length >= 2, `retried while the hub was down (${failed.length} disconnects)`);
    // While it shuts down the hub still accepts, then closes 1001 going away; once it
    // is gone the port refuses (1006). Every one of them is retried.
    assert.ok(failed.every((e) => e.detail.willReconnect));
    assert.ok(failed.every((e) => [1001, 1006].includes(e.detail.code)));
    assert.ok(failed.some((e) => e.detail.code === 1006), "attempts against the closed port");
    assert.equal(sb.state === "connecting" || sb.state === "disconnected", true);

    hub = await startHub({ port });
    const back = await waitFor(() => log.find((e) => e.type === "connected" && e.detail.reconnected), {
      what: "the reconnection",
      timeoutMs: 10_000,
    });
    assert.equal(back.detail.welcome.user, "rex");
    const recovery = (await waitFor(() => log.find((e) => e.type === "recovery"), { what: "the rejoin" })).detail;
    // A restarted memory hub has no history: the app is told to reload.
    assert.deepEqual(recovery, { room: "restart", recovered: false, since: firstId });
    assert.ok(tokens >= 2, "the token function is asked on every connect");

    await api(hub, "POST", "/api/publish", { room: "restart", data: "after" });
    await waitFor(() => seen.length === 2, { what: "a message after the restart" });
    assert.deepEqual(
      seen.map((m) => m.data),
      ["before", "after"],
    );
    assert.ok(!log.some((e) => e.type === "closed"));
  } finally {
    await sb.close();
    await hub.stop();
  }
});
