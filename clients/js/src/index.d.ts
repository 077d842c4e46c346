// Types of the attendance-hub client and of every frame of the protocol (attendance.v1).
// The frame interfaces are checked against the JSON Schema generated from hub/protocol.py
// (protocol.schema.json) by test/schema.test.js.

export declare const PROTOCOL: "attendance.v1.json";
export declare const DISCONNECTED: "disconnected";
export declare const CONNECTING: "connecting";
export declare const CONNECTED: "connected";

export type ConnectionState = "disconnected" | "connecting" | "connected";

/**
 * Why the state changed:
 * - `connect`: `connect()` was called; `retry`: the backoff (or a drain's delay) ran out;
 *   `online`: the browser reported the network back, so the wait was cut short;
 * - `welcome`: the hub accepted the hello;
 * - `unreachable`: the socket never opened; `closed`: closed with no code we know;
 * - `dead`: the hub went silent for `deadAfterMs`; `hello_timeout`: no welcome in time;
 * - `offline`: the browser reported the network gone;
 * - `drain`: the hub is restarting and asked to reconnect after a delay;
 * - `restart` (1012 without a drain), `try_later` (1013), `frame_too_large` (1009),
 *   `hello` (4002), `flood` (4008), `slow_consumer` (4009);
 * - `auth` (4001: bad, expired or revoked token; retried only with `getToken`);
 * - `closed_by_client`: `close()` was called.
 */
export type StateReason =
  | "connect"
  | "retry"
  | "online"
  | "welcome"
  | "unreachable"
  | "closed"
  | "dead"
  | "offline"
  | "hello_timeout"
  | "drain"
  | "restart"
  | "try_later"
  | "frame_too_large"
  | "hello"
  | "flood"
  | "slow_consumer"
  | "auth"
  | "closed_by_client";

export interface StateChange {
  state: ConnectionState;
  reason: StateReason;
  /** The close code, when the hub closed the socket. */
  code?: number;
  /** When disconnected and about to retry: in how many ms. */
  retryInMs?: number | null;
  error?: unknown;
}

// -- frames, client to hub ------------------------------------------------------------------

export type PunchKind = "in" | "out" | "break_start" | "break_end";
export type PunchMethod = "badge" | "pin" | "face" | "fingerprint" | "mobile" | "manual";
export type AckStatus = "accepted" | "duplicate" | "rejected";

export interface Geo {
  lat: number;
  lon: number;
  accuracy_m?: number;
}

export interface HelloFrame {
  type: "hello";
  token: string;
  client?: string;
  ref?: string;
}

export interface PunchFrame {
  type: "punch";
  /** A UUID chosen by the client, the same on every resend. */
  id: string;
  kind: PunchKind;
  /** RFC 3339 with an offset. */
  at: string;
  employee?: string;
  badge?: string;
  method?: PunchMethod;
  seq?: number;
  geo?: Geo;
  offline?: boolean;
  ref?: string;
}

export interface SubscribeFrame {
  type: "subscribe";
  channel: string;
  since?: number;
  ref?: string;
}

export interface UnsubscribeFrame {
  type: "unsubscribe";
  channel: string;
  ref?: string;
}

export interface PingFrame {
  type: "ping";
  t?: number;
  ref?: string;
}

export interface RefreshFrame {
  type: "refresh";
  token: string;
  ref?: string;
}

export type ClientFrame = HelloFrame | PunchFrame | SubscribeFrame | UnsubscribeFrame | PingFrame | RefreshFrame;

// -- frames, hub to client ------------------------------------------------------------------

export interface WelcomeFrame {
  type: "welcome";
  session: string;
  server_time: string;
  heartbeat_s: number;
  role: string;
  tenant: string;
  sub: string;
  ref?: string;
}

export interface AckFrame {
  type: "ack";
  id: string;
  status: AckStatus;
  reason?: string;
  received_at?: string;
  ref?: string;
  /** From here on only on `me`: what was stored of the owner's punch made elsewhere. */
  channel?: string;
  employee?: string;
  kind?: string;
  at?: string;
  site?: string;
  source?: string;
}

export interface PongFrame {
  type: "pong";
  server_time: string;
  t?: number;
  ref?: string;
}

export interface RefreshedFrame {
  type: "refreshed";
  expires_at: string;
  ref?: string;
}

export interface ErrorFrame {
  type: "error";
  code: string;
  message: string;
  ref?: string;
  /** The punch that was not stored (unavailable, rate_limited, internal). */
  id?: string;
}

export interface DrainFrame {
  type: "drain";
  reconnect_after_ms: number;
}

export interface SubscribedFrame {
  type: "subscribed";
  channel: string;
  version: number;
  recovered: boolean;
  ref?: string;
}

export interface UnsubscribedFrame {
  type: "unsubscribed";
  channel: string;
  ref?: string;
}

export type PresenceState = "in" | "break" | "out";

export interface PresenceMember {
  employee: string;
  name: string;
  state: PresenceState;
  since: string;
  site: string;
  late?: boolean;
}

export interface TerminalMember {
  device: string;
  name: string;
  online: boolean;
  since: string;
}

export type Severity = "info" | "warning" | "critical";

export interface AlertMember {
  id: string;
  kind: string;
  severity: Severity;
  at: string;
  message: string;
  detail: Record<string, unknown>;
  raised_at: string;
  employee?: string;
  site?: string;
}

export type Member = PresenceMember | TerminalMember | AlertMember;

export interface SnapshotFrame {
  type: "snapshot";
  channel: string;
  version: number;
  members: Member[];
}

export interface DeltaFrame {
  type: "delta";
  channel: string;
  version: number;
  changes: Array<PresenceMember | TerminalMember>;
}

export interface AlertFrame {
  type: "alert";
  channel: string;
  id: string;
  kind: string;
  severity: Severity;
  at: string;
  message: string;
  detail: Record<string, unknown>;
  raised_at: string;
  employee?: string;
  site?: string;
  /** On `alerts:<site>`, the channel's version; absent on `me`. */
  version?: number;
}

export interface NoticeFrame {
  type: "notice";
  channel: string;
  kind: string;
  at: string;
  message: string;
  detail?: Record<string, unknown>;
}

export type ServerFrame =
  | WelcomeFrame
  | AckFrame
  | PongFrame
  | RefreshedFrame
  | ErrorFrame
  | DrainFrame
  | SubscribedFrame
  | UnsubscribedFrame
  | SnapshotFrame
  | DeltaFrame
  | AlertFrame
  | NoticeFrame;

// -- the client -----------------------------------------------------------------------------

/** A punch as the queue keeps it. */
export interface StoredPunch {
  id: string;
  frame: PunchFrame;
  /** Its place in the queue: punches are sent in this order. */
  order: number;
  /** Local time it was made, ms since the epoch. */
  created: number;
}

export interface QueuedPunch {
  id: string;
  frame: PunchFrame;
  created: number;
}

/** Where queued punches live until acked. */
export interface PunchStore {
  /** Every punch kept, oldest first. Called once, by the client's constructor. */
  load(): Promise<StoredPunch[]>;
  /** Resolves once the punch is durably kept. */
  put(punch: StoredPunch): Promise<void>;
  delete(id: string): Promise<void>;
}

export declare class MemoryStore implements PunchStore {
  load(): Promise<StoredPunch[]>;
  put(punch: StoredPunch): Promise<void>;
  delete(id: string): Promise<void>;
}

/** Browsers: punches in IndexedDB, written before they are sent. */
export declare class IndexedDBStore implements PunchStore {
  constructor(name?: string, indexedDB?: IDBFactory);
  load(): Promise<StoredPunch[]>;
  put(punch: StoredPunch): Promise<void>;
  delete(id: string): Promise<void>;
}

export interface WebSocketLike {
  readonly readyState: number;
  onopen: ((event: unknown) => void) | null;
  onmessage: ((event: { data: unknown }) => void) | null;
  onerror: ((event: unknown) => void) | null;
  onclose: ((event: { code: number; reason?: string }) => void) | null;
  send(data: string): void;
  close(code?: number, reason?: string): void;
}

export type WebSocketConstructor = new (url: string, protocols?: string | string[]) => WebSocketLike;

export interface ClientOptions {
  /** `ws://host:port/v1/ws` or `wss://…`. */
  url: string;
  /** The bearer token; or leave it out and give `getToken`. */
  token?: string;
  /** Fetches a new token: before the current one expires (then sent as `refresh`), and after a 4001 close. */
  getToken?: () => Promise<string>;
  /** The WebSocket constructor; `globalThis.WebSocket` by default (in Node 20: pass `ws`'s). */
  WebSocket?: WebSocketConstructor;
  /** Where queued punches are kept; `MemoryStore` by default. */
  store?: PunchStore;
  /** Sent as `client` in `hello`. */
  client?: string;
  /** Backoff: the first retry waits up to this (ms, default 500)... */
  backoffBaseMs?: number;
  /** ...doubling up to this (ms, default 20,000); full jitter, never under half the base. */
  backoffMaxMs?: number;
  /** No `welcome` this long after the socket opens: reconnect (default 10,000). */
  helloTimeoutMs?: number;
  /** Application pings (default: a third of the welcome's `heartbeat_s`, at most 10 s). */
  pingIntervalMs?: number;
  /** Nothing from the hub for this long: the connection is dead (default 2.5 ping intervals). */
  deadAfterMs?: number;
  /** Punches sent from the queue, at most this many a second (default 20). */
  sendPerSecond?: number;
  /** Punches sent and not yet answered, at most (default 32). */
  window?: number;
  /** A punch the hub could not store (`unavailable`, `rate_limited`) is sent again after this (default 2,000 ms). */
  retryAfterMs?: number;
  /** With `getToken`: refresh this long before the token expires (default 60 s). */
  refreshBeforeS?: number;
  /** A starting clock offset (ms), e.g. remembered from an earlier run. */
  offsetMs?: number;
  /** For tests: the random source of the backoff, and the clock. */
  random?: () => number;
  now?: () => number;
}

export type Unsubscribe = () => void;

declare class Emitter<Events extends Record<string, unknown[]>> {
  on<E extends keyof Events & string>(event: E, handler: (...args: Events[E]) => void): Unsubscribe;
  off<E extends keyof Events & string>(event: E, handler: (...args: Events[E]) => void): void;
}

export interface SubscriptionEvents extends Record<string, unknown[]> {
  snapshot: [members: Map<string, Member>];
  change: [changes: Member[], members: Map<string, Member>];
  alert: [frame: AlertFrame];
  notice: [frame: NoticeFrame];
  /** On `me`: the owner's punch made elsewhere was stored. */
  ack: [frame: AckFrame];
  gap: [info: { expected: number; got: number }];
  error: [frame: ErrorFrame];
}

/** A live channel: members by key (employee, device, or alert id) and the version applied. */
export declare class Subscription extends Emitter<SubscriptionEvents> {
  readonly channel: string;
  readonly version: number | null;
  readonly members: Map<string, Member>;
  /** True once a snapshot (or a recovery) brought it up to date. */
  readonly ready: boolean;
  readonly closed: boolean;
  close(): void;
}

export interface ClientEvents extends Record<string, unknown[]> {
  state: [change: StateChange];
  /** A punch was stored by the hub: `accepted` or `duplicate`. */
  ack: [frame: AckFrame, punch: QueuedPunch];
  /** The hub refused a punch for good; it is out of the queue. */
  rejected: [frame: AckFrame, punch: QueuedPunch];
  queued: [punch: QueuedPunch];
  error: [frame: ErrorFrame];
  drain: [frame: DrainFrame];
  alert: [frame: AlertFrame];
  notice: [frame: NoticeFrame];
  recovered: [frame: SubscribedFrame];
  offset: [info: { offsetMs: number; rttMs: number }];
  refreshed: [info: { expiresAt: string | null }];
  refresh_error: [error: unknown];
  store_error: [error: unknown];
  protocol_error: [info: { message: string; data: unknown }];
  /** Every frame received, including types this client does not know. */
  frame: [frame: ServerFrame | Record<string, unknown>];
}

export interface PunchFields {
  employee?: string;
  badge?: string;
  kind: PunchKind;
  /** Defaults to now, in the hub's time as far as the offset is known. */
  at?: Date | string;
  method?: PunchMethod;
  seq?: number;
  geo?: Geo;
  /** Chosen for you when left out. */
  id?: string;
}

export declare class AttendanceClient extends Emitter<ClientEvents> {
  constructor(options: ClientOptions);
  readonly state: ConnectionState;
  readonly lastReason: StateReason | undefined;
  /** Resolves once the store's punches from an earlier run are in the queue. */
  readonly loaded: Promise<void>;
  /** The current session's welcome; null while not connected. */
  readonly session: WelcomeFrame | null;
  /** Hub time minus local time, ms. */
  readonly offsetMs: number;
  /** Round trip of the ping the offset comes from, ms; null until measured. */
  readonly rttMs: number | null;
  token: string | null;
  /** The code of the last token error from the hub (`bad_token`, `token_expired`, `token_revoked`), if any. */
  readonly tokenError: string | undefined;
  connect(): this;
  close(): void;
  punch(fields: PunchFields): Promise<QueuedPunch>;
  pending(): QueuedPunch[];
  subscribe(channel: string): Subscription;
  refresh(token?: string): Promise<string | null>;
  ping(): Promise<PongFrame>;
  serverNow(): number;
}

export declare function backoffDelay(attempt: number, baseMs?: number, maxMs?: number, random?: () => number): number;
export declare function uuid4(): string;
export declare function tokenClaims(token: string): Record<string, unknown>;
