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

// ---------------------------------------------------------------- types --

/** A token, or a function (sync or async) asked for one on every connect and before expiry. */
export type TokenSource = string | (() => string | Promise<string>);

/** What the client needs of a WebSocket: the browser's, Node 22's, or the `ws` package's. */
export interface WebSocketLike {
  readonly readyState: number;
  send(data: string): void;
  close(code?: number, reason?: string): void;
  // Handlers are typed loosely so that both DOM and `ws` sockets fit.
  onopen: ((ev: any) => any) | null;
  onmessage: ((ev: any) => any) | null;
  onclose: ((ev: any) => any) | null;
  onerror: ((ev: any) => any) | null;
}

/** A WebSocket constructor: `globalThis.WebSocket`, or `WebSocket` from the `ws` package. */
export type WebSocketConstructor = new (url: string) => WebSocketLike;

/** What to do with a request made while the connection is down. */
export type OfflinePolicy = "queue" | "reject";

export interface SwitchboardOptions {
  /** A JWT, or a function returning one (called on every connect and before expiry). Required. */
  token: TokenSource;
  /** WebSocket constructor; default `globalThis.WebSocket` (pass `WebSocket` from `ws` on Node 20/21). */
  WebSocket?: WebSocketConstructor;
  /** Connect at once (on the next tick, so listeners added right after `new` see `connecting`). Default true. */
  autoConnect?: boolean;
  /** Reconnect after a close that may be retried. Default true. */
  reconnect?: boolean;
  /**
   * Time-out of every request, from the call to the reply, queueing included. Default 10000 ms; 0: none.
   * A request that times out before it was handed to the WebSocket is never sent; one that was
   * sent may or may not have been carried out by the hub.
   */
  requestTimeoutMs?: number;
  /** Requests made while disconnected: `"queue"` them (sent after the reconnect) or `"reject"` them. Default `"queue"`. */
  offline?: OfflinePolicy;
  /** At most this many requests wait for the connection; past it a request is rejected with `queue_full`. Default 100. */
  maxQueue?: number;
  /** Backoff: the first retry waits up to this long (full jitter: a random delay in [0, cap]). Default 500 ms. */
  backoffInitialMs?: number;
  /** Backoff: the cap never exceeds this. Default 30000 ms. */
  backoffMaxMs?: number;
  /** A connection that stays up this long resets the backoff. Default 10000 ms. */
  stableAfterMs?: number;
  /** How many times 1008 `connection limit` is retried before giving up. Default 3. */
  connectionLimitRetries?: number;
  /** Give up on a connection attempt without a `welcome` after this long (and retry). Default 10000 ms. */
  connectTimeoutMs?: number;
  /** Refresh the token this long before its `exp` (at most a third of its lifetime). Default 30000 ms. */
  refreshBeforeMs?: number;
  /** Send a `ping` after this long without any frame from the hub; default the hub's `heartbeat_s`; 0: never. */
  pingIntervalMs?: number;
  /** Drop the connection (and reconnect) when nothing answers a ping this long. Default 10000 ms. */
  pingTimeoutMs?: number;
  /**
   * Pace outgoing frames to at most this many per second (a token bucket), so that a reconnect
   * with many rooms and a full queue does not trip the hub's rate limit (50/s, burst 100 by
   * default; every frame counts). Default 40; 0: no pacing.
   */
  maxFramesPerSecond?: number;
  /** The pacing bucket's size: this many frames may go at once. Default 80. */
  frameBurst?: number;
  /**
   * While connected, at most this many frames wait for the pacing; past it a new request is
   * rejected at once with `queue_full` (nothing is dropped). Default 1000 (at least 1).
   */
  maxBufferedFrames?: number;
  /**
   * After a close 1001 `going away` (the instance shuts down), the first reconnect waits a random
   * delay in [0, this), so that the clients of a draining instance spread over the others.
   * Default 5000 ms; 0: the usual backoff.
   */
  goingAwayReconnectWindowMs?: number;
}

/** Options of one request. */
export interface RequestOptions {
  /** This request's time-out (default: `requestTimeoutMs`). */
  timeoutMs?: number;
  /** This request's offline policy (default: `offline`). */
  offline?: OfflinePolicy;
}

export interface PublishOptions extends RequestOptions {
  /**
   * The publish's idempotency key, 1–256 bytes of UTF-8: the same key from the same user to the
   * same room within 120 s is stored and delivered once, and acked with the first publish's id.
   * Default: a fresh random key per call (`crypto.randomUUID()`). Pass your own to retry safely
   * yourself after the promise rejected (e.g. with `unavailable`, `timeout` or `disconnected`).
   */
  idempotencyKey?: string;
}

export interface JoinOptions extends RequestOptions {
  /** Replay what came after this message id (e.g. the last one your app has from its backend). */
  since?: string;
}

export interface TaskOptions extends RequestOptions {
  /** The same key from the same user returns the first task's id; nothing runs twice. */
  idempotencyKey?: string;
  /**
   * Called with every update of this task (`queued` included), in order, until `done` or
   * `failed`. Registered when the ack arrives, so no update can be missed.
   */
  onUpdate?: (update: TaskUpdate) => void;
}

export type ConnectionState = "idle" | "connecting" | "connected" | "disconnected" | "closed";

export interface Welcome {
  type: "welcome";
  connection_id: string;
  user: string;
  instance: string;
  heartbeat_s: number;
}

export interface RoomMessage<T = unknown> {
  type: "message";
  id: string;
  room: string;
  from: string;
  data: T;
  ts: number;
}

export interface DirectMessage<T = unknown> {
  type: "direct";
  id: string;
  from: string;
  data: T;
  ts: number;
}

export interface BroadcastMessage<T = unknown> {
  type: "broadcast";
  id: string;
  data: T;
  ts: number;
}

export interface PresenceChange {
  type: "joined" | "left";
  room: string;
  user: string;
}

export interface PresenceEntry {
  user: string;
  connections: number;
}

export type TaskStatus = "queued" | "running" | "progress" | "done" | "failed";

export interface TaskUpdate {
  type: "task";
  task_id: string;
  status: TaskStatus;
  progress?: number;
  message?: string;
  result?: unknown;
  error?: string;
}

export interface TaskRecord {
  task_id: string;
  name: string;
  user: string;
  status: "queued" | "running" | "done" | "failed";
  attempts: number;
  progress?: number;
  result?: unknown;
  error?: string;
  created_at: number;
  updated_at: number;
}

export interface JoinResult {
  room: string;
  /** Present when the join carried `since`: whether everything after it was replayed. */
  recovered?: boolean;
}

export interface RecoveryDetail {
  room: string;
  /** `false`: messages may be missing; reload the room's state from your backend. */
  recovered: boolean;
  /** The id the rejoin asked to resume after; `null` when no message had been seen in the room. */
  since: string | null;
}

export interface RevokedDetail {
  /** Rooms the client is no longer in and will not rejoin. */
  rooms: string[];
  /** `refresh`: the new token no longer allows them; `rejoin`: the hub refused the rejoin after a reconnect. */
  reason: "refresh" | "rejoin";
  error?: SwitchboardError;
}

export interface ConnectingDetail {
  /** 1 for the first try, then one more per consecutive failure. */
  attempt: number;
}

export interface ConnectedDetail {
  welcome: Welcome;
  /** False on the first connection of this client, true on every reconnection. */
  reconnected: boolean;
}

export interface DisconnectedDetail {
  /** The WebSocket close code (1006 when the connection dropped or failed). */
  code: number;
  reason: string;
  willReconnect: boolean;
  /** When `willReconnect`: the delay before the next attempt (after a 1001: drawn from `goingAwayReconnectWindowMs`). */
  delayMs?: number;
}

export interface ClosedDetail {
  /** The close that ended it (1000 after `close()`). */
  code: number;
  reason: string;
}

export interface ErrorDetail {
  error: Error;
  /** What the client was doing. */
  during: "token" | "refresh" | "rejoin" | "frame" | "connect";
}

export interface StateChangeDetail {
  state: ConnectionState;
  previous: ConnectionState;
}

/** An event listener: a function or an object with `handleEvent` (as for any EventTarget). */
export type Listener = ((ev: Event) => void) | { handleEvent(ev: Event): void };

/** `addEventListener` options (the DOM's, spelled out so Node typings without the DOM lib work). */
export interface ListenerOptions {
  capture?: boolean;
  once?: boolean;
  passive?: boolean;
  signal?: AbortSignal;
}

/** An `Event` with a `detail`, like `CustomEvent` (which Node 20 lacks in some set-ups). */
export class SwitchboardEvent<T = unknown> extends Event {
  readonly detail: T;
  constructor(type: string, detail: T) {
    super(type);
    this.detail = detail;
  }
}

export interface SwitchboardEventMap {
  message: SwitchboardEvent<RoomMessage>;
  direct: SwitchboardEvent<DirectMessage>;
  broadcast: SwitchboardEvent<BroadcastMessage>;
  joined: SwitchboardEvent<PresenceChange>;
  left: SwitchboardEvent<PresenceChange>;
  task: SwitchboardEvent<TaskUpdate>;
  recovery: SwitchboardEvent<RecoveryDetail>;
  revoked: SwitchboardEvent<RevokedDetail>;
  connecting: SwitchboardEvent<ConnectingDetail>;
  connected: SwitchboardEvent<ConnectedDetail>;
  disconnected: SwitchboardEvent<DisconnectedDetail>;
  closed: SwitchboardEvent<ClosedDetail>;
  statechange: SwitchboardEvent<StateChangeDetail>;
  error: SwitchboardEvent<ErrorDetail>;
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
  readonly code: string;
  /** The hub's `error` frame, when there was one. */
  readonly frame?: Record<string, unknown>;
  constructor(code: string, message: string, frame?: Record<string, unknown>) {
    super(message);
    this.name = "SwitchboardError";
    this.code = code;
    this.frame = frame;
  }
}

// ------------------------------------------------------------ helpers --

type Frame = Record<string, any>;
type Timer = ReturnType<typeof setTimeout>;

interface Request {
  /** The ref of the current attempt (a resend gets a fresh one). */
  ref: number;
  frame: Frame;
  resolve: (reply: Frame) => void;
  reject: (err: SwitchboardError) => void;
  timer?: Timer;
  /** Handed to a WebSocket at least once: from then on its outcome is unknown until answered. */
  sent?: boolean;
  /** Set when the frame is safe to send again (a publish: it carries an idempotency key). */
  resend?: Resend;
}

/** How a request that is safe to send again is resent. */
interface Resend {
  /** When the request's time-out fires (`Infinity`: none); no attempt starts after it. */
  deadline: number;
  /** The request's offline policy: after a drop it waits for the reconnect only with `queue`. */
  offline: OfflinePolicy;
  /** When the first attempt went out: no attempt starts `RESEND_WINDOW_MS` after it. */
  firstSentAt?: number;
  /** Attempts handed to `transmit` so far. */
  attempts: number;
  /** `unavailable` answers so far (the backoff's exponent). */
  unavailable: number;
  /** The hub's last `unavailable` answer. */
  lastError?: SwitchboardError;
  /** The backoff before the next attempt, while it runs. */
  timer?: Timer;
}

/** A frame waiting for the pacing; `req` when it is a request's, so that its time-out can take it back. */
interface Buffered {
  text: string;
  req?: Request;
}

interface RoomState {
  /** The id of the last message handed to the app (or given as `since`). */
  lastId?: string;
  joined: boolean;
  /** True once a join of this room was acked: later joins are rejoins. */
  everJoined: boolean;
  /** Ref of the join in flight, if any. */
  inflight?: number;
  waiters: Array<{ resolve: (r: JoinResult) => void; reject: (e: SwitchboardError) => void; timer?: Timer }>;
}

const MAX_TIMER_MS = 2_147_483_647;
/** A publish answered `unavailable` is resent after a backoff: 100 ms, doubling, capped at 2 s (half of it jitter). */
const RESEND_INITIAL_MS = 100;
const RESEND_MAX_MS = 2_000;
/**
 * No attempt starts later than this after the first one went out: the hub keeps an idempotency
 * key 120 s from the first publish that carried it, and a resend after that could be stored twice.
 */
const RESEND_WINDOW_MS = 100_000;
const NEVER_RETRY_1008 = new Set(["unauthorized", "kicked", "forbidden origin"]);

/** Compares two message ids `{ms}-{seq}` as the pair (ms, seq), numerically. */
export function compareIds(a: string, b: string): number {
  const [am, as] = splitId(a);
  const [bm, bs] = splitId(b);
  if (am !== bm) return am < bm ? -1 : 1;
  if (as !== bs) return as < bs ? -1 : 1;
  return 0;
}

function splitId(id: string): [number, number] {
  const dash = id.indexOf("-");
  if (dash < 0) return [Number(id) || 0, 0];
  return [Number(id.slice(0, dash)) || 0, Number(id.slice(dash + 1)) || 0];
}

/** The payload of a JWT, decoded without verifying it (the hub verifies). Undefined if it is not a JWT. */
export function decodeJwt(token: string): Record<string, unknown> | undefined {
  const part = token.split(".")[1];
  if (!part) return undefined;
  try {
    let b64 = part.replace(/-/g, "+").replace(/_/g, "/");
    while (b64.length % 4) b64 += "=";
    const bin = atob(b64);
    const bytes = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
    const claims = JSON.parse(new TextDecoder().decode(bytes));
    return claims && typeof claims === "object" ? claims : undefined;
  } catch {
    return undefined;
  }
}

/** A fresh idempotency key: `crypto.randomUUID()`, else 32 random hex digits. */
function newIdempotencyKey(): string {
  const c = (globalThis as any).crypto;
  if (typeof c?.randomUUID === "function") return c.randomUUID() as string;
  const bytes = new Uint8Array(16);
  if (typeof c?.getRandomValues === "function") c.getRandomValues(bytes);
  else for (let i = 0; i < bytes.length; i++) bytes[i] = Math.floor(Math.random() * 256);
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

/** What is wrong with an idempotency key (the hub wants 1–256 bytes of UTF-8), or undefined. */
function idempotencyKeyProblem(key: unknown): string | undefined {
  if (typeof key !== "string") return `idempotencyKey must be a string, not ${key === null ? "null" : typeof key}`;
  // A lone surrogate has no UTF-8 form (the hub would refuse the frame's JSON).
  if (/\p{Surrogate}/u.test(key)) return "idempotencyKey must be valid Unicode text (it holds a lone surrogate)";
  const bytes = new TextEncoder().encode(key).length;
  if (bytes < 1 || bytes > 256) return `idempotencyKey must be 1–256 bytes of UTF-8, not ${bytes}`;
  return undefined;
}

function toText(data: unknown): string {
  if (typeof data === "string") return data;
  if (data instanceof ArrayBuffer) return new TextDecoder().decode(data);
  if (ArrayBuffer.isView(data)) return new TextDecoder().decode(data);
  return String(data);
}

function socketUrl(url: string): URL {
  const base = (globalThis as any).location?.href as string | undefined;
  const u = new URL(url, base);
  if (u.protocol === "http:") u.protocol = "ws:";
  else if (u.protocol === "https:") u.protocol = "wss:";
  if (u.protocol !== "ws:" && u.protocol !== "wss:") {
    throw new TypeError(`Switchboard: not a WebSocket URL: ${url}`);
  }
  if (u.pathname === "/" || u.pathname === "") u.pathname = "/ws";
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
  private readonly url: URL;
  private readonly tokenSource: TokenSource;
  private readonly WS: WebSocketConstructor;
  private readonly opts: Required<Omit<SwitchboardOptions, "token" | "WebSocket" | "pingIntervalMs">> & {
    pingIntervalMs?: number;
  };

  private _state: ConnectionState = "idle";
  private ws: WebSocketLike | null = null;
  /** Bumped on every attempt and on close(): late events of an old socket are ignored. */
  private gen = 0;
  private nextRef = 1;
  private readonly pending = new Map<number, Request>();
  private outbox: Request[] = [];
  /** Publishes waiting out the backoff before they are resent (after `unavailable`). */
  private readonly backingOff = new Set<Request>();
  private readonly rooms = new Map<string, RoomState>();
  private readonly taskWatchers = new Map<string, (u: TaskUpdate) => void>();
  private failures = 0;
  private connectionLimitStrikes = 0;
  private everConnected = false;
  private _welcome: Welcome | null = null;
  private token: string | null = null;
  private tokenAt = 0;
  private lastRx = 0;
  private pingSentAt = 0;
  private retryTimer?: Timer;
  private connectTimer?: Timer;
  private stableTimer?: Timer;
  private refreshTimer?: Timer;
  private pingTimer?: ReturnType<typeof setInterval>;
  /** Outgoing pacing: frames waiting for a token of the bucket (bounded by `maxBufferedFrames` for new requests). */
  private sendBuffer: Buffered[] = [];
  private bucket = 0;
  private bucketAt = 0;
  private drainTimer?: Timer;

  constructor(url: string, options: SwitchboardOptions) {
    super();
    if (!options || options.token === undefined || options.token === null) {
      throw new TypeError("Switchboard: options.token is required (a string or a function)");
    }
    this.url = socketUrl(url);
    this.tokenSource = options.token;
    const WS = options.WebSocket ?? ((globalThis as any).WebSocket as WebSocketConstructor | undefined);
    if (!WS) {
      throw new TypeError(
        "Switchboard: no WebSocket here; pass one: new Switchboard(url, { token, WebSocket }) with WebSocket from the 'ws' package",
      );
    }
    this.WS = WS;
    this.opts = {
      autoConnect: options.autoConnect ?? true,
      reconnect: options.reconnect ?? true,
      requestTimeoutMs: options.requestTimeoutMs ?? 10_000,
      offline: options.offline ?? "queue",
      maxQueue: options.maxQueue ?? 100,
      backoffInitialMs: options.backoffInitialMs ?? 500,
      backoffMaxMs: options.backoffMaxMs ?? 30_000,
      stableAfterMs: options.stableAfterMs ?? 10_000,
      connectionLimitRetries: options.connectionLimitRetries ?? 3,
      connectTimeoutMs: options.connectTimeoutMs ?? 10_000,
      refreshBeforeMs: options.refreshBeforeMs ?? 30_000,
      pingIntervalMs: options.pingIntervalMs,
      pingTimeoutMs: options.pingTimeoutMs ?? 10_000,
      maxFramesPerSecond: options.maxFramesPerSecond ?? 40,
      frameBurst: options.frameBurst ?? 80,
      maxBufferedFrames: Math.max(1, options.maxBufferedFrames ?? 1000),
      goingAwayReconnectWindowMs: options.goingAwayReconnectWindowMs ?? 5_000,
    };
    if (this.opts.autoConnect) {
      setTimeout(() => {
        if (this._state === "idle" && this.gen === 0) void this.open();
      }, 0);
    }
  }

  // ------------------------------------------------------ public state --

  /** `idle` (not started), `connecting`, `connected`, `disconnected` (waiting to retry), `closed`. */
  get state(): ConnectionState {
    return this._state;
  }

  /** The current connection's `welcome` frame (`user`, `connection_id`, `instance`, `heartbeat_s`). */
  get welcome(): Welcome | null {
    return this._welcome;
  }

  /** The authenticated user id of the current (or last) connection. */
  get user(): string | null {
    return this._welcome?.user ?? null;
  }

  /** Rooms this client is in or joining (and rejoins after a reconnect). */
  get joinedRooms(): string[] {
    return [...this.rooms.keys()];
  }

  /** The id of the last message of `room` handed to the app (what a rejoin resumes after). */
  lastMessageId(room: string): string | undefined {
    return this.rooms.get(room)?.lastId;
  }

  /** `on(type, fn)`: `fn(detail, event)` for every event of that type; returns a function that removes it. */
  on<K extends keyof SwitchboardEventMap>(
    type: K,
    fn: (detail: SwitchboardEventMap[K]["detail"], event: SwitchboardEventMap[K]) => void,
  ): () => void {
    const listener = (ev: Event) => {
      const e = ev as SwitchboardEventMap[K];
      fn(e.detail, e);
    };
    this.addEventListener(type, listener);
    return () => this.removeEventListener(type, listener);
  }

  addEventListener<K extends keyof SwitchboardEventMap>(
    type: K,
    listener: ((ev: SwitchboardEventMap[K]) => void) | null,
    options?: boolean | ListenerOptions,
  ): void;
  addEventListener(type: string, listener: Listener | null, options?: boolean | ListenerOptions): void;
  addEventListener(type: string, listener: any, options?: boolean | ListenerOptions): void {
    super.addEventListener(type, listener, options);
  }

  removeEventListener<K extends keyof SwitchboardEventMap>(
    type: K,
    listener: ((ev: SwitchboardEventMap[K]) => void) | null,
    options?: boolean | { capture?: boolean },
  ): void;
  removeEventListener(type: string, listener: Listener | null, options?: boolean | { capture?: boolean }): void;
  removeEventListener(type: string, listener: any, options?: boolean | { capture?: boolean }): void {
    super.removeEventListener(type, listener, options);
  }

  // ------------------------------------------------------- lifecycle --

  /**
   * Resolves when connected (at once if connected now); rejects with `closed` when the
   * client closes or gives up first, or with `timeout` after `timeoutMs` (0: wait forever).
   */
  ready(timeoutMs = 0): Promise<void> {
    if (this._state === "connected") return Promise.resolve();
    if (this._state === "closed") return Promise.reject(new SwitchboardError("closed", "the client is closed"));
    return new Promise<void>((resolve, reject) => {
      let timer: Timer | undefined;
      const finish = (err?: SwitchboardError) => {
        offConnected();
        offClosed();
        clearTimeout(timer);
        if (err) reject(err);
        else resolve();
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
  connect(): void {
    if (this._state === "connected" || this._state === "connecting") return;
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
  close(code = 1000, reason = ""): Promise<void> {
    if (this._state === "closed") return Promise.resolve();
    const wasConnected = this._state === "connected";
    this.gen++;
    this.clearConnectionTimers();
    clearTimeout(this.retryTimer);
    this.retryTimer = undefined;
    const ws = this.ws;
    this.ws = null;
    const done = new Promise<void>((resolve) => {
      if (!ws || ws.readyState >= 2) return resolve();
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
      } catch {
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
  join(room: string, options: JoinOptions = {}): Promise<JoinResult> {
    if (this._state === "closed") return Promise.reject(new SwitchboardError("closed", "the client is closed"));
    const existing = this.rooms.get(room);
    if (existing?.joined) return Promise.resolve({ room });
    const offline = options.offline ?? this.opts.offline;
    if (!existing && this._state !== "connected" && offline === "reject") {
      return Promise.reject(new SwitchboardError("offline", "not connected"));
    }
    if (this._state === "connected" && existing?.inflight === undefined && this.bufferFull()) {
      return Promise.reject(this.bufferFullError());
    }
    const r: RoomState = existing ?? { joined: false, everJoined: false, waiters: [] };
    if (!existing) {
      if (options.since !== undefined) r.lastId = options.since;
      this.rooms.set(room, r);
    }
    return new Promise<JoinResult>((resolve, reject) => {
      const waiter: RoomState["waiters"][number] = { resolve, reject };
      const timeoutMs = options.timeoutMs ?? this.opts.requestTimeoutMs;
      if (timeoutMs > 0) {
        waiter.timer = setTimeout(() => {
          r.waiters = r.waiters.filter((w) => w !== waiter);
          reject(new SwitchboardError("timeout", `join ${room}: no reply within ${timeoutMs} ms`));
          this.abandonJoin(room, r);
        }, timeoutMs);
      }
      r.waiters.push(waiter);
      if (this._state === "connected" && r.inflight === undefined) this.sendJoin(room, r);
    });
  }

  /** Leave a room (and stop rejoining it). Resolves at once when disconnected: there is nothing to leave. */
  leave(room: string, options: RequestOptions = {}): Promise<void> {
    // Refused before anything changes: the room stays joined, and a later leave can try again.
    if (this._state === "connected" && this.bufferFull()) return Promise.reject(this.bufferFullError());
    const r = this.rooms.get(room);
    if (r) {
      this.rooms.delete(room);
      for (const w of r.waiters) {
        clearTimeout(w.timer);
        w.reject(new SwitchboardError("cancelled", `left ${room} before the join was acked`));
      }
      r.waiters = [];
    }
    if (this._state !== "connected") return Promise.resolve();
    return this.request({ type: "leave", room }, { ...options, offline: "reject" }, undefined, false).then(
      () => undefined,
      (err: SwitchboardError) => {
        // The connection went away: we are not in the room, and will not rejoin it.
        if (err.code === "disconnected" || err.code === "offline") return undefined;
        throw err;
      },
    );
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
  publish(room: string, data: unknown, options: PublishOptions = {}): Promise<string> {
    let key: string;
    if (options.idempotencyKey !== undefined) {
      const problem = idempotencyKeyProblem(options.idempotencyKey);
      if (problem) return Promise.reject(new TypeError(`Switchboard: publish: ${problem}`));
      key = options.idempotencyKey;
    } else {
      key = newIdempotencyKey();
    }
    const frame: Frame = { type: "publish", room, data, idempotency_key: key };
    return this.request(frame, options, undefined, true, true).then((ack) => ack.id as string);
  }

  /** Send `data` to every connection of a user. Resolves with the direct's id. */
  direct(to: string, data: unknown, options?: RequestOptions): Promise<string> {
    return this.request({ type: "direct", to, data }, options).then((ack) => ack.id as string);
  }

  /** Who is in a room: `[{ user, connections }]`. */
  presence(room: string, options?: RequestOptions): Promise<PresenceEntry[]> {
    return this.request({ type: "presence", room }, options).then((reply) => (reply.users ?? []) as PresenceEntry[]);
  }

  /**
   * Submit an async task. Resolves with its id; its updates (`queued`, `running`, `progress`,
   * `done`, `failed`) arrive as `task` events and to `options.onUpdate`.
   */
  task(name: string, payload: unknown, options: TaskOptions = {}): Promise<string> {
    const frame: Frame = { type: "task", name, payload: payload === undefined ? null : payload };
    if (options.idempotencyKey !== undefined) frame.idempotency_key = options.idempotencyKey;
    const onUpdate = options.onUpdate;
    return this.request(frame, options, (ack) => {
      // Synchronously, before the next frame (the `queued` update) is handled.
      if (onUpdate && typeof ack.task_id === "string") this.taskWatchers.set(ack.task_id, onUpdate);
    }).then((ack) => ack.task_id as string);
  }

  /** The record of one of your tasks (`status`, `attempts`, `result`, `error`, …). */
  taskStatus(taskId: string, options?: RequestOptions): Promise<TaskRecord> {
    return this.request({ type: "task_status", task_id: taskId }, options).then((reply) => {
      const { type: _type, ref: _ref, ...record } = reply;
      return record as TaskRecord;
    });
  }

  /** Cancel a task that has not started (`forbidden` once running or finished). */
  taskCancel(taskId: string, options?: RequestOptions): Promise<void> {
    return this.request({ type: "task_cancel", task_id: taskId }, options).then(() => undefined);
  }

  /** Round trip to the hub; resolves with the time it took in ms. */
  ping(options?: RequestOptions): Promise<number> {
    const start = Date.now();
    return this.request({ type: "ping" }, options).then(() => Date.now() - start);
  }

  /** Ask the token function for a new token now and send it as `refresh`. */
  refreshToken(): Promise<void> {
    return this.refreshNow();
  }

  // ----------------------------------------------------------- events --

  private emit<K extends keyof SwitchboardEventMap>(type: K, detail: SwitchboardEventMap[K]["detail"]): void {
    this.dispatchEvent(new SwitchboardEvent(type, detail));
  }

  private setState(state: ConnectionState): void {
    const previous = this._state;
    if (previous === state) return;
    this._state = state;
    this.emit("statechange", { state, previous });
  }

  // -------------------------------------------------------- connection --

  private async open(): Promise<void> {
    const gen = ++this.gen;
    this.setState("connecting");
    this.emit("connecting", { attempt: this.failures + 1 });
    // One deadline for the whole attempt: the token function, the handshake and the welcome.
    clearTimeout(this.connectTimer);
    this.connectTimer = setTimeout(() => {
      if (gen !== this.gen) return;
      if (this.ws) {
        this.drop("connect timeout");
      } else {
        this.gen++; // abandon the token function's answer
        this.emit("error", { error: new SwitchboardError("timeout", "the token function did not answer"), during: "token" });
        this.afterClose(1006, "token timeout");
      }
    }, this.opts.connectTimeoutMs);
    let token: string;
    try {
      token = await this.fetchToken();
    } catch (e) {
      if (gen !== this.gen) return;
      clearTimeout(this.connectTimer);
      this.emit("error", { error: asError(e), during: "token" });
      this.afterClose(1006, "token function failed");
      return;
    }
    if (gen !== this.gen) return;
    const url = new URL(this.url.toString());
    url.searchParams.set("token", token);
    let ws: WebSocketLike;
    try {
      ws = new this.WS(url.toString());
    } catch (e) {
      clearTimeout(this.connectTimer);
      this.emit("error", { error: asError(e), during: "connect" });
      this.afterClose(1006, "WebSocket constructor failed");
      return;
    }
    this.ws = ws;
    ws.onerror = () => {}; // a close follows; without a handler `ws` would throw
    ws.onmessage = (ev: { data: unknown }) => {
      if (gen === this.gen && this.ws === ws) this.onFrame(ev.data);
    };
    ws.onclose = (ev: { code?: number; reason?: string }) => {
      if (gen === this.gen && this.ws === ws) this.onSocketClose(ev.code ?? 1006, ev.reason ?? "");
    };
  }

  private async fetchToken(): Promise<string> {
    const src = this.tokenSource;
    const token = typeof src === "function" ? await src() : src;
    if (typeof token !== "string" || token === "") throw new TypeError("Switchboard: the token function returned no token");
    this.token = token;
    this.tokenAt = Date.now();
    return token;
  }

  /** Abandon the current socket at once (dead or stuck) and handle it as a close 1006. */
  private drop(reason: string): void {
    const ws = this.ws;
    if (ws) {
      this.ws = null;
      ws.onmessage = null;
      ws.onclose = null;
      terminate(ws);
    }
    this.onSocketClose(1006, reason);
  }

  private onSocketClose(code: number, reason: string): void {
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
    const resend: Request[] = [];
    for (const req of inflight) {
      if (this.mayResend(req)) {
        resend.push(req); // safe to send again: it waits for the reconnect, before what was queued since
        continue;
      }
      clearTimeout(req.timer);
      const when = unsent.has(req) ? "before it was sent" : "before the reply";
      req.reject(new SwitchboardError("disconnected", `${closed} ${when}`));
    }
    if (resend.length > 0) this.outbox = [...resend, ...this.outbox];
    this.afterClose(code, reason);
  }

  /** Retry (with backoff) or give up, after a close or a failed attempt. */
  private afterClose(code: number, reason: string): void {
    if (this._state === "closed") return;
    if (!this.mayRetry(code, reason)) {
      this.failAll("closed", `connection closed for good (${code}${reason ? " " + reason : ""})`);
      this.emit("disconnected", { code, reason, willReconnect: false });
      this.setState("closed");
      this.emit("closed", { code, reason });
      return;
    }
    this.failures++;
    const spread = this.opts.goingAwayReconnectWindowMs;
    let delayMs: number;
    if (code === 1001 && spread > 0) {
      // The instance drains: its clients reconnect spread over the window, not all at once.
      delayMs = Math.floor(Math.random() * Math.min(spread, MAX_TIMER_MS));
    } else {
      const cap = Math.min(this.opts.backoffMaxMs, this.opts.backoffInitialMs * 2 ** Math.min(this.failures - 1, 30));
      delayMs = Math.floor(Math.random() * cap);
    }
    this.setState("disconnected");
    this.emit("disconnected", { code, reason, willReconnect: true, delayMs });
    if (this._state !== "disconnected") return; // a listener called close() or connect()
    const gen = this.gen;
    this.retryTimer = setTimeout(() => {
      this.retryTimer = undefined;
      if (gen === this.gen && this._state === "disconnected") void this.open();
    }, delayMs);
  }

  private mayRetry(code: number, reason: string): boolean {
    if (!this.opts.reconnect) return false;
    if (code !== 1008) return true;
    if (NEVER_RETRY_1008.has(reason)) return false;
    // A fixed token that expired will not get better; a token function gives a new one.
    if (reason === "token expired") return typeof this.tokenSource === "function";
    if (reason === "connection limit") return ++this.connectionLimitStrikes <= this.opts.connectionLimitRetries;
    return true; // `rate limit` and anything new: retry, with backoff
  }

  private clearConnectionTimers(): void {
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
  private failAll(code: string, message: string): void {
    // Rooms first: their joins in flight are rejected below and must not forget the room.
    for (const r of this.rooms.values()) {
      r.joined = false;
      r.inflight = undefined;
    }
    const inflight = [...this.pending.values(), ...this.backingOff];
    this.pending.clear();
    for (const req of this.backingOff) clearTimeout(req.resend?.timer);
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

  private failQueued(code: string, message: string): void {
    const queued = this.outbox;
    this.outbox = [];
    for (const req of queued) {
      clearTimeout(req.timer);
      req.reject(new SwitchboardError(code, message));
    }
  }

  // ------------------------------------------------------------ frames --

  private onFrame(data: unknown): void {
    this.lastRx = Date.now();
    let f: Frame;
    try {
      f = JSON.parse(toText(data));
    } catch (e) {
      this.emit("error", { error: asError(e), during: "frame" });
      return;
    }
    if (!f || typeof f !== "object") return;
    const hasRef = f.ref !== undefined && f.ref !== null;
    switch (f.type) {
      case "welcome":
        this.onWelcome(f as Welcome);
        return;
      case "ack":
      case "error":
      case "pong":
      case "presence":
        if (hasRef) this.settle(f);
        else if (f.type === "error") {
          this.emit("error", { error: new SwitchboardError(String(f.code), String(f.message ?? ""), f), during: "frame" });
        }
        return;
      case "task":
        if (hasRef) this.settle(f);
        else this.onTaskUpdate(f as TaskUpdate);
        return;
      case "message":
        this.onMessage(f as RoomMessage);
        return;
      case "direct":
      case "broadcast":
      case "joined":
      case "left":
        this.emit(f.type, f as any);
        return;
      default:
        return; // newer hubs may send more; ignore what we do not know
    }
  }

  private onWelcome(w: Welcome): void {
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
      if (gen === this.gen) this.failures = 0;
    }, this.opts.stableAfterMs);
    this.bucket = Math.max(1, this.opts.frameBurst); // a new session starts with a full bucket
    this.bucketAt = Date.now();
    this.scheduleRefresh();
    this.startPing(w.heartbeat_s);
    for (const [room, r] of this.rooms) {
      if (!r.joined && r.inflight === undefined) this.sendJoin(room, r);
    }
    const queued = this.outbox;
    this.outbox = [];
    for (const req of queued) this.transmit(req);
    if (this._state !== "connected") return;
    this.emit("statechange", { state: "connected", previous });
    this.emit("connected", { welcome: w, reconnected });
  }

  private onMessage(m: RoomMessage): void {
    const r = this.rooms.get(m.room);
    if (!r) return; // left (or never joined) here
    if (typeof m.id === "string") {
      if (r.lastId !== undefined && compareIds(m.id, r.lastId) <= 0) return; // seen already
      r.lastId = m.id;
    }
    this.emit("message", m);
  }

  private onTaskUpdate(u: TaskUpdate): void {
    this.emit("task", u);
    const watcher = this.taskWatchers.get(u.task_id);
    if (watcher) {
      if (u.status === "done" || u.status === "failed") this.taskWatchers.delete(u.task_id);
      watcher(u);
    }
  }

  private settle(f: Frame): void {
    const ref = typeof f.ref === "number" ? f.ref : Number(f.ref);
    const req = this.pending.get(ref);
    if (!req) return; // timed out already
    this.pending.delete(ref);
    if (f.type === "error") {
      const err = new SwitchboardError(String(f.code ?? "internal"), String(f.message ?? ""), f);
      if (err.code === "unavailable" && req.resend) {
        this.resendLater(req, err);
        return;
      }
      clearTimeout(req.timer);
      req.reject(err);
    } else {
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
  private request(
    frame: Frame,
    options: RequestOptions = {},
    onReply?: (reply: Frame) => void,
    bounded = true,
    resendable = false,
  ): Promise<Frame> {
    return new Promise<Frame>((resolve, reject) => {
      if (this._state === "closed") {
        reject(new SwitchboardError("closed", "the client is closed"));
        return;
      }
      const req: Request = {
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

  private armTimer(req: Request, timeoutMs = this.opts.requestTimeoutMs): void {
    if (!(timeoutMs > 0)) return;
    req.timer = setTimeout(() => {
      if (this.backingOff.delete(req)) {
        // Waiting to be resent after `unavailable`: that answer is the last word.
        clearTimeout(req.resend!.timer);
        req.resend!.timer = undefined;
        req.reject(this.stillUnavailable(req));
        return;
      }
      // Take the frame back from wherever it still waits, so that it can never reach the hub.
      if (this.pending.get(req.ref) === req) {
        this.pending.delete(req.ref);
        this.unsend(req);
      } else {
        const i = this.outbox.indexOf(req);
        if (i >= 0) this.outbox.splice(i, 1);
      }
      let what = req.sent ? "it was sent, its outcome is unknown" : "it was not sent";
      const resend = req.resend;
      if (resend && resend.attempts > 1) what += `; attempt ${resend.attempts}`;
      if (resend && req.sent) what += `; resend it with idempotencyKey ${JSON.stringify(req.frame.idempotency_key)}`;
      req.reject(new SwitchboardError("timeout", `${req.frame.type}: no reply within ${timeoutMs} ms (${what})`));
    }, timeoutMs);
  }

  private transmit(req: Request): void {
    const resend = req.resend;
    if (resend && resend.attempts++ > 0) req.ref = this.nextRef++; // a resend: a fresh ref
    this.pending.set(req.ref, req);
    try {
      this.sendText(JSON.stringify({ ...req.frame, ref: req.ref }), req);
    } catch {
      // The socket is going away; its close rejects the request with `disconnected` (or resends it).
    }
  }

  /** The frame went to the WebSocket. */
  private markSent(req: Request): void {
    req.sent = true;
    if (req.resend && req.resend.firstSentAt === undefined) req.resend.firstSentAt = Date.now();
  }

  /** The time after which no attempt of a resendable request may start. */
  private resendDeadline(resend: Resend): number {
    return Math.min(resend.deadline, (resend.firstSentAt ?? Date.now()) + RESEND_WINDOW_MS);
  }

  /** After a drop: whether a request in flight waits for the reconnect to be sent again. */
  private mayResend(req: Request): boolean {
    const resend = req.resend;
    return resend !== undefined && resend.offline === "queue" && Date.now() < this.resendDeadline(resend);
  }

  /**
   * A resendable request answered `unavailable`: send it again (same frame, fresh ref) after a
   * backoff, or reject it now when the next attempt could not start within its time-out.
   */
  private resendLater(req: Request, err: SwitchboardError): void {
    const resend = req.resend!;
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
      if (!this.backingOff.delete(req)) return;
      if (this._state === "connected") {
        this.transmit(req);
      } else if (resend.offline === "queue") {
        this.outbox.push(req); // sent after the reconnect
      } else {
        clearTimeout(req.timer);
        const key = JSON.stringify(req.frame.idempotency_key);
        const why = `not connected (${this._state}, offline: "reject") to resend it after "${err.message}"`;
        const outcome = `it may or may not have taken effect: resend it with idempotencyKey ${key}`;
        req.reject(new SwitchboardError("offline", `${req.frame.type}: ${why}; ${outcome}`, err.frame));
      }
    }, delay);
  }

  /** The rejection of a resendable request whose time ran out after `unavailable`. */
  private stillUnavailable(req: Request): SwitchboardError {
    const resend = req.resend!;
    const last = resend.lastError!;
    const key = JSON.stringify(req.frame.idempotency_key);
    const tries = resend.attempts === 1 ? "1 attempt" : `${resend.attempts} attempts`;
    return new SwitchboardError(
      "unavailable",
      `${req.frame.type}: ${last.message} (still unavailable after ${tries}, no time left to try again; ` +
        `it may or may not have taken effect: resend it with idempotencyKey ${key})`,
      last.frame,
    );
  }

  /** Removes a request's frame from the pacing buffer; false when it is not there (sent already). */
  private unsend(req: Request): boolean {
    const i = this.sendBuffer.findIndex((b) => b.req === req);
    if (i < 0) return false;
    this.sendBuffer.splice(i, 1);
    return true;
  }

  private bufferFull(): boolean {
    return this.sendBuffer.length >= this.opts.maxBufferedFrames;
  }

  private bufferFullError(): SwitchboardError {
    return new SwitchboardError("queue_full", `${this.sendBuffer.length} frames already wait to be sent (maxBufferedFrames)`);
  }

  /** Sends a frame now, or, past the pacing budget, as soon as the bucket allows (in order). */
  private sendText(text: string, req?: Request): void {
    const rate = this.opts.maxFramesPerSecond;
    if (!(rate > 0)) {
      this.ws!.send(text);
      if (req) this.markSent(req);
      return;
    }
    this.refillBucket();
    if (this.sendBuffer.length === 0 && this.bucket >= 1) {
      this.bucket -= 1;
      this.ws!.send(text);
      if (req) this.markSent(req);
      return;
    }
    this.sendBuffer.push({ text, req });
    this.scheduleDrain();
  }

  private refillBucket(): void {
    const now = Date.now();
    const burst = Math.max(1, this.opts.frameBurst);
    this.bucket = Math.min(burst, this.bucket + ((now - this.bucketAt) / 1000) * this.opts.maxFramesPerSecond);
    this.bucketAt = now;
  }

  private scheduleDrain(): void {
    if (this.drainTimer !== undefined) return;
    const wait = Math.max(1, Math.ceil(((1 - this.bucket) / this.opts.maxFramesPerSecond) * 1000));
    const gen = this.gen;
    this.drainTimer = setTimeout(() => {
      this.drainTimer = undefined;
      if (gen !== this.gen || !this.ws) return;
      this.refillBucket();
      try {
        while (this.sendBuffer.length > 0 && this.bucket >= 1) {
          this.bucket -= 1;
          const b = this.sendBuffer.shift()!;
          this.ws.send(b.text);
          if (b.req) this.markSent(b.req);
        }
      } catch {
        /* the close will tell */
      }
      if (this.sendBuffer.length > 0) this.scheduleDrain();
    }, wait);
  }

  // ------------------------------------------------------------- rooms --

  private sendJoin(room: string, r: RoomState): void {
    const since = r.lastId;
    const frame: Frame = { type: "join", room };
    if (since !== undefined) frame.since = since;
    const req: Request = {
      ref: this.nextRef++,
      frame,
      resolve: (ack) => {
        if (this.rooms.get(room) !== r || r.inflight !== req.ref) return;
        r.inflight = undefined;
        r.joined = true;
        const rejoin = r.everJoined;
        r.everJoined = true;
        const result: JoinResult = { room };
        if (typeof ack.recovered === "boolean") result.recovered = ack.recovered;
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
        if (this.rooms.get(room) !== r || r.inflight !== req.ref) return;
        r.inflight = undefined;
        if (err.code === "disconnected") return; // rejoined after the reconnect
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
  private abandonJoin(room: string, r: RoomState): void {
    if (r.joined || r.everJoined || r.waiters.length > 0 || this.rooms.get(room) !== r) return;
    this.rooms.delete(room);
    if (r.inflight !== undefined && this._state === "connected") {
      const join = this.pending.get(r.inflight);
      r.inflight = undefined;
      if (join && this.unsend(join)) {
        this.pending.delete(join.ref); // never sent: nothing to undo
        return;
      }
      this.request({ type: "leave", room }, { offline: "reject" }, undefined, false).catch(() => {});
    }
  }

  // ----------------------------------------------------- token refresh --

  private scheduleRefresh(): void {
    clearTimeout(this.refreshTimer);
    this.refreshTimer = undefined;
    if (typeof this.tokenSource !== "function" || !this.token) return;
    const exp = decodeJwt(this.token)?.exp;
    if (typeof exp !== "number") return;
    const expMs = exp * 1000;
    const lifetime = Math.max(0, expMs - this.tokenAt);
    const margin = Math.min(this.opts.refreshBeforeMs, lifetime / 3);
    const delay = Math.min(MAX_TIMER_MS, Math.max(0, expMs - margin - Date.now()));
    const gen = this.gen;
    this.refreshTimer = setTimeout(() => {
      this.refreshTimer = undefined;
      if (gen === this.gen && this._state === "connected") this.refreshNow().catch(() => {});
    }, delay);
  }

  private async refreshNow(): Promise<void> {
    if (this._state !== "connected") throw new SwitchboardError("offline", "not connected");
    const gen = this.gen;
    const expBefore = this.token ? decodeJwt(this.token)?.exp : undefined;
    let token: string;
    try {
      const src = this.tokenSource;
      token = typeof src === "function" ? await src() : src;
      if (typeof token !== "string" || token === "") throw new TypeError("Switchboard: the token function returned no token");
    } catch (e) {
      const error = asError(e);
      if (gen === this.gen) {
        this.emit("error", { error, during: "refresh" });
        this.retryRefreshLater(expBefore);
      }
      throw error;
    }
    if (gen !== this.gen || this._state !== "connected") throw new SwitchboardError("disconnected", "connection lost during refresh");
    let ack: Frame;
    try {
      ack = await this.request({ type: "refresh", token }, { offline: "reject" }, undefined, false);
    } catch (e) {
      const error = e as SwitchboardError;
      if (gen === this.gen && error.code !== "disconnected") {
        this.emit("error", { error, during: "refresh" });
        this.retryRefreshLater(expBefore);
      }
      throw error;
    }
    if (gen !== this.gen) return;
    this.token = token;
    this.tokenAt = Date.now();
    this.scheduleRefresh();
    const left = Array.isArray(ack.left) ? (ack.left as string[]) : [];
    if (left.length > 0) {
      for (const room of left) {
        const r = this.rooms.get(room);
        if (!r) continue;
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
  private retryRefreshLater(exp: unknown): void {
    if (typeof exp !== "number" || typeof this.tokenSource !== "function") return;
    const remaining = exp * 1000 - Date.now();
    if (remaining < 1000) return;
    clearTimeout(this.refreshTimer);
    const gen = this.gen;
    this.refreshTimer = setTimeout(() => {
      this.refreshTimer = undefined;
      if (gen === this.gen && this._state === "connected") this.refreshNow().catch(() => {});
    }, Math.min(MAX_TIMER_MS, remaining / 2));
  }

  // -------------------------------------------------------- liveness --

  private startPing(heartbeatS: number): void {
    clearInterval(this.pingTimer);
    const interval = this.opts.pingIntervalMs ?? (heartbeatS > 0 ? heartbeatS * 1000 : 20_000);
    if (!(interval > 0)) return;
    const timeout = this.opts.pingTimeoutMs;
    this.lastRx = Date.now();
    this.pingSentAt = 0;
    const gen = this.gen;
    this.pingTimer = setInterval(() => {
      if (gen !== this.gen || this._state !== "connected") return;
      const now = Date.now();
      if (this.pingSentAt > this.lastRx) {
        if (now - this.pingSentAt >= timeout) this.drop("ping timeout");
        return;
      }
      if (now - this.lastRx >= interval) {
        this.pingSentAt = now;
        try {
          this.sendText(JSON.stringify({ type: "ping" }));
        } catch {
          /* the close will tell */
        }
      }
    }, Math.max(50, Math.min(interval, timeout) / 4));
  }
}

function terminate(ws: WebSocketLike): void {
  try {
    const t = (ws as any).terminate;
    if (typeof t === "function") t.call(ws);
    else ws.close(4000, "abandoned");
  } catch {
    /* nothing more to do */
  }
}

function asError(e: unknown): Error {
  return e instanceof Error ? e : new Error(String(e));
}

export default Switchboard;
