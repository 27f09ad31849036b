// The dashboard in a real browser: the fed room's chart draws points, and
// the stats panel's connection count matches /api/stats.
import { test } from "node:test";
import assert from "node:assert/strict";
import { API_KEY, api, run, startHub, withBrowser } from "./harness.mjs";

test("the chart draws the points demo-feed publishes", async () => {
  const hub = await startHub();
  const feed = run(["demo-feed", "--url", hub.url, "--api-key", API_KEY, "--interval-ms", "100"]);
  try {
    await withBrowser("dashboard-chart", async (browser) => {
      const page = await browser.newPage();
      await page.goto(`${hub.url}/dashboard.html`);
      await page.waitForFunction(() => Number(document.querySelector('[data-testid="points"]').textContent) >= 10, null, { timeout: 20000 });
      const drawn = await page.evaluate(() => {
        const { feed } = window.switchboardDashboard;
        return { n: feed.values.length, finite: feed.values.every(Number.isFinite) };
      });
      assert.ok(drawn.n >= 10 && drawn.finite, JSON.stringify(drawn));
      // uPlot drew on its canvas: some pixels are not blank.
      const inked = await page.$eval('[data-testid="chart"] canvas', (c) => {
        const data = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
        for (let i = 3; i < data.length; i += 4) if (data[i] !== 0) return true;
        return false;
      });
      assert.ok(inked, "the chart canvas has ink");
    });
  } finally {
    feed.stop();
    await hub.stop();
  }
});

test("the stats panel shows the connection count /api/stats gives", async () => {
  const hub = await startHub();
  try {
    await withBrowser("dashboard-stats", async (browser) => {
      const page = await browser.newPage();
      await page.goto(`${hub.url}/dashboard.html`);
      await page.waitForFunction(() => window.switchboardDashboard?.sb?.state === "connected");
      await page.fill('[data-testid="api-key"]', API_KEY);
      await page.click('[data-testid="watch"]');
      const { body } = await api(hub, "GET", "/api/stats");
      assert.ok(body.connections >= 1, JSON.stringify(body));
      await page.waitForFunction(
        (n) => document.querySelector('[data-testid="stat-connections"]').textContent === String(n),
        body.connections,
        { timeout: 10000 },
      );
      const instance = await page.textContent('[data-testid="stat-instance"]');
      assert.equal(instance, body.instance);
    });
  } finally {
    await hub.stop();
  }
});
