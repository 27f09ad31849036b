// The demo chat: a name, a development token from the hub, rooms, who is
// here, messages, a banner while the connection is down, and a marker for
// what was missed while away. Everything goes through the client library.
import { Switchboard } from "./js/switchboard.js";

const $ = (sel) => document.querySelector(sel);
const el = (tag, cls, text) => Object.assign(document.createElement(tag), { className: cls || "", textContent: text || "" });

const state = { sb: null, user: "", current: "lobby", rooms: new Map() };

/** A room's log (a list element kept while another room is shown) and who is in it. */
function room(name) {
  if (!state.rooms.has(name)) state.rooms.set(name, { log: [], people: new Map() });
  return state.rooms.get(name);
}

function time(ts) {
  return new Date(ts).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" });
}

function addLine(name, line) {
  const r = room(name);
  r.log.push(line);
  if (r.log.length > 500) r.log.shift();
  if (name === state.current) render();
}

function render() {
  const rooms = $('[data-testid="rooms"]');
  rooms.replaceChildren(...[...state.rooms.keys()].map((name) => {
    const li = el("li", name === state.current ? "current" : "", `# ${name}`);
    li.dataset.room = name;
    li.onclick = () => { state.current = name; render(); };
    return li;
  }));
  $('[data-testid="room-title"]').textContent = `# ${state.current}`;
  const r = room(state.current);
  const log = $('[data-testid="log"]');
  log.replaceChildren(...r.log.map((line) => line.cloneNode(true)));
  log.scrollTop = log.scrollHeight;
  $('[data-testid="people"]').replaceChildren(...[...r.people.entries()].map(([user, n]) =>
    el("li", "", n > 1 ? `${user} (${n})` : user)));
}

function messageLine(m) {
  const own = m.from === state.user;
  const li = el("li", own ? "message own" : "message");
  li.dataset.id = m.id;
  if (own) li.title = "sent by you";
  li.append(el("span", "from", m.from), el("span", "text", typeof m.data?.text === "string" ? m.data.text : JSON.stringify(m.data)), el("span", "time", time(m.ts)));
  return li;
}

async function refreshPresence(name) {
  try {
    const users = await state.sb.presence(name);
    room(name).people = new Map(users.map((u) => [u.user, u.connections]));
    if (name === state.current) render();
  } catch (e) {
    console.warn("presence", e);
  }
}

async function joinRoom(name) {
  room(name);
  state.current = name;
  render();
  try {
    await state.sb.join(name);
    await refreshPresence(name);
  } catch (e) {
    addLine(name, el("li", "system", `cannot join: ${e.message}`));
  }
}

/** A development token for `state.user`; a refusal throws the hub's own words. */
async function token() {
  let r;
  try {
    r = await fetch("/dev/token", {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ user: state.user }),
    });
  } catch {
    throw new Error("cannot reach the hub: is it running?");
  }
  if (r.ok) return (await r.json()).token;
  const body = await r.json().catch(() => null);
  throw new Error(body?.message || `the hub gave no token (HTTP ${r.status}): is auth.dev_tokens on?`);
}

function connect() {
  const sb = new Switchboard("/ws", { token });
  state.sb = sb;
  const banner = $('[data-testid="banner"]');
  sb.on("disconnected", (d) => {
    banner.textContent = d.willReconnect ? "Connection lost: reconnecting…" : `Disconnected: ${d.reason || d.code}`;
    banner.classList.add("shown");
  });
  sb.on("connected", () => banner.classList.remove("shown"));
  sb.on("closed", (d) => {
    banner.textContent = `Disconnected for good: ${d.reason || d.code}`;
    banner.classList.add("shown");
  });
  sb.on("message", (m) => addLine(m.room, messageLine(m)));
  sb.on("recovery", (r) => {
    const text = r.recovered ? "back online: what you missed follows" : "back online: some messages were lost (reload the page for the full history)";
    const marker = el("li", "marker", text);
    marker.dataset.testid = "missed-marker";
    addLine(r.room, marker);
    refreshPresence(r.room);
  });
  sb.on("joined", (p) => {
    const people = room(p.room).people;
    people.set(p.user, Math.max(1, people.get(p.user) || 0));
    if (p.user !== state.user) addLine(p.room, el("li", "system", `${p.user} joined`));
    else if (p.room === state.current) render();
  });
  sb.on("left", (p) => {
    room(p.room).people.delete(p.user);
    addLine(p.room, el("li", "system", `${p.user} left`));
  });
  sb.on("revoked", (r) => r.rooms.forEach((name) => addLine(name, el("li", "system", "you are no longer in this room"))));
  return sb;
}

$("#login-form").onsubmit = async (e) => {
  e.preventDefault();
  state.user = $("#name").value.trim();
  const error = $('[data-testid="login-error"]');
  error.textContent = "";
  try {
    await token();
  } catch (err) {
    error.textContent = err.message;
    return;
  }
  $('[data-testid="login"]').hidden = true;
  $('[data-testid="chat"]').hidden = false;
  $('[data-testid="who"]').textContent = `you are ${state.user}`;
  connect();
  await joinRoom("lobby");
};

$("#room-form").onsubmit = (e) => {
  e.preventDefault();
  const name = $("#room-name").value.trim();
  if (name) joinRoom(name);
  $("#room-name").value = "";
};

$("#say-form").onsubmit = async (e) => {
  e.preventDefault();
  const input = $("#text");
  const text = input.value.trim();
  if (!text) return;
  input.value = "";
  try {
    await state.sb.publish(state.current, { text });
  } catch (err) {
    addLine(state.current, el("li", "system", `not sent: ${err.message}`));
  }
};

// The tests read the client from here.
window.switchboardChat = state;
