// The browser bundle in a real browser (headless Chromium, with its own
// WebSocket): a page imports dist/switchboard.js as a static file, chats,
// gets refused, survives a hub restart. Skipped when no Chromium is installed
// (Debian: `apt-get install chromium`; or set CHROMIUM_BIN).
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { existsSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
import { once } from "node:events";
import http from "node:http";
import { tmpdir } from "node:os";
import path from "node:path";
import { test } from "node:test";
import { api, mintToken, startHub } from "./helpers.mjs";

const chromium = [process.env.CHROMIUM_BIN, "/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome"].find(
  (p) => p && existsSync(p),
);

const PAGE = `<!doctype html>
<meta charset="utf-8">
<title>switchboard browser test</title>
<script type="module">
  import { Switchboard, SwitchboardError } from "/js/switchboard.js";
  const params = new URLSearchParams(location.search);
  const out = { native: typeof WebSocket === "function" };
  const until = async (cond, what) => {
    for (let i = 0; i < 500; i++) { if (cond()) return; await new Promise((r) => setTimeout(r, 20)); }
    throw new Error("timed out waiting for " + what);
  };
  try {
    const sb = new Switchboard(params.get("hub"), { token: () => params.get("token"), backoffInitialMs: 100, backoffMaxMs: 400, goingAwayReconnectWindowMs: 1000 });
    const got = [];
    const events = [];
    sb.on("message", (m) => got.push(m.data.text));
    sb.on("recovery", (r) => events.push(["recovery", r.recovered]));
    sb.on("disconnected", (d) => events.push(["disconnected", d.code, d.reason]));
    sb.on("connected", (c) => events.push(["connected", c.reconnected]));
    await sb.ready(5000);
    out.user = sb.user;
    await sb.join("browser");
    out.id = await sb.publish("browser", { text: "from the page" });
    await fetch("/publish", { method: "POST" });
    await until(() => got.length === 2, "two messages");
    try { await sb.publish("elsewhere", {}); } catch (e) { out.refused = [e instanceof SwitchboardError, e.code]; }
    await fetch("/restart", { method: "POST" });
    await until(() => events.some((e) => e[0] === "recovery"), "the rejoin");
    await sb.publish("browser", { text: "after the restart" });
    await until(() => got.length === 3, "the third message");
    out.got = got;
    out.events = events;
    await sb.close();
    out.state = sb.state;
  } catch (e) {
    out.error = String((e && e.stack) || e);
  }
  await fetch("/result", { method: "POST", body: JSON.stringify(out) });
</script>`;

test("in Chromium: the static bundle chats, is refused, survives a hub restart", { skip: !chromium && "no Chromium installed" }, async () => {
  let hub = await startHub();
  const hubPort = hub.port;
  const bundle = readFileSync(new URL("../dist/switchboard.js", import.meta.url));
  let resolveResult;
  const result = new Promise((resolve) => (resolveResult = resolve));
  const server = http.createServer(async (req, res) => {
    const url = new URL(req.url, "http://x");
    let body = "";
    for await (const chunk of req) body += chunk;
    try {
      if (url.pathname === "/js/switchboard.js") {
        res.writeHead(200, { "content-type": "text/javascript" }).end(bundle);
      } else if (url.pathname === "/page.html") {
        res.writeHead(200, { "content-type": "text/html" }).end(PAGE);
      } else if (url.pathname === "/publish") {
        await api(hub, "POST", "/api/publish", { room: "browser", data: { text: "from the backend" } });
        res.writeHead(204).end();
      } else if (url.pathname === "/restart") {
        await hub.stop();
        hub = await startHub({ port: hubPort });
        res.writeHead(204).end();
      } else if (url.pathname === "/result") {
        res.writeHead(204).end();
        resolveResult(JSON.parse(body));
      } else {
        res.writeHead(404).end();
      }
    } catch (e) {
      res.writeHead(500).end(String(e));
    }
  });
  server.listen(0, "127.0.0.1");
  await once(server, "listening");
  const pageUrl = new URL(`http://127.0.0.1:${server.address().port}/page.html`);
  pageUrl.searchParams.set("hub", hub.ws);
  pageUrl.searchParams.set("token", mintToken("brenda"));
  const profile = mkdtempSync(path.join(tmpdir(), "sb-chromium-"));
  const browser = spawn(
    chromium,
    [
      "--headless=new",
      "--no-sandbox",
      "--disable-gpu",
      "--disable-dev-shm-usage",
      "--no-first-run",
      "--no-default-browser-check",
      `--user-data-dir=${profile}`,
      pageUrl.toString(),
    ],
    { stdio: "ignore" },
  );
  try {
    let timer;
    const out = await Promise.race([
      result,
      new Promise((_, reject) => {
        timer = setTimeout(() => reject(new Error("no result from the page within 60 s")), 60_000);
      }),
    ]).finally(() => clearTimeout(timer));
    assert.equal(out.error, undefined, out.error);
    assert.equal(out.native, true);
    assert.equal(out.user, "brenda");
    assert.match(out.id, /^\d+-\d+$/);
    assert.deepEqual(out.refused, [true, "forbidden"]);
    assert.deepEqual(out.got, ["from the page", "from the backend", "after the restart"]);
    assert.deepEqual(out.events[0], ["connected", false]);
    assert.deepEqual(out.events[1], ["disconnected", 1001, "going away"]);
    assert.ok(out.events.some((e) => e[0] === "connected" && e[1] === true));
    assert.ok(out.events.some((e) => e[0] === "recovery" && e[1] === false)); // a new memory hub has no history
    assert.equal(out.state, "closed");
  } finally {
    if (browser.exitCode === null) process.kill(browser.pid, "SIGKILL");
    await once(browser, "exit").catch(() => {});
    await new Promise((resolve) => server.close(resolve));
    server.closeAllConnections?.();
    await hub.stop();
    rmSync(profile, { recursive: true, force: true });
  }
});
