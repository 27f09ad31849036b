// Test helpers: a real hub as a child process, a Redis to run it on, tokens,
// the HTTP API, a TCP proxy that can cut the client off, and small waiting
// utilities.
import { execFile, spawn } from "node:child_process";
import { createHmac } from "node:crypto";
import { once } from "node:events";
import { existsSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import net from "node:net";
import { tmpdir } from "node:os";
import path from "node:path";
import { createInterface } from "node:readline";
import { fileURLToPath } from "node:url";
import WebSocket from "ws";

export { WebSocket };

const pkgDir = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..");
export const HUB_BIN = path.resolve(
  pkgDir,
  process.env.SWITCHBOARD_BIN ?? path.join("..", "..", "target", "debug", "switchboard"),
);
export const SECRET = "js-client-test-secret";
export const API_KEY = "js-client-test-key";

const BASE_CONFIG = `
[server]
static_dir = ""
shutdown_grace_s = 2

[tasks.handlers.echo]
kind = "echo"
`;

/**
 * Starts `switchboard serve` on 127.0.0.1 (port 0 unless given) and resolves
 * once it printed `listening on HOST:PORT`. `env`: more environment variables
 * (`SWITCHBOARD__BROKER__KIND`, `SWITCHBOARD__REDIS__URL`, …).
 */
export async function startHub({ port = 0, extraConfig = "", env: extraEnv = {} } = {}) {
  if (!existsSync(HUB_BIN)) {
    throw new Error(`no hub binary at ${HUB_BIN}: run \`cargo build\` at the repository root or set SWITCHBOARD_BIN`);
  }
  const dir = mkdtempSync(path.join(tmpdir(), "sb-js-"));
  const config = path.join(dir, "hub.toml");
  writeFileSync(config, BASE_CONFIG + extraConfig);
  const env = {
    ...process.env,
    SWITCHBOARD__SERVER__HOST: "127.0.0.1",
    SWITCHBOARD__SERVER__PORT: String(port),
    SWITCHBOARD__AUTH__JWT_SECRET: SECRET,
    SWITCHBOARD__AUTH__API_KEYS: API_KEY,
    RUST_LOG: process.env.RUST_LOG ?? "warn",
    ...extraEnv,
  };
  const proc = spawn(HUB_BIN, ["serve", "--config", config], { env, stdio: ["ignore", "pipe", "pipe"] });
  let stderr = "";
  proc.stderr.on("data", (d) => {
    stderr = (stderr + d).slice(-8000);
  });
  const exited = once(proc, "exit");
  const lines = createInterface({ input: proc.stdout });
  const listening = new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`hub did not start within 15 s:\n${stderr}`)), 15_000);
    lines.on("line", (line) => {
      const m = /listening on (\S+):(\d+)/.exec(line);
      if (m) {
        clearTimeout(timer);
        resolve(Number(m[2]));
      }
    });
    proc.on("exit", (code) => {
      clearTimeout(timer);
      reject(new Error(`hub exited (${code}) before listening:\n${stderr}`));
    });
  });
  const actualPort = await listening;
  const hub = {
    proc,
    port: actualPort,
    http: `http://127.0.0.1:${actualPort}`,
    ws: `ws://127.0.0.1:${actualPort}/ws`,
    get stderr() {
      return stderr;
    },
    /** SIGTERM (every session gets 1001 going away) and wait for the exit. */
    async stop() {
      if (proc.exitCode === null && proc.signalCode === null) process.kill(proc.pid, "SIGTERM");
      const timer = setTimeout(() => {
        if (proc.exitCode === null && proc.signalCode === null) process.kill(proc.pid, "SIGKILL");
      }, 10_000);
      await exited;
      clearTimeout(timer);
      rmSync(dir, { recursive: true, force: true });
    },
  };
  return hub;
}

function b64url(buf) {
  return Buffer.from(buf).toString("base64url");
}

/** An HS256 JWT for `user`, signed with the tests' secret. */
export function mintToken(user, { ttlS = 3600, rooms, publish } = {}) {
  const now = Math.floor(Date.now() / 1000);
  const claims = { sub: user, iat: now, exp: now + ttlS };
  if (rooms) claims.rooms = rooms;
  if (publish) claims.publish = publish;
  const head = b64url(JSON.stringify({ alg: "HS256", typ: "JWT" }));
  const body = b64url(JSON.stringify(claims));
  const sig = createHmac("sha256", SECRET).update(`${head}.${body}`).digest("base64url");
  return `${head}.${body}.${sig}`;
}

/** Calls the hub's admin API with the tests' key. */
export async function api(hub, method, urlPath, body) {
  const res = await fetch(hub.http + urlPath, {
    method,
    headers: { authorization: `Bearer ${API_KEY}`, "content-type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await res.text();
  if (!res.ok) throw new Error(`${method} ${urlPath}: ${res.status} ${text}`);
  return text ? JSON.parse(text) : null;
}

export const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** Polls `fn` until it returns a truthy value. */
export async function waitFor(fn, { timeoutMs = 10_000, what = "condition" } = {}) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const v = await fn();
    if (v) return v;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(20);
  }
}

/** Resolves with the detail of the next `type` event (matching `pred`) of an EventTarget. */
export function nextEvent(target, type, { pred = () => true, timeoutMs = 10_000 } = {}) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      target.removeEventListener(type, listener);
      reject(new Error(`no ${type} event within ${timeoutMs} ms`));
    }, timeoutMs);
    const listener = (ev) => {
      if (!pred(ev.detail)) return;
      clearTimeout(timer);
      target.removeEventListener(type, listener);
      resolve(ev.detail);
    };
    target.addEventListener(type, listener);
  });
}

/** Records every event of the given types, in order, as `{ type, detail, at }`. */
export function record(target, types) {
  const log = [];
  for (const type of types) {
    target.addEventListener(type, (ev) => log.push({ type, detail: ev.detail, at: Date.now() }));
  }
  return log;
}

/**
 * A TCP proxy to 127.0.0.1:`targetPort`: `cut()` destroys every connection
 * and refuses new ones (as a dead network would) until `restore()`.
 */
export async function startProxy(targetPort) {
  const sockets = new Set();
  let blocked = false;
  const server = net.createServer((client) => {
    if (blocked) {
      client.destroy();
      return;
    }
    const upstream = net.connect(targetPort, "127.0.0.1");
    for (const s of [client, upstream]) {
      sockets.add(s);
      s.on("close", () => sockets.delete(s));
      s.on("error", () => {});
    }
    client.on("close", () => upstream.destroy());
    upstream.on("close", () => client.destroy());
    client.pipe(upstream);
    upstream.pipe(client);
  });
  server.listen(0, "127.0.0.1");
  await once(server, "listening");
  const port = server.address().port;
  return {
    port,
    ws: `ws://127.0.0.1:${port}/ws`,
    cut() {
      blocked = true;
      for (const s of sockets) s.destroy();
    },
    restore() {
      blocked = false;
    },
    async close() {
      blocked = true;
      for (const s of sockets) s.destroy();
      await new Promise((resolve) => server.close(resolve));
    },
  };
}

/** Where a program is on the PATH, or undefined. */
function which(name) {
  for (const dir of (process.env.PATH ?? "").split(path.delimiter)) {
    const p = path.join(dir, name);
    if (dir && existsSync(p)) return p;
  }
  return undefined;
}

/** Runs `redis-cli -u url args…`; resolves with its output, trimmed (an error reply rejects). */
export function redisCli(url, ...args) {
  return new Promise((resolve, reject) => {
    execFile("redis-cli", ["-u", url, ...args], { timeout: 10_000 }, (err, stdout, stderr) => {
      const out = String(stdout).trim();
      if (err || /^(ERR|WRONGTYPE|NOAUTH|Could not connect)/.test(out)) {
        reject(new Error(`redis-cli ${args.join(" ")}: ${err?.message ?? ""} ${out} ${stderr}`.trim()));
      } else {
        resolve(out);
      }
    });
  });
}

/**
 * A Redis for a test that disturbs it (`CLIENT PAUSE`, …): a private
 * `redis-server` on a free port when one is installed (`$REDIS_SERVER_BIN`
 * or on the PATH), so that nothing else sharing a Redis is disturbed; else
 * the one at `$REDIS_URL`. `null` (skip the test) when there is neither, or
 * no `redis-cli` to drive it. `stop()` kills the private server by its PID.
 */
export async function startRedis() {
  if (!which("redis-cli")) return null;
  const bin = process.env.REDIS_SERVER_BIN ?? which("redis-server");
  if (!bin) {
    const url = process.env.REDIS_URL;
    if (!url) return null;
    await redisCli(url, "PING");
    return { url, private: false, async stop() {} };
  }
  const probe = net.createServer().listen(0, "127.0.0.1");
  await once(probe, "listening");
  const port = probe.address().port;
  await new Promise((resolve) => probe.close(resolve));
  const dir = mkdtempSync(path.join(tmpdir(), "sb-js-redis-"));
  const proc = spawn(bin, ["--port", String(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", dir], {
    stdio: "ignore",
  });
  const exited = once(proc, "exit");
  const url = `redis://127.0.0.1:${port}`;
  const stop = async () => {
    if (proc.exitCode === null && proc.signalCode === null) process.kill(proc.pid, "SIGKILL");
    await exited;
    rmSync(dir, { recursive: true, force: true });
  };
  try {
    await waitFor(() => redisCli(url, "PING").then((r) => r === "PONG", () => false), { timeoutMs: 10_000, what: `redis-server on ${port}` });
  } catch (e) {
    await stop();
    throw e;
  }
  return { url, private: true, stop };
}
