/**
 * Switchboard client for browsers and Node 20+.
 *
 * One file, no imports, no runtime dependency: the build output
 * (`dist/switchboard.js`) is loaded as is by a static page.
 *
 * - reconnects with exponential backoff and full jitter, except after the
 *   closes that must not be retried (1008 `unauthorized`, `kicked`,
 *   `forbidden origin`, `connection limit` after a few tries); after a 1001
 *   (`going away`: the instance drains) the first retry waits a random delay
 *   in a window, so that a whole instance's clients do not land on the
 *   others at once;
 * - remembers the last message id of every room, rejoins with `since` and
 *   never hands the same message to the app twice;
 * - asks a token function for a token on every connect and shortly before
 *   the current one expires (sent as `refresh`);
 * - every request is a promise settled by the reply with the same `ref`;
 *   a request that times out while it still waits in the client (offline
 *   queue, pacing buffer) is taken back and never sent;
 * - every `publish` carries an `idempotency_key` (the caller's, or a fresh
 *   one), so it is safe to send again: after an `unavailable` answer it is
 *   resent with backoff, and a publish in flight when the connection drops
 *   is resent after the reconnect, within its time-out; the hub stores and
 *   delivers it once.
 */
/** An `Event` with a `detail`, like `CustomEvent` (which Node 20 lacks in some set-ups). */
export class SwitchboardEvent extends Event {
    constructor(type, detail) {
        super(type);
        this.detail = detail;
    }
}
/**
 * A refused or failed request. `code` is the hub's error code (`bad_request`, `forbidden`,
 * `limit_exceeded`, `rate_limited`, `not_found`, `unavailable`, `internal`) or one of the client's:
 * `timeout`, `disconnected` (the connection went down before the reply), `closed`
 * (the client was closed, or gave up reconnecting), `queue_full` (too many requests wait
 * for the connection, or for the pacing while connected), `offline`
 * (disconnected with the `reject` policy), `cancelled` (a join undone by `leave`).
 */
export class SwitchboardError extends Error {
    constructor(code, message, frame) {
        super(message);
        this.name = "SwitchboardError";
        this.code = code;
        this.frame = frame;
    }
}
const MAX_TIMER_MS = 2147483647;
/** A publish answered `unavailable` is resent after a backoff: 100 ms, doubling, capped at 2 s (half of it jitter). */
const RESEND_INITIAL_MS = 100;
const RESEND_MAX_MS = 2000;
/**
 * No attempt starts later than this after the first one went out: the hub keeps an idempotency
 * key 120 s from the first publish that carried it, and a resend after that could be stored twice.
 */
const RESEND_WINDOW_MS = 100000;
const NEVER_RETRY_1008 = new Set(["unauthorized", "kicked", "forbidden origin"]);
/** Compares two message ids `{ms}-{seq}` as the pair (ms, seq), numerically. */
export function compareIds(a, b) {
    const [am, as] = splitId(a);
    const [bm, bs] = splitId(b);
    if (am !== bm)
        return am < bm ? -1 : 1;
    if (as !== bs)
        return as < bs ? -1 : 1;
    return 0;
}
function splitId(id) {
    const dash = id.indexOf("-");
    if (dash < 0)
        return [Number(id) || 0, 0];
    return [Number(id.slice(0, dash)) || 0, Number(id.slice(dash + 1)) || 0];
}
/** The payload of a JWT, decoded without verifying it (the hub verifies). Undefined if it is not a JWT. */
export function decodeJwt(token) {
    const part = token.split(".")[1];
    if (!part)
        return undefined;
    try {
        let b64 = part.replace(/-/g, "+").replace(/_/g, "/");
        while (b64.length % 4)
            b64 += "=";
        const bin = atob(b64);
        const bytes = new Uint8Array(bin.length);
        for (let i = 0; i < bin.length; i++)
            bytes[i] = bin.charCodeAt(i);
        const claims = JSON.parse(new TextDecoder().decode(bytes));
        return claims && typeof claims === "object" ? claims : undefined;
    }
    catch {
        return undefined;
    }
}
/** A fresh idempotency key: `crypto.randomUUID()`, else 32 random hex digits. */
function newIdempotencyKey() {
    const c = globalThis.crypto;
    if (typeof c?.randomUUID === "function")
        return c.randomUUID();
    const bytes = new Uint8Array(16);
    if (typeof c?.getRandomValues === "function")
        c.getRandomValues(bytes);
    else
        for (let i = 0; i < bytes.length; i++)
            bytes[i] = Math.floor(Math.random() * 256);
    return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}
/** What is wrong with an idempotency key (the hub wants 1–256 bytes of UTF-8), or undefined. */
function idempotencyKeyProblem(key) {
    if (typeof key !== "string")
        return `idempotencyKey must be a string, not ${key === null ? "null" : typeof key}`;
    // A lone surrogate has no UTF-8 form (the hub would refuse the frame's JSON).
    if (/\p{Surrogate}/u.test(key))
        return "idempotencyKey must be valid Unicode text (it holds a lone surrogate)";
    const bytes = new TextEncoder().encode(key).length;
    if (bytes < 1 || bytes > 256)
        return `idempotencyKey must be 1–256 bytes of UTF-8, not ${bytes}`;
    return undefined;
}
function toText(data) {
    if (typeof data === "string")
        return data;
    if (data instanceof ArrayBuffer)
        return new TextDecoder().decode(data);
    if (ArrayBuffer.isView(data))
        return new TextDecoder().decode(data);
    return String(data);
}
function socketUrl(url) {
    const base = globalThis.location?.href;
    const u = new URL(url, base);
    if (u.protocol === "http:")
        u.protocol = "ws:";
    else if (u.protocol === "https:")
        u.protocol = "wss:";
    if (u.protocol !== "ws:" && u.protocol !== "wss:") {
        throw new TypeError(`Switchboard: not a WebSocket URL: ${url}`);
    }
    if (u.pathname === "/" || u.pathname === "")
        u.pathname = "/ws";
    return u;
}
// --------------------------------------------------------------- client --
/**
 * A connection to a Switchboard hub that survives disconnects.
 *
 * ```js
 * const sb = new Switchboard("wss://hub.example.com/ws", { token: () => fetchToken() });
 * sb.on("message", (m) => console.log(m.room, m.from, m.data));
 * await sb.join("lobby");
 * await sb.publish("lobby", { text: "hello" });
 * ```
 */
export class Switchboard extends EventTarget {
    constructor(url, options) {
        super();
        this._state = "idle";
        this.ws = null;
        /** Bumped on every attempt and on close(): late events of an old socket are ignored. */
        this.gen = 0;
        this.nextRef = 1;
        this.pending = new Map();
        this.outbox = [];
        /** Publishes waiting out the backoff before they are resent (after `unavailable`). */
        this.backingOff = new Set();
        this.rooms = new Map();
        this.taskWatchers = new Map();
        this.failures = 0;
        this.connectionLimitStrikes = 0;
        this.everConnected = false;
        this._welcome = null;
        this.token = null;
        this.tokenAt = 0;
        this.lastRx = 0;
        this.pingSentAt = 0;
        /** Outgoing pacing: frames waiting for a token of the bucket (bounded by `maxBufferedFrames` for new requests). */
        this.sendBuffer = [];
        this.bucket = 0;
        this.bucketAt = 0;
        if (!options || options.token === undefined || options.token === null) {
            throw new TypeError("Switchboard: options.token is required (a string or a function)");
        }
        this.url = socketUrl(url);
        this.tokenSource = options.token;
        const WS = options.WebSocket ?? globalThis.WebSocket;
        if (!WS) {
            throw new TypeError("Switchboard: no WebSocket here; pass one: new Switchboard(url, { token, WebSocket }) with WebSocket from the 'ws' package");
        }
        this.WS = WS;
        this.opts = {
            autoConnect: options.autoConnect ?? true,
            reconnect: options.reconnect ?? true,
            requestTimeoutMs: options.requestTimeoutMs ?? 10000,
            offline: options.offline ?? "queue",
            maxQueue: options.maxQueue ?? 100,
            backoffInitialMs: options.backoffInitialMs ?? 500,
            backoffMaxMs: options.backoffMaxMs ?? 30000,
            stableAfterMs: options.stableAfterMs ?? 10000,
            connectionLimitRetries: options.connectionLimitRetries ?? 3,
            connectTimeoutMs: options.connectTimeoutMs ?? 10000,
            refreshBeforeMs: options.refreshBeforeMs ?? 30000,
            pingIntervalMs: options.pingIntervalMs,
            pingTimeoutMs: options.pingTimeoutMs ?? 10000,
            maxFramesPerSecond: options.maxFramesPerSecond ?? 40,
            frameBurst: options.frameBurst ?? 80,
            maxBufferedFrames: Math.max(1, options.maxBufferedFrames ?? 1000),
            goingAwayReconnectWindowMs: options.goingAwayReconnectWindowMs ?? 5000,
        };
        if (this.opts.autoConnect) {
            setTimeout(() => {
                if (this._state === "idle" && this.gen === 0)
                    void this.open();
            }, 0);
        }
    }
    // ------------------------------------------------------ public state --
    /** `idle` (not started), `connecting`, `connected`, `disconnected` (waiting to retry), `closed`. */
    get state() {
        return this._state;
    }
    /** The current connection's `welcome` frame (`user`, `connection_id`, `instance`, `heartbeat_s`). */
    get welcome() {
        return this._welcome;
    }
    /** The authenticated user id of the current (or last) connection. */
    get user() {
        return this._welcome?.user ?? null;
    }
    /** Rooms this client is in or joining (and rejoins after a reconnect). */
    get joinedRooms() {
        return [...this.rooms.keys()];
    }
    /** The id of the last message of `room` handed to the app (what a rejoin resumes after). */
    lastMessageId(room) {
        return this.rooms.get(room)?.lastId;
    }
    /** `on(type, fn)`: `fn(detail, event)` for every event of that type; returns a function that removes it. */
    on(type, fn) {
        const listener = (ev) => {
            const e = ev;
            fn(e.detail, e);
        };
        this.addEventListener(type, listener);
        return () => this.removeEventListener(type, listener);
    }
    addEventListener(type, listener, options) {
        super.addEventListener(type, listener, options);
    }
    removeEventListener(type, listener, options) {
        super.removeEventListener(type, listener, options);
    }
    // ------------------------------------------------------- lifecycle --
    /**
     * Resolves when connected (at once if connected now); rejects with `closed` when the
     * client closes or gives up first, or with `timeout` after `timeoutMs` (0: wait forever).
     */
    ready(timeoutMs = 0) {
        if (this._state === "connected")
            return Promise.resolve();
        if (this._state === "closed")
            return Promise.reject(new SwitchboardError("closed", "the client is closed"));
        return new Promise((resolve, reject) => {
            let timer;
            const finish = (err) => {
                offConnected();
                offClosed();
                clearTimeout(timer);
                if (err)
                    reject(err);
                else
                    resolve();
            };
            const offConnected = this.on("connected", () => finish());
            const offClosed = this.on("closed", (d) => finish(new SwitchboardError("closed", `closed (${d.code} ${d.reason})`)));
            if (timeoutMs > 0) {
                timer = setTimeout(() => finish(new SwitchboardError("timeout", `not connected within ${timeoutMs} ms`)), timeoutMs);
            }
        });
    }
    /**
     * Start connecting (after `autoConnect: false` or `close()`), or, while waiting to retry,
     * retry now (e.g. on the browser's `online` event). No-op while connecting or connected.
     */
    connect() {
        if (this._state === "connected" || this._state === "connecting")
            return;
        clearTimeout(this.retryTimer);
        this.retryTimer = undefined;
        if (this._state === "closed" || this._state === "idle") {
            this.failures = 0;
            this.connectionLimitStrikes = 0;
        }
        void this.open();
    }
    /**
     * Close for good (until `connect()`): no reconnect; pending and queued requests are
     * rejected with `closed`. Resolves when the socket is closed. Rooms are remembered,
     * so a later `connect()` rejoins them.
     */
    close(code = 1000, reason = "") {
        if (this._state === "closed")
            return Promise.resolve();
        const wasConnected = this._state === "connected";
        this.gen++;
        this.clearConnectionTimers();
        clearTimeout(this.retryTimer);
        this.retryTimer = undefined;
        const ws = this.ws;
        this.ws = null;
        const done = new Promise((resolve) => {
            if (!ws || ws.readyState >= 2)
                return resolve();
            const timer = setTimeout(() => {
                terminate(ws);
                resolve();
            }, 2000);
            ws.onclose = () => {
                clearTimeout(timer);
                resolve();
            };
            ws.onmessage = null;
            try {
                ws.close(code, reason);
            }
            catch {
                terminate(ws);
                clearTimeout(timer);
                resolve();
            }
        });
        this.failAll("closed", "the client was closed");
        if (wasConnected) {
            this.emit("disconnected", { code, reason, willReconnect: false });
        }
        this.setState("closed");
        this.emit("closed", { code, reason });
        return done;
    }
    // -------------------------------------------------------- requests --
    /**
     * Join a room; remembered and rejoined (with `since`) after every reconnect.
     * Resolves with the ack (`recovered` when `since` was given).
     */
    join(room, options = {}) {
        if (this._state === "closed")
            return Promise.reject(new SwitchboardError("closed", "the client is closed"));
        const existing = this.rooms.get(room);
        if (existing?.joined)
            return Promise.resolve({ room });
        const offline = options.offline ?? this.opts.offline;
        if (!existing && this._state !== "connected" && offline === "reject") {
            return Promise.reject(new SwitchboardError("offline", "not connected"));
        }
        if (this._state === "connected" && existing?.inflight === undefined && this.bufferFull()) {
            return Promise.reject(this.bufferFullError());
        }
        const r = existing ?? { joined: false, everJoined: false, waiters: [] };
        if (!existing) {
            if (options.since !== undefined)
                r.lastId = options.since;
            this.rooms.set(room, r);
        }
        return new Promise((resolve, reject) => {
            const waiter = { resolve, reject };
            const timeoutMs = options.timeoutMs ?? this.opts.requestTimeoutMs;
            if (timeoutMs > 0) {
                waiter.timer = setTimeout(() => {
                    r.waiters = r.waiters.filter((w) => w !== waiter);
                    reject(new SwitchboardError("timeout", `join ${room}: no reply within ${timeoutMs} ms`));
                    this.abandonJoin(room, r);
                }, timeoutMs);
            }
            r.waiters.push(waiter);
            if (this._state === "connected" && r.inflight === undefined)
                this.sendJoin(room, r);
        });
    }
    /** Leave a room (and stop rejoining it). Resolves at once when disconnected: there is nothing to leave. */
    leave(room, options = {}) {
        // Refused before anything changes: the room stays joined, and a later leave can try again.
        if (this._state === "connected" && this.bufferFull())
            return Promise.reject(this.bufferFullError());
        const r = this.rooms.get(room);
        if (r) {
            this.rooms.delete(room);
            for (const w of r.waiters) {
                clearTimeout(w.timer);
                w.reject(new SwitchboardError("cancelled", `left ${room} before the join was acked`));
            }
            r.waiters = [];
        }
        if (this._state !== "connected")
            return Promise.resolve();
        return this.request({ type: "leave", room }, { ...options, offline: "reject" }, undefined, false).then(() => undefined, (err) => {
            // The connection went away: we are not in the room, and will not rejoin it.
            if (err.code === "disconnected" || err.code === "offline")
                return undefined;
            throw err;
        });
    }
    /**
     * Publish `data` to a room you joined. Resolves with the message id.
     *
     * The frame carries `options.idempotencyKey`, or a fresh random key, so it is safe to send
     * again: answered `unavailable`, it is resent (same key, backoff from 100 ms to 2 s) while its
     * time-out allows; in flight when the connection drops, it is resent after the reconnect
     * (with `offline: "queue"`). The hub stores and delivers it once, and acks every attempt with
     * the first one's id. When the time is up during a backoff it rejects with `unavailable`.
     */
    publish(room, data, options = {}) {
        let key;
        if (options.idempotencyKey !== undefined) {
            const problem = idempotencyKeyProblem(options.idempotencyKey);
            if (problem)
                return Promise.reject(new TypeError(`Switchboard: publish: ${problem}`));
            key = options.idempotencyKey;
        }
        else {
            key = newIdempotencyKey();
        }
        const frame = { type: "publish", room, data, idempotency_key: key };
        return this.request(frame, options, undefined, true, true).then((ack) => ack.id);
    }
    /** Send `data` to every connection of a user. Resolves with the direct's id. */
    direct(to, data, options) {
        return this.request({ type: "direct", to, data }, options).then((ack) => ack.id);
    }
    /** Who is in a room: `[{ user, connections }]`. */
    presence(room, options) {
        return this.request({ type: "presence", room }, options).then((reply) => (reply.users ?? []));
    }
    /**
     * Submit an async task. Resolves with its id; its updates (`queued`, `running`, `progress`,
     * `done`, `failed`) arrive as `task` events and to `options.onUpdate`.
     */
    task(name, payload, options = {}) {
        const frame = { type: "task", name, payload: payload === undefined ? null : payload };
        if (options.idempotencyKey !== undefined)
            frame.idempotency_key = options.idempotencyKey;
        const onUpdate = options.onUpdate;
        return this.request(frame, options, (ack) => {
            // Synchronously, before the next frame (the `queued` update) is handled.
            if (onUpdate && typeof ack.task_id === "string")
                this.taskWatchers.set(ack.task_id, onUpdate);
        }).then((ack) => ack.task_id);
    }
    /** The record of one of your tasks (`status`, `attempts`, `result`, `error`, …). */
    taskStatus(taskId, options) {
        return this.request({ type: "task_status", task_id: taskId }, options).then((reply) => {
            const { type: _type, ref: _ref, ...record } = reply;
            return record;
        });
    }
    /** Cancel a task that has not started (`forbidden` once running or finished). */
    taskCancel(taskId, options) {
        return this.request({ type: "task_cancel", task_id: taskId }, options).then(() => undefined);
    }
    /** Round trip to the hub; resolves with the time it took in ms. */
    ping(options) {
        const start = Date.now();
        return this.request({ type: "ping" }, options).then(() => Date.now() - start);
    }
    /** Ask the token function for a new token now and send it as `refresh`. */
    refreshToken() {
        return this.refreshNow();
    }
    // ----------------------------------------------------------- events --
    emit(type, detail) {
        this.dispatchEvent(new SwitchboardEvent(type, detail));
    }
    setState(state) {
        const previous = this._state;
        if (previous === state)
            return;
        this._state = state;
        this.emit("statechange", { state, previous });
    }
    // -------------------------------------------------------- connection --
    async open() {
        const gen = ++this.gen;
        this.setState("connecting");
        this.emit("connecting", { attempt: this.failures + 1 });
        // One deadline for the whole attempt: the token function, the handshake and the welcome.
        clearTimeout(this.connectTimer);
        this.connectTimer = setTimeout(() => {
            if (gen !== this.gen)
                return;
            if (this.ws) {
                this.drop("connect timeout");
            }
            else {
                this.gen++; // abandon the token function's answer
                this.emit("error", { error: new SwitchboardError("timeout", "the token function did not answer"), during: "token" });
                this.afterClose(1006, "token timeout");
            }
        }, this.opts.connectTimeoutMs);
        let token;
        try {
            token = await this.fetchToken();
        }
        catch (e) {
            if (gen !== this.gen)
                return;
            clearTimeout(this.connectTimer);
            this.emit("error", { error: asError(e), during: "token" });
            this.afterClose(1006, "token function failed");
            return;
        }
        if (gen !== this.gen)
            return;
        const url = new URL(this.url.toString());
        url.searchParams.set("token", token);
        let ws;
        try {
            ws = new this.WS(url.toString());
        }
        catch (e) {
            clearTimeout(this.connectTimer);
            this.emit("error", { error: asError(e), during: "connect" });
            this.afterClose(1006, "WebSocket constructor failed");
            return;
        }
        this.ws = ws;
        ws.onerror = () => { }; // a close follows; without a handler `ws` would throw
        ws.onmessage = (ev) => {
            if (gen === this.gen && this.ws === ws)
                this.onFrame(ev.data);
        };
        ws.onclose = (ev) => {
            if (gen === this.gen && this.ws === ws)
                this.onSocketClose(ev.code ?? 1006, ev.reason ?? "");
        };
    }
    async fetchToken() {
        const src = this.tokenSource;
        const token = typeof src === "function" ? await src() : src;
        if (typeof token !== "string" || token === "")
            throw new TypeError("Switchboard: the token function returned no token");
        this.token = token;
        this.tokenAt = Date.now();
        return token;
    }
    /** Abandon the current socket at once (dead or stuck) and handle it as a close 1006. */
    drop(reason) {
        const ws = this.ws;
        if (ws) {
            this.ws = null;
            ws.onmessage = null;
            ws.onclose = null;
            terminate(ws);
        }
        this.onSocketClose(1006, reason);
    }
    onSocketClose(code, reason) {
        const ws = this.ws;
        if (ws) {
            ws.onmessage = null;
            ws.onclose = null;
        }
        this.ws = null;
        const unsent = new Set(this.sendBuffer.map((b) => b.req));
        this.clearConnectionTimers();
        for (const r of this.rooms.values()) {
            r.joined = false;
            r.inflight = undefined;
        }
        const inflight = [...this.pending.values()];
        this.pending.clear();
        const closed = `connection closed (${code}${reason ? " " + reason : ""})`;
        const resend = [];
        for (const req of inflight) {
            if (this.mayResend(req)) {
                resend.push(req); // safe to send again: it waits for the reconnect, before what was queued since
                continue;
            }
            clearTimeout(req.timer);
            const when = unsent.has(req) ? "before it was sent" : "before the reply";
            req.reject(new SwitchboardError("disconnected", `${closed} ${when}`));
        }
        if (resend.length > 0)
            this.outbox = [...resend, ...this.outbox];
        this.afterClose(code, reason);
    }
    /** Retry (with backoff) or give up, after a close or a failed attempt. */
    afterClose(code, reason) {
        if (this._state === "closed")
            return;
        if (!this.mayRetry(code, reason)) {
            this.failAll("closed", `connection closed for good (${code}${reason ? " " + reason : ""})`);
            this.emit("disconnected", { code, reason, willReconnect: false });
            this.setState("closed");
            this.emit("closed", { code, reason });
            return;
        }
        this.failures++;
        const spread = this.opts.goingAwayReconnectWindowMs;
        let delayMs;
        if (code === 1001 && spread > 0) {
            // The instance drains: its clients reconnect spread over the window, not all at once.
            delayMs = Math.floor(Math.random() * Math.min(spread, MAX_TIMER_MS));
        }
        else {
            const cap = Math.min(this.opts.backoffMaxMs, this.opts.backoffInitialMs * 2 ** Math.min(this.failures - 1, 30));
            delayMs = Math.floor(Math.random() * cap);
        }
        this.setState("disconnected");
        this.emit("disconnected", { code, reason, willReconnect: true, delayMs });
        if (this._state !== "disconnected")
            return; // a listener called close() or connect()
        const gen = this.gen;
        this.retryTimer = setTimeout(() => {
            this.retryTimer = undefined;
            if (gen === this.gen && this._state === "disconnected")
                void this.open();
        }, delayMs);
    }
    mayRetry(code, reason) {
        if (!this.opts.reconnect)
            return false;
        if (code !== 1008)
            return true;
        if (NEVER_RETRY_1008.has(reason))
            return false;
        // A fixed token that expired will not get better; a token function gives a new one.
        if (reason === "token expired")
            return typeof this.tokenSource === "function";
        if (reason === "connection limit")
            return ++this.connectionLimitStrikes <= this.opts.connectionLimitRetries;
        return true; // `rate limit` and anything new: retry, with backoff
    }
    clearConnectionTimers() {
        clearTimeout(this.drainTimer);
        this.drainTimer = undefined;
        this.sendBuffer = [];
        clearTimeout(this.connectTimer);
        clearTimeout(this.stableTimer);
        clearTimeout(this.refreshTimer);
        clearInterval(this.pingTimer);
        this.connectTimer = this.stableTimer = this.refreshTimer = this.pingTimer = undefined;
    }
    /** Reject everything waiting: requests in flight, queued requests and join waiters. */
    failAll(code, message) {
        // Rooms first: their joins in flight are rejected below and must not forget the room.
        for (const r of this.rooms.values()) {
            r.joined = false;
            r.inflight = undefined;
        }
        const inflight = [...this.pending.values(), ...this.backingOff];
        this.pending.clear();
        for (const req of this.backingOff)
            clearTimeout(req.resend?.timer);
        this.backingOff.clear();
        for (const req of inflight) {
            clearTimeout(req.timer);
            req.reject(new SwitchboardError(code, message));
        }
        this.failQueued(code, message);
        for (const r of this.rooms.values()) {
            const waiters = r.waiters;
            r.waiters = [];
            for (const w of waiters) {
                clearTimeout(w.timer);
                w.reject(new SwitchboardError(code, message));
            }
        }
    }
    failQueued(code, message) {
        const queued = this.outbox;
        this.outbox = [];
        for (const req of queued) {
            clearTimeout(req.timer);
            req.reject(new SwitchboardError(code, message));
        }
    }
    // ------------------------------------------------------------ frames --
    onFrame(data) {
        this.lastRx = Date.now();
        let f;
        try {
            f = JSON.parse(toText(data));
        }
        catch (e) {
            this.emit("error", { error: asError(e), during: "frame" });
            return;
        }
        if (!f || typeof f !== "object")
            return;
        const hasRef = f.ref !== undefined && f.ref !== null;
        switch (f.type) {
            case "welcome":
                this.onWelcome(f);
                return;
            case "ack":
            case "error":
            case "pong":
            case "presence":
                if (hasRef)
                    this.settle(f);
                else if (f.type === "error") {
                    this.emit("error", { error: new SwitchboardError(String(f.code), String(f.message ?? ""), f), during: "frame" });
                }
                return;
            case "task":
                if (hasRef)
                    this.settle(f);
                else
                    this.onTaskUpdate(f);
                return;
            case "message":
                this.onMessage(f);
                return;
            case "direct":
            case "broadcast":
            case "joined":
            case "left":
                this.emit(f.type, f);
                return;
            default:
                return; // newer hubs may send more; ignore what we do not know
        }
    }
    onWelcome(w) {
        clearTimeout(this.connectTimer);
        this.connectTimer = undefined;
        const reconnected = this.everConnected;
        this.everConnected = true;
        this.connectionLimitStrikes = 0;
        this._welcome = w;
        // Connected before anyone hears of it, so that rejoins and the queue go out first.
        const previous = this._state;
        this._state = "connected";
        const gen = this.gen;
        this.stableTimer = setTimeout(() => {
            if (gen === this.gen)
                this.failures = 0;
        }, this.opts.stableAfterMs);
        this.bucket = Math.max(1, this.opts.frameBurst); // a new session starts with a full bucket
        this.bucketAt = Date.now();
        this.scheduleRefresh();
        this.startPing(w.heartbeat_s);
        for (const [room, r] of this.rooms) {
            if (!r.joined && r.inflight === undefined)
                this.sendJoin(room, r);
        }
        const queued = this.outbox;
        this.outbox = [];
        for (const req of queued)
            this.transmit(req);
        if (this._state !== "connected")
            return;
        this.emit("statechange", { state: "connected", previous });
        this.emit("connected", { welcome: w, reconnected });
    }
    onMessage(m) {
        const r = this.rooms.get(m.room);
        if (!r)
            return; // left (or never joined) here
        if (typeof m.id === "string") {
            if (r.lastId !== undefined && compareIds(m.id, r.lastId) <= 0)
                return; // seen already
            r.lastId = m.id;
        }
        this.emit("message", m);
    }
    onTaskUpdate(u) {
        this.emit("task", u);
        const watcher = this.taskWatchers.get(u.task_id);
        if (watcher) {
            if (u.status === "done" || u.status === "failed")
                this.taskWatchers.delete(u.task_id);
            watcher(u);
        }
    }
    settle(f) {
        const ref = typeof f.ref === "number" ? f.ref : Number(f.ref);
        const req = this.pending.get(ref);
        if (!req)
            return; // timed out already
        this.pending.delete(ref);
        if (f.type === "error") {
            const err = new SwitchboardError(String(f.code ?? "internal"), String(f.message ?? ""), f);
            if (err.code === "unavailable" && req.resend) {
                this.resendLater(req, err);
                return;
            }
            clearTimeout(req.timer);
            req.reject(err);
        }
        else {
            clearTimeout(req.timer);
            req.resolve(f);
        }
    }
    // ------------------------------------------------------ request core --
    /**
     * `bounded`: refused with `queue_full` when the pacing buffer is full (false for the client's own frames).
     * `resendable`: the frame is safe to send again (a publish with its idempotency key): resent after
     * `unavailable` and after a reconnect, within the time-out.
     */
    request(frame, options = {}, onReply, bounded = true, resendable = false) {
        return new Promise((resolve, reject) => {
            if (this._state === "closed") {
                reject(new SwitchboardError("closed", "the client is closed"));
                return;
            }
            const req = {
                ref: this.nextRef++,
                frame,
                resolve: (reply) => {
                    onReply?.(reply);
                    resolve(reply);
                },
                reject,
            };
            if (resendable) {
                const timeoutMs = options.timeoutMs ?? this.opts.requestTimeoutMs;
                req.resend = {
                    deadline: timeoutMs > 0 ? Date.now() + timeoutMs : Infinity,
                    offline: options.offline ?? this.opts.offline,
                    attempts: 0,
                    unavailable: 0,
                };
            }
            if (this._state === "connected") {
                if (bounded && this.bufferFull()) {
                    reject(this.bufferFullError());
                    return;
                }
                this.armTimer(req, options.timeoutMs);
                this.transmit(req);
                return;
            }
            if ((options.offline ?? this.opts.offline) === "reject") {
                reject(new SwitchboardError("offline", `not connected (${this._state})`));
                return;
            }
            if (this.outbox.length >= this.opts.maxQueue) {
                reject(new SwitchboardError("queue_full", `${this.opts.maxQueue} requests already wait for the connection`));
                return;
            }
            this.armTimer(req, options.timeoutMs);
            this.outbox.push(req);
        });
    }
    armTimer(req, timeoutMs = this.opts.requestTimeoutMs) {
        if (!(timeoutMs > 0))
            return;
        req.timer = setTimeout(() => {
            if (this.backingOff.delete(req)) {
                // Waiting to be resent after `unavailable`: that answer is the last word.
                clearTimeout(req.resend.timer);
                req.resend.timer = undefined;
                req.reject(this.stillUnavailable(req));
                return;
            }
            // Take the frame back from wherever it still waits, so that it can never reach the hub.
            if (this.pending.get(req.ref) === req) {
                this.pending.delete(req.ref);
                this.unsend(req);
            }
            else {
                const i = this.outbox.indexOf(req);
                if (i >= 0)
                    this.outbox.splice(i, 1);
            }
            let what = req.sent ? "it was sent, its outcome is unknown" : "it was not sent";
            const resend = req.resend;
            if (resend && resend.attempts > 1)
                what += `; attempt ${resend.attempts}`;
            if (resend && req.sent)
                what += `; resend it with idempotencyKey ${JSON.stringify(req.frame.idempotency_key)}`;
            req.reject(new SwitchboardError("timeout", `${req.frame.type}: no reply within ${timeoutMs} ms (${what})`));
        }, timeoutMs);
    }
    transmit(req) {
        const resend = req.resend;
        if (resend && resend.attempts++ > 0)
            req.ref = this.nextRef++; // a resend: a fresh ref
        this.pending.set(req.ref, req);
        try {
            this.sendText(JSON.stringify({ ...req.frame, ref: req.ref }), req);
        }
        catch {
            // The socket is going away; its close rejects the request with `disconnected` (or resends it).
        }
    }
    /** The frame went to the WebSocket. */
    markSent(req) {
        req.sent = true;
        if (req.resend && req.resend.firstSentAt === undefined)
            req.resend.firstSentAt = Date.now();
    }
    /** The time after which no attempt of a resendable request may start. */
    resendDeadline(resend) {
        return Math.min(resend.deadline, (resend.firstSentAt ?? Date.now()) + RESEND_WINDOW_MS);
    }
    /** After a drop: whether a request in flight waits for the reconnect to be sent again. */
    mayResend(req) {
        const resend = req.resend;
        return resend !== undefined && resend.offline === "queue" && Date.now() < this.resendDeadline(resend);
    }
    /**
     * A resendable request answered `unavailable`: send it again (same frame, fresh ref) after a
     * backoff, or reject it now when the next attempt could not start within its time-out.
     */
    resendLater(req, err) {
        const resend = req.resend;
        resend.lastError = err;
        resend.unavailable++;
        const cap = Math.min(RESEND_MAX_MS, RESEND_INITIAL_MS * 2 ** Math.min(resend.unavailable - 1, 20));
        const delay = Math.floor(cap / 2 + (Math.random() * cap) / 2);
        if (Date.now() + delay >= this.resendDeadline(resend)) {
            clearTimeout(req.timer);
            req.reject(this.stillUnavailable(req));
            return;
        }
        this.backingOff.add(req);
        resend.timer = setTimeout(() => {
            resend.timer = undefined;
            if (!this.backingOff.delete(req))
                return;
            if (this._state === "connected") {
                this.transmit(req);
            }
            else if (resend.offline === "queue") {
                this.outbox.push(req); // sent after the reconnect
            }
            else {
                clearTimeout(req.timer);
                const key = JSON.stringify(req.frame.idempotency_key);
                const why = `not connected (${this._state}, offline: "reject") to resend it after "${err.message}"`;
                const outcome = `it may or may not have taken effect: resend it with idempotencyKey ${key}`;
                req.reject(new SwitchboardError("offline", `${req.frame.type}: ${why}; ${outcome}`, err.frame));
            }
        }, delay);
    }
    /** The rejection of a resendable request whose time ran out after `unavailable`. */
    stillUnavailable(req) {
        const resend = req.resend;
        const last = resend.lastError;
        const key = JSON.stringify(req.frame.idempotency_key);
        const tries = resend.attempts === 1 ? "1 attempt" : `${resend.attempts} attempts`;
        return new SwitchboardError("unavailable", `${req.frame.type}: ${last.message} (still unavailable after ${tries}, no time left to try again; ` +
            `it may or may not have taken effect: resend it with idempotencyKey ${key})`, last.frame);
    }
    /** Removes a request's frame from the pacing buffer; false when it is not there (sent already). */
    unsend(req) {
        const i = this.sendBuffer.findIndex((b) => b.req === req);
        if (i < 0)
            return false;
        this.sendBuffer.splice(i, 1);
        return true;
    }
    bufferFull() {
        return this.sendBuffer.length >= this.opts.maxBufferedFrames;
    }
    bufferFullError() {
        return new SwitchboardError("queue_full", `${this.sendBuffer.length} frames already wait to be sent (maxBufferedFrames)`);
    }
    /** Sends a frame now, or, past the pacing budget, as soon as the bucket allows (in order). */
    sendText(text, req) {
        const rate = this.opts.maxFramesPerSecond;
        if (!(rate > 0)) {
            this.ws.send(text);
            if (req)
                this.markSent(req);
            return;
        }
        this.refillBucket();
        if (this.sendBuffer.length === 0 && this.bucket >= 1) {
            this.bucket -= 1;
            this.ws.send(text);
            if (req)
                this.markSent(req);
            return;
        }
        this.sendBuffer.push({ text, req });
        this.scheduleDrain();
    }
    refillBucket() {
        const now = Date.now();
        const burst = Math.max(1, this.opts.frameBurst);
        this.bucket = Math.min(burst, this.bucket + ((now - this.bucketAt) / 1000) * this.opts.maxFramesPerSecond);
        this.bucketAt = now;
    }
    scheduleDrain() {
        if (this.drainTimer !== undefined)
            return;
        const wait = Math.max(1, Math.ceil(((1 - this.bucket) / this.opts.maxFramesPerSecond) * 1000));
        const gen = this.gen;
        this.drainTimer = setTimeout(() => {
            this.drainTimer = undefined;
            if (gen !== this.gen || !this.ws)
                return;
            this.refillBucket();
            try {
                while (this.sendBuffer.length > 0 && this.bucket >= 1) {
                    this.bucket -= 1;
                    const b = this.sendBuffer.shift();
                    this.ws.send(b.text);
                    if (b.req)
                        this.markSent(b.req);
                }
            }
            catch {
                /* the close will tell */
            }
            if (this.sendBuffer.length > 0)
                this.scheduleDrain();
        }, wait);
    }
    // ------------------------------------------------------------- rooms --
    sendJoin(room, r) {
        const since = r.lastId;
        const frame = { type: "join", room };
        if (since !== undefined)
            frame.since = since;
        const req = {
            ref: this.nextRef++,
            frame,
            resolve: (ack) => {
                if (this.rooms.get(room) !== r || r.inflight !== req.ref)
                    return;
                r.inflight = undefined;
                r.joined = true;
                const rejoin = r.everJoined;
                r.everJoined = true;
                const result = { room };
                if (typeof ack.recovered === "boolean")
                    result.recovered = ack.recovered;
                const waiters = r.waiters;
                r.waiters = [];
                for (const w of waiters) {
                    clearTimeout(w.timer);
                    w.resolve(result);
                }
                if (since !== undefined && ack.recovered === false) {
                    // The room's history broke (trimmed, expired, a restarted memory hub): ids need not
                    // continue from ours, so the floor goes; the replay (all after `since`) sets it again.
                    r.lastId = undefined;
                }
                if (rejoin) {
                    this.emit("recovery", { room, recovered: since !== undefined && ack.recovered === true, since: since ?? null });
                }
            },
            reject: (err) => {
                if (this.rooms.get(room) !== r || r.inflight !== req.ref)
                    return;
                r.inflight = undefined;
                if (err.code === "disconnected")
                    return; // rejoined after the reconnect
                this.rooms.delete(room);
                const waiters = r.waiters;
                r.waiters = [];
                for (const w of waiters) {
                    clearTimeout(w.timer);
                    w.reject(err);
                }
                if (r.everJoined) {
                    this.emit("error", { error: err, during: "rejoin" });
                    this.emit("revoked", { rooms: [room], reason: "rejoin", error: err });
                }
            },
        };
        r.inflight = req.ref;
        this.transmit(req);
    }
    /** A join that timed out with nobody else waiting: forget a room never joined (and leave it if the join lands). */
    abandonJoin(room, r) {
        if (r.joined || r.everJoined || r.waiters.length > 0 || this.rooms.get(room) !== r)
            return;
        this.rooms.delete(room);
        if (r.inflight !== undefined && this._state === "connected") {
            const join = this.pending.get(r.inflight);
            r.inflight = undefined;
            if (join && this.unsend(join)) {
                this.pending.delete(join.ref); // never sent: nothing to undo
                return;
            }
            this.request({ type: "leave", room }, { offline: "reject" }, undefined, false).catch(() => { });
        }
    }
    // ----------------------------------------------------- token refresh --
    scheduleRefresh() {
        clearTimeout(this.refreshTimer);
        this.refreshTimer = undefined;
        if (typeof this.tokenSource !== "function" || !this.token)
            return;
        const exp = decodeJwt(this.token)?.exp;
        if (typeof exp !== "number")
            return;
        const expMs = exp * 1000;
        const lifetime = Math.max(0, expMs - this.tokenAt);
        const margin = Math.min(this.opts.refreshBeforeMs, lifetime / 3);
        const delay = Math.min(MAX_TIMER_MS, Math.max(0, expMs - margin - Date.now()));
        const gen = this.gen;
        this.refreshTimer = setTimeout(() => {
            this.refreshTimer = undefined;
            if (gen === this.gen && this._state === "connected")
                this.refreshNow().catch(() => { });
        }, delay);
    }
    async refreshNow() {
        if (this._state !== "connected")
            throw new SwitchboardError("offline", "not connected");
        const gen = this.gen;
        const expBefore = this.token ? decodeJwt(this.token)?.exp : undefined;
        let token;
        try {
            const src = this.tokenSource;
            token = typeof src === "function" ? await src() : src;
            if (typeof token !== "string" || token === "")
                throw new TypeError("Switchboard: the token function returned no token");
        }
        catch (e) {
            const error = asError(e);
            if (gen === this.gen) {
                this.emit("error", { error, during: "refresh" });
                this.retryRefreshLater(expBefore);
            }
            throw error;
        }
        if (gen !== this.gen || this._state !== "connected")
            throw new SwitchboardError("disconnected", "connection lost during refresh");
        let ack;
        try {
            ack = await this.request({ type: "refresh", token }, { offline: "reject" }, undefined, false);
        }
        catch (e) {
            const error = e;
            if (gen === this.gen && error.code !== "disconnected") {
                this.emit("error", { error, during: "refresh" });
                this.retryRefreshLater(expBefore);
            }
            throw error;
        }
        if (gen !== this.gen)
            return;
        this.token = token;
        this.tokenAt = Date.now();
        this.scheduleRefresh();
        const left = Array.isArray(ack.left) ? ack.left : [];
        if (left.length > 0) {
            for (const room of left) {
                const r = this.rooms.get(room);
                if (!r)
                    continue;
                this.rooms.delete(room);
                for (const w of r.waiters) {
                    clearTimeout(w.timer);
                    w.reject(new SwitchboardError("forbidden", `the new token does not allow ${room}`));
                }
            }
            this.emit("revoked", { rooms: left, reason: "refresh" });
        }
    }
    /** After a failed refresh: try again half-way to the expiry (the hub closes `token expired` at it). */
    retryRefreshLater(exp) {
        if (typeof exp !== "number" || typeof this.tokenSource !== "function")
            return;
        const remaining = exp * 1000 - Date.now();
        if (remaining < 1000)
            return;
        clearTimeout(this.refreshTimer);
        const gen = this.gen;
        this.refreshTimer = setTimeout(() => {
            this.refreshTimer = undefined;
            if (gen === this.gen && this._state === "connected")
                this.refreshNow().catch(() => { });
        }, Math.min(MAX_TIMER_MS, remaining / 2));
    }
    // -------------------------------------------------------- liveness --
    startPing(heartbeatS) {
        clearInterval(this.pingTimer);
        const interval = this.opts.pingIntervalMs ?? (heartbeatS > 0 ? heartbeatS * 1000 : 20000);
        if (!(interval > 0))
            return;
        const timeout = this.opts.pingTimeoutMs;
        this.lastRx = Date.now();
        this.pingSentAt = 0;
        const gen = this.gen;
        this.pingTimer = setInterval(() => {
            if (gen !== this.gen || this._state !== "connected")
                return;
            const now = Date.now();
            if (this.pingSentAt > this.lastRx) {
                if (now - this.pingSentAt >= timeout)
                    this.drop("ping timeout");
                return;
            }
            if (now - this.lastRx >= interval) {
                this.pingSentAt = now;
                try {
                    this.sendText(JSON.stringify({ type: "ping" }));
                }
                catch {
                    /* the close will tell */
                }
            }
        }, Math.max(50, Math.min(interval, timeout) / 4));
    }
}
function terminate(ws) {
    try {
        const t = ws.terminate;
        if (typeof t === "function")
            t.call(ws);
        else
            ws.close(4000, "abandoned");
    }
    catch {
        /* nothing more to do */
    }
}
function asError(e) {
    return e instanceof Error ? e : new Error(String(e));
}
export default Switchboard;
