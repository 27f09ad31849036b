// The demo dashboard: a room fed by the server (`switchboard demo-feed`)
// drawn as a live line chart, and, once an API key is typed in, this
// instance's numbers from /api/stats and /metrics over time.
import { Switchboard } from "./js/switchboard.js";

const $ = (sel) => document.querySelector(sel);
const ROOM = new URLSearchParams(location.search).get("room") || "metrics";
const KEEP = 300;
const uPlot = window.uPlot;

/** A uPlot chart: time on x, one y axis per distinct scale of `series`. */
function chart(target, series, height) {
  const width = Math.max(320, target.clientWidth || 900);
  const scales = [...new Set(series.map((s) => s.scale || "y"))];
  const axes = [{}, ...scales.map((scale, i) => ({
    scale,
    side: i === 0 ? 3 : 1,
    label: series.find((s) => (s.scale || "y") === scale).label,
    grid: { show: i === 0 },
  }))];
  const opts = { width, height, series: [{}, ...series], axes, scales: { x: { time: true } } };
  return new uPlot(opts, [[], ...series.map(() => [])], target);
}

// ---- the fed room ---------------------------------------------------------
const feed = { times: [], values: [] };
const feedChart = chart($('[data-testid="chart"]'), [{ label: "value", stroke: "#3a5ccc", width: 2 }], 260);

function addPoint(t, value) {
  feed.times.push(t / 1000);
  feed.values.push(value);
  if (feed.times.length > KEEP) {
    feed.times.shift();
    feed.values.shift();
  }
  feedChart.setData([feed.times, feed.values]);
  $('[data-testid="points"]').textContent = String(feed.times.length);
}

async function token() {
  const r = await fetch("/dev/token", {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ user: `dashboard-${Math.random().toString(36).slice(2, 8)}` }),
  });
  if (!r.ok) throw new Error((await r.json().catch(() => null))?.message || `no development token (HTTP ${r.status}): is auth.dev_tokens on?`);
  return (await r.json()).token;
}

const sb = new Switchboard("/ws", { token });
const banner = $('[data-testid="banner"]');
sb.on("connected", () => {
  banner.classList.remove("shown");
  $('[data-testid="feed-state"]').textContent = `watching #${ROOM}`;
});
sb.on("disconnected", (d) => {
  banner.textContent = d.willReconnect ? "Connection lost: reconnecting…" : `Disconnected: ${d.reason || d.code}`;
  banner.classList.add("shown");
});
sb.on("error", (e) => {
  $('[data-testid="feed-state"]').textContent = e.error?.message || String(e.error);
});
sb.on("message", (m) => {
  if (m.room === ROOM && typeof m.data?.value === "number") addPoint(m.data.t ?? m.ts, m.data.value);
});
$('[data-testid="feed-room"]').textContent = ROOM;
sb.join(ROOM).catch((e) => { $('[data-testid="feed-state"]').textContent = `cannot join: ${e.message}`; });

// ---- this instance --------------------------------------------------------
/** `name{labels} value` lines of the Prometheus text format. */
function parseMetrics(text) {
  const samples = [];
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const m = line.match(/^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)/);
    if (m) samples.push({ name: m[1], labels: m[2] || "", value: Number(m[3]) });
  }
  return samples;
}

function sum(samples, name) {
  return samples.filter((s) => s.name === name).reduce((a, s) => a + s.value, 0);
}

/** Latency buckets: le → cumulative count. */
function buckets(samples) {
  const out = new Map();
  for (const s of samples.filter((s) => s.name === "switchboard_delivery_latency_seconds_bucket")) {
    const le = s.labels.match(/le="([^"]+)"/)?.[1];
    if (le) out.set(le === "+Inf" ? Infinity : Number(le), s.value);
  }
  return out;
}

/** The 99th percentile (seconds) of what the buckets gained since `before`. */
function p99(before, after) {
  const les = [...after.keys()].sort((a, b) => a - b);
  const delta = (le) => (after.get(le) || 0) - (before.get(le) || 0);
  const total = delta(Infinity);
  if (total <= 0) return null;
  return les.find((le) => delta(le) >= 0.99 * total) ?? null;
}

const history = { times: [], rate: [], p99: [] };
const statsChart = chart($('[data-testid="stats-chart"]'), [
  { label: "deliveries/s", stroke: "#3a5ccc", scale: "rate" },
  { label: "p99 ms", stroke: "#b54708", scale: "ms" },
], 180);
let last = null;
let timer = null;

async function sample(key) {
  const [stats, metrics] = await Promise.all([
    fetch("/api/stats", { headers: { authorization: `Bearer ${key}` } }),
    fetch("/metrics"),
  ]);
  if (!stats.ok) {
    // The hub says what is wrong (no key configured, or not this one).
    const body = await stats.json().catch(() => null);
    throw new Error(body?.message || `/api/stats answered HTTP ${stats.status}`);
  }
  const s = await stats.json();
  $('[data-testid="stat-connections"]').textContent = String(s.connections);
  $('[data-testid="stat-cluster"]').textContent = String(s.cluster_connections);
  $('[data-testid="stat-rooms"]').textContent = String(s.rooms);
  $('[data-testid="stat-instance"]').textContent = s.instance;
  const samples = parseMetrics(await metrics.text());
  const now = { t: Date.now() / 1000, delivered: sum(samples, "switchboard_messages_delivered_total"), buckets: buckets(samples) };
  if (last) {
    const dt = Math.max(0.001, now.t - last.t);
    const rate = (now.delivered - last.delivered) / dt;
    const q = p99(last.buckets, now.buckets);
    $('[data-testid="stat-rate"]').textContent = rate.toFixed(0);
    $('[data-testid="stat-p99"]').textContent = q === null ? "–" : q === Infinity ? "> 5000" : (q * 1000).toFixed(q < 0.001 ? 2 : 1);
    history.times.push(now.t);
    history.rate.push(rate);
    history.p99.push(q === null || q === Infinity ? null : q * 1000);
    if (history.times.length > KEEP) Object.values(history).forEach((a) => a.shift());
    statsChart.setData([history.times, history.rate, history.p99]);
  }
  last = now;
}

$("#key-form").onsubmit = (e) => {
  e.preventDefault();
  const key = $("#api-key").value.trim();
  if (timer) clearInterval(timer);
  timer = null;
  last = null;
  if (!key) {
    $('[data-testid="stats-error"]').textContent = "type an API key from the hub's auth.api_keys";
    return;
  }
  const tick = () => sample(key).then(
    () => { $('[data-testid="stats-error"]').textContent = ""; },
    (err) => { $('[data-testid="stats-error"]').textContent = err.message; },
  );
  tick();
  timer = setInterval(tick, 2000);
};

window.switchboardDashboard = { sb, feed, history };
