// A newcomer's first minutes with the demo, in a real browser: the login
// screen alone until a name is accepted, a refused name explained in the
// hub's own words, a phone-sized screen without sideways scrolling, one's
// own messages marked, no console error or missing file, and a dashboard
// that says what its API key is about.
import { test } from "node:test";
import assert from "node:assert/strict";
import { chatAs, say, seen, startHub, withBrowser } from "./harness.mjs";

/** Whether the element is on screen (Playwright: a box, not display:none). */
const shown = (page, selector) => page.isVisible(selector);

test("the login screen shows only the name card until a name is accepted", async () => {
  const hub = await startHub();
  try {
    await withBrowser("login-screen", async (browser) => {
      const page = await browser.newPage();
      await page.goto(`${hub.url}/`);
      assert.equal(await shown(page, '[data-testid="login"]'), true, "the name card");
      for (const panel of ['[data-testid="chat"]', 'h2:text("Rooms")', 'h2:text("Here now")', '[data-testid="text"]']) {
        assert.equal(await shown(page, panel), false, `${panel} is on screen before a name was accepted`);
      }
      await page.fill("#name", "dora");
      await page.click("#login-form button");
      await page.waitForSelector('[data-testid="chat"]', { state: "visible" });
      assert.equal(await shown(page, '[data-testid="login"]'), false, "the name card is gone");
      assert.equal(await shown(page, 'h2:text("Here now")'), true);
      assert.equal(await page.textContent('[data-testid="who"]'), "you are dora");
    });
  } finally {
    await hub.stop();
  }
});

test("a refused name shows the hub's own message, and the chat stays closed", async () => {
  const hub = await startHub();
  try {
    // What the hub answers for this name, asked directly.
    const r = await fetch(`${hub.url}/dev/token`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ user: "Alice Smith" }),
    });
    assert.equal(r.status, 400);
    const { message } = await r.json();
    assert.ok(message.includes("no spaces"), message);
    await withBrowser("refused-name", async (browser) => {
      const page = await browser.newPage();
      await page.goto(`${hub.url}/`);
      await page.fill("#name", "Alice Smith");
      await page.click("#login-form button");
      await page.waitForFunction(() => document.querySelector('[data-testid="login-error"]').textContent !== "");
      assert.equal(await page.textContent('[data-testid="login-error"]'), message);
      assert.equal(await shown(page, '[data-testid="login-error"]'), true);
      assert.equal(await shown(page, '[data-testid="chat"]'), false);
      // The same page then takes a good name, and the error goes.
      await page.fill("#name", "Alice_Smith");
      await page.click("#login-form button");
      await page.waitForSelector('[data-testid="chat"]', { state: "visible" });
      assert.equal(await shown(page, '[data-testid="login-error"]'), false);
    });
  } finally {
    await hub.stop();
  }
});

test("a hub without development tokens: the chat says how to turn them on", async () => {
  const hub = await startHub({ SWITCHBOARD__AUTH__DEV_TOKENS: "false" });
  try {
    await withBrowser("no-dev-tokens", async (browser) => {
      const page = await browser.newPage();
      await page.goto(`${hub.url}/`);
      await page.fill("#name", "erin");
      await page.click("#login-form button");
      await page.waitForFunction(() => document.querySelector('[data-testid="login-error"]').textContent !== "");
      const error = await page.textContent('[data-testid="login-error"]');
      assert.match(error, /auth\.dev_tokens = true/);
    });
  } finally {
    await hub.stop();
  }
});

test("at 390 px wide the chat fits the screen, long words and the room box included", async () => {
  const hub = await startHub();
  try {
    await withBrowser("phone-width", async (browser) => {
      const context = await browser.newContext({ viewport: { width: 390, height: 844 } });
      const page = await context.newPage();
      const overflow = () => page.evaluate(() => document.documentElement.scrollWidth - document.documentElement.clientWidth);
      await page.goto(`${hub.url}/`);
      assert.equal(await overflow(), 0, "the login screen scrolls sideways");
      await page.fill("#name", "a_rather_long_name_for_a_small_phone_screen");
      await page.click("#login-form button");
      await page.waitForFunction(() => window.switchboardChat?.sb?.state === "connected");
      await page.waitForSelector('[data-testid="rooms"] li');
      await say(page, `a-very-long-unbroken-word-${"x".repeat(120)}`);
      await seen(page, "a-very-long-unbroken-word");
      // A room through the box and its button.
      await page.fill("#room-name", "a.room.with.a.fairly.long.name.for.a.phone");
      await page.click('[data-testid="join"]');
      await page.waitForFunction(() => document.querySelector('[data-testid="room-title"]').textContent.includes("a.room.with"));
      assert.equal(await overflow(), 0, "the chat scrolls sideways at 390 px");
      for (const selector of ['[data-testid="text"]', '[data-testid="send"]', '[data-testid="join"]', '[data-testid="log"]']) {
        const box = await page.locator(selector).boundingBox();
        assert.ok(box && box.x >= 0 && box.x + box.width <= 390, `${selector} at ${JSON.stringify(box)}, outside 390 px`);
      }
    });
  } finally {
    await hub.stop();
  }
});

test("one's own messages are marked, others' are not", async () => {
  const hub = await startHub();
  try {
    await withBrowser("own-messages", async (browser) => {
      const alice = await chatAs(browser, hub, "alice");
      const bob = await chatAs(browser, hub, "bob");
      await say(alice, "from alice");
      await seen(bob, "from alice");
      await say(bob, "from bob");
      await seen(alice, "from bob");
      const marks = (page) => page.$$eval('[data-testid="log"] li.message', (lis) => lis.map((li) => ({
        text: li.querySelector(".text").textContent,
        own: li.classList.contains("own"),
        look: `${getComputedStyle(li).backgroundColor} ${getComputedStyle(li).borderLeftColor}`,
      })));
      for (const [page, me, other] of [[alice, "from alice", "from bob"], [bob, "from bob", "from alice"]]) {
        const lines = await marks(page);
        const mine = lines.find((l) => l.text === me);
        const theirs = lines.find((l) => l.text === other);
        assert.ok(mine?.own && theirs && !theirs.own, JSON.stringify(lines));
        assert.notEqual(mine.look, theirs.look, "an own message looks different");
      }
    });
  } finally {
    await hub.stop();
  }
});

test("the pages load without a console error or a missing file, and the room box checks names", async () => {
  const hub = await startHub();
  try {
    await withBrowser("clean-console", async (browser) => {
      const page = await browser.newPage();
      const problems = [];
      page.on("console", (m) => { if (m.type() === "error") problems.push(`console: ${m.text()}`); });
      page.on("pageerror", (e) => problems.push(`page error: ${e.message}`));
      page.on("response", (r) => { if (r.status() >= 400) problems.push(`${r.status()} ${r.url()}`); });
      await page.goto(`${hub.url}/`);
      await page.fill("#name", "fay");
      await page.click("#login-form button");
      await page.waitForFunction(() => window.switchboardChat?.sb?.state === "connected");
      const validity = await page.evaluate(() => {
        const input = document.querySelector("#room-name");
        return ["no spaces please", "news.eu-1:x"].map((v) => { input.value = v; return input.checkValidity(); });
      });
      assert.deepEqual(validity, [false, true], "the room box refuses a name with spaces and takes a good one");
      await page.goto(`${hub.url}/dashboard.html`);
      await page.waitForFunction(() => window.switchboardDashboard?.sb?.state === "connected");
      const icon = await page.$eval('link[rel="icon"]', (l) => l.href);
      const r = await fetch(icon);
      assert.equal(r.status, 200, `the favicon ${icon}`);
      assert.deepEqual(problems, []);
    });
  } finally {
    await hub.stop();
  }
});

test("the dashboard says what the API key is, and a hub without one says its API is closed", async () => {
  const hub = await startHub({ SWITCHBOARD__AUTH__API_KEYS: "" });
  try {
    await withBrowser("dashboard-no-key", async (browser) => {
      const page = await browser.newPage();
      await page.goto(`${hub.url}/dashboard.html`);
      const hint = await page.textContent('[data-testid="feed-hint"]');
      assert.match(hint, /demo-feed --api-key KEY/);
      assert.match(hint, /auth\.api_keys/);
      await page.fill('[data-testid="api-key"]', "some-key");
      await page.click('[data-testid="watch"]');
      await page.waitForFunction(() => document.querySelector('[data-testid="stats-error"]').textContent !== "");
      const error = await page.textContent('[data-testid="stats-error"]');
      assert.match(error, /admin API is closed/);
      assert.match(error, /auth\.api_keys/);
    });
  } finally {
    await hub.stop();
  }
});
