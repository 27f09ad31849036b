// What the browser tests share: starting hubs (real `switchboard serve`
// processes serving this folder), a headless Chromium through
// playwright-core, and a screenshot of every page when a test fails.
import { spawn } from "node:child_process";
import { createInterface } from "node:readline";
import { mkdirSync } from "node:fs";
import net from "node:net";
import { fileURLToPath } from "node:url";
import path from "node:path";
import { chromium } from "playwright-core";

const here = path.dirname(fileURLToPath(import.meta.url));
export const webDir = path.resolve(here, "..");
const root = path.resolve(webDir, "..");
export const BIN = process.env.SWITCHBOARD_BIN || path.join(root, "target/debug/switchboard");
export const API_KEY = "web-test-key";
const SECRET = "web-test-secret";
const screenshots = path.join(root, "target/screenshots");

/** The environment of a child process, without a config file named in it. */
function childEnv(extra) {
  const env = { ...process.env, RUST_LOG: "warn", ...extra };
  delete env.SWITCHBOARD_CONFIG;
  return env;
}

/** Starts a hub; resolves once it listens. `env` adds SWITCHBOARD__… keys. */
export function startHub(env = {}) {
  const child = spawn(BIN, ["serve"], {
    env: childEnv({
      SWITCHBOARD__SERVER__HOST: "127.0.0.1",
      SWITCHBOARD__SERVER__PORT: "0",
      SWITCHBOARD__SERVER__STATIC_DIR: webDir,
      SWITCHBOARD__SERVER__WORKERS: "2",
      SWITCHBOARD__AUTH__JWT_SECRET: SECRET,
      SWITCHBOARD__AUTH__API_KEYS: API_KEY,
      SWITCHBOARD__AUTH__DEV_TOKENS: "true",
      ...env,
    }),
    stdio: ["ignore", "pipe", "inherit"],
  });
  return new Promise((resolve, reject) => {
    const lines = createInterface({ input: child.stdout });
    const timer = setTimeout(() => reject(new Error("hub did not start")), 15000);
    lines.once("line", (line) => {
      clearTimeout(timer);
      const port = Number(line.trim().split(":").pop());
      if (!port) return reject(new Error(`hub said ${line}`));
      const url = `http://127.0.0.1:${port}`;
      const stop = () => new Promise((done) => {
        if (child.exitCode !== null) return done();
        child.once("exit", done);
        child.kill("SIGTERM");
      });
      resolve({ port, url, child, stop });
    });
    child.once("exit", (code) => reject(new Error(`hub exited ${code}`)));
  });
}

/** Runs a `switchboard` subcommand in the background (e.g. demo-feed). */
export function run(args, env = {}) {
  const child = spawn(BIN, args, { env: childEnv(env), stdio: "ignore" });
  return { child, stop: () => child.kill("SIGTERM") };
}

export async function launch() {
  return chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync"],
  });
}

/** Runs `body(browser)`; on failure saves a screenshot of every open page. */
export async function withBrowser(name, body) {
  const browser = await launch();
  try {
    await body(browser);
  } catch (e) {
    mkdirSync(screenshots, { recursive: true });
    let n = 0;
    for (const context of browser.contexts()) {
      for (const page of context.pages()) {
        const file = path.join(screenshots, `${name}-${n++}.png`);
        await page.screenshot({ path: file, fullPage: true }).catch(() => {});
        console.error(`screenshot: ${file}`);
      }
    }
    throw e;
  } finally {
    await browser.close();
  }
}

/** Opens the chat as `user` (a fresh context: its own storage). */
export async function chatAs(browser, hub, user) {
  const page = await (await browser.newContext()).newPage();
  await page.goto(`${hub.url}/`);
  await page.fill("#name", user);
  await page.click('#login-form button');
  await page.waitForSelector('[data-testid="chat"]:not([hidden])');
  await page.waitForFunction(() => window.switchboardChat?.sb?.state === "connected");
  return page;
}

export async function say(page, text) {
  await page.fill('[data-testid="text"]', text);
  await page.click('[data-testid="send"]');
}

/** Waits until the shown room's log has a line containing `text`. */
export function seen(page, text, timeout = 10000) {
  return page.waitForFunction(
    (t) => [...document.querySelectorAll('[data-testid="log"] li')].some((li) => li.textContent.includes(t)),
    text,
    { timeout },
  );
}

export async function api(hub, method, path, body) {
  const r = await fetch(`${hub.url}${path}`, {
    method,
    headers: { authorization: `Bearer ${API_KEY}`, "content-type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  return { status: r.status, body: await r.json().catch(() => null) };
}

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// ---- Redis: a prefix of the test's own, deleted at its end ----------------

export const REDIS_URL = process.env.REDIS_URL || "redis://127.0.0.1:6379";

/**
 * The environment of hubs sharing a Redis prefix no other test uses, and
 * `cleanup()`, which deletes every key under it (call it once the hubs have
 * stopped: the shared Redis keeps nothing of the test).
 */
export function redisCluster() {
  const prefix = `webtest-${process.pid}-${Date.now()}-${Math.random().toString(36).slice(2, 8)}`;
  return {
    prefix,
    env: {
      SWITCHBOARD__BROKER__KIND: "redis",
      SWITCHBOARD__REDIS__URL: REDIS_URL,
      SWITCHBOARD__REDIS__PREFIX: prefix,
    },
    cleanup: () => deleteRedisPrefix(REDIS_URL, prefix),
  };
}

/** Deletes every key `prefix:*` (SCAN, then DEL); the number deleted. */
export async function deleteRedisPrefix(url, prefix) {
  const redis = await redisConnect(url);
  try {
    let cursor = "0";
    let deleted = 0;
    do {
      const [next, keys] = await redis.call("SCAN", cursor, "MATCH", `${prefix}:*`, "COUNT", "1000");
      cursor = next;
      if (keys.length) deleted += await redis.call("DEL", ...keys);
    } while (cursor !== "0");
    return deleted;
  } finally {
    redis.close();
  }
}

/** The keys under `prefix:*` (for the tests' own checks). */
export async function redisKeys(url, prefix) {
  const redis = await redisConnect(url);
  try {
    const found = [];
    let cursor = "0";
    do {
      const [next, keys] = await redis.call("SCAN", cursor, "MATCH", `${prefix}:*`, "COUNT", "1000");
      cursor = next;
      found.push(...keys);
    } while (cursor !== "0");
    return found;
  } finally {
    redis.close();
  }
}

/**
 * A minimal Redis client (RESP2 over a socket, one command at a time): the
 * tests need SCAN and DEL only, not a dependency.
 */
async function redisConnect(url) {
  const u = new URL(url);
  const socket = net.connect(Number(u.port || 6379), u.hostname || "127.0.0.1");
  await new Promise((resolve, reject) => {
    socket.once("connect", resolve);
    socket.once("error", reject);
  });
  let buffer = Buffer.alloc(0);
  let waiting = null;
  socket.on("data", (chunk) => {
    buffer = Buffer.concat([buffer, chunk]);
    if (!waiting) return;
    const parsed = parseReply(buffer, 0);
    if (!parsed) return;
    buffer = buffer.subarray(parsed.end);
    const { resolve, reject } = waiting;
    waiting = null;
    if (parsed.value instanceof Error) reject(parsed.value);
    else resolve(parsed.value);
  });
  socket.on("error", (e) => waiting?.reject(e));
  const call = (...args) => new Promise((resolve, reject) => {
    waiting = { resolve, reject };
    const parts = [`*${args.length}\r\n`];
    for (const a of args) parts.push(`$${Buffer.byteLength(String(a))}\r\n${a}\r\n`);
    socket.write(parts.join(""));
  });
  if (u.password) await call("AUTH", ...(u.username ? [decodeURIComponent(u.username)] : []), decodeURIComponent(u.password));
  const db = u.pathname.replace("/", "");
  if (db) await call("SELECT", db);
  return { call, close: () => socket.end() };
}

/** One RESP2 reply at `at`: { value, end }, or null while incomplete. */
function parseReply(buf, at) {
  const eol = buf.indexOf("\r\n", at);
  if (eol < 0) return null;
  const head = buf.toString("utf8", at + 1, eol);
  const next = eol + 2;
  switch (String.fromCharCode(buf[at])) {
    case "+": return { value: head, end: next };
    case "-": return { value: new Error(`redis: ${head}`), end: next };
    case ":": return { value: Number(head), end: next };
    case "$": {
      const len = Number(head);
      if (len < 0) return { value: null, end: next };
      if (buf.length < next + len + 2) return null;
      return { value: buf.toString("utf8", next, next + len), end: next + len + 2 };
    }
    case "*": {
      const n = Number(head);
      const items = [];
      let end = next;
      for (let i = 0; i < n; i++) {
        const item = parseReply(buf, end);
        if (!item) return null;
        items.push(item.value);
        end = item.end;
      }
      return { value: items, end };
    }
    default: return { value: new Error(`redis: unexpected reply ${head}`), end: next };
  }
}
