// The chat in a real browser: two pages talk; a page survives a hub
// restart and shows what it missed.
import { test } from "node:test";
import assert from "node:assert/strict";
import { api, chatAs, redisCluster, redisKeys, REDIS_URL, say, seen, sleep, startHub, withBrowser } from "./harness.mjs";

test("two pages chat with each other and see each other present", async () => {
  const hub = await startHub();
  try {
    await withBrowser("two-pages-chat", async (browser) => {
      const alice = await chatAs(browser, hub, "alice");
      const bob = await chatAs(browser, hub, "bob");
      await alice.waitForFunction(() => document.querySelector('[data-testid="people"]').textContent.includes("bob"));
      await say(alice, "hello bob");
      await seen(bob, "hello bob");
      await say(bob, "hi alice");
      await seen(alice, "hi alice");
      const lines = await alice.$$eval('[data-testid="log"] li.message', (lis) => lis.map((li) => li.textContent));
      assert.ok(lines[0].startsWith("alice") && lines[0].includes("hello bob"), lines.join(" | "));
      assert.ok(lines[1].startsWith("bob") && lines[1].includes("hi alice"), lines.join(" | "));
    });
  } finally {
    await hub.stop();
  }
});

test("a page survives a hub restart and shows the messages it missed", async () => {
  const redis = redisCluster();
  const cluster = redis.env;
  let hub = await startHub(cluster);
  const other = await startHub(cluster);
  try {
    await withBrowser("restart-recovery", async (browser) => {
      const page = await chatAs(browser, hub, "carol");
      await api(other, "POST", "/api/publish", { room: "lobby", data: { text: "before the restart" } });
      await seen(page, "before the restart");
      const port = hub.port;
      await hub.stop();
      await page.waitForSelector('[data-testid="banner"].shown');
      // Published elsewhere while this hub is down: missed by the page.
      for (const n of [1, 2, 3]) {
        const r = await api(other, "POST", "/api/publish", { room: "lobby", data: { text: `missed ${n}` } });
        assert.equal(r.status, 200);
      }
      hub = await startHub({ ...cluster, SWITCHBOARD__SERVER__PORT: String(port) });
      await page.waitForSelector('[data-testid="banner"]:not(.shown)', { state: "attached", timeout: 30000 });
      await seen(page, "missed 3", 15000);
      const log = await page.$$eval('[data-testid="log"] li', (lis) => lis.map((li) => li.textContent));
      const marker = log.findIndex((l) => l.includes("back online: what you missed follows"));
      assert.ok(marker > 0, `a recovered marker in ${log.join(" | ")}`);
      const missed = log.slice(marker + 1).filter((l) => l.includes("missed"));
      assert.deepEqual(missed.map((l) => l.match(/missed \d/)[0]), ["missed 1", "missed 2", "missed 3"]);
      assert.equal(log.filter((l) => l.includes("before the restart")).length, 1, "nothing twice");
      await sleep(100);
    });
  } finally {
    await hub.stop();
    await other.stop();
    await redis.cleanup();
  }
  assert.deepEqual(await redisKeys(REDIS_URL, redis.prefix), [], "the test leaves no key in Redis");
});
