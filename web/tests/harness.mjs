// What the browser tests share: starting hubs (real `switchboard serve`
// processes serving this folder), a headless Chromium through
// playwright-core, and a screenshot of every page when a test fails.
import { spawn } from "node:child_process";
import { createInterface } from "node:readline";
import { mkdirSync } from "node:fs";
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

/** Starts a hub; resolves once it listens. `env` adds SWITCHBOARD__… keys. */
/** The environment of a child process, without a config file named in it. */
function childEnv(extra) {
  const env = { ...process.env, RUST_LOG: "warn", ...extra };
  delete env.SWITCHBOARD_CONFIG;
  return env;
}

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
