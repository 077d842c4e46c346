// A real hub for the library's tests: `python -m hub.cli serve` on a free port against the
// PostgreSQL database the runner gives (tests/test_js_client.py sets these variables):
//   ATTENDANCE_JS_PYTHON        the Python with attendance-hub installed
//   ATTENDANCE_JS_DATABASE_URL  an empty database of the test's own
//   ATTENDANCE_JS_SECRET        the token signing secret
import { spawn } from "node:child_process";
import { createHmac, randomBytes } from "node:crypto";
import { once } from "node:events";
import { createServer } from "node:net";
import { fileURLToPath } from "node:url";

const REPO = fileURLToPath(new URL("../../../", import.meta.url));

/** Why the hub tests cannot run here, or null when they can. */
export function missingHub() {
  const missing = ["ATTENDANCE_JS_PYTHON", "ATTENDANCE_JS_DATABASE_URL", "ATTENDANCE_JS_SECRET"].filter(
    (name) => !process.env[name],
  );
  return missing.length ? `needs ${missing.join(", ")} (run through tests/test_js_client.py)` : null;
}

export async function freePort() {
  const server = createServer();
  server.listen(0, "127.0.0.1");
  await once(server, "listening");
  const { port } = server.address();
  server.close();
  await once(server, "close");
  return port;
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

function env(extra = {}) {
  return {
    ...process.env,
    ATTENDANCE_DATABASE_URL: process.env.ATTENDANCE_JS_DATABASE_URL,
    ATTENDANCE_SECRET: process.env.ATTENDANCE_JS_SECRET,
    ...extra,
  };
}

/** Runs `python -m hub.cli <args>` to the end; resolves with its stdout. */
export async function cli(...args) {
  const child = spawn(process.env.ATTENDANCE_JS_PYTHON, ["-m", "hub.cli", ...args], { cwd: REPO, env: env() });
  let out = "";
  let err = "";
  child.stdout.on("data", (d) => (out += d));
  child.stderr.on("data", (d) => (err += d));
  const [code] = await once(child, "exit");
  if (code !== 0) throw new Error(`hub.cli ${args.join(" ")} exited with ${code}: ${err}`);
  return out;
}

export class Hub {
  constructor(port) {
    this.port = port;
    this.base = `http://127.0.0.1:${port}`;
    this.ws = `ws://127.0.0.1:${port}/v1/ws`;
    this.child = null;
    this.log = "";
  }

  static async start() {
    const hub = new Hub(await freePort());
    await hub.start();
    return hub;
  }

  async start(timeoutMs = 60_000) {
    this.child = spawn(process.env.ATTENDANCE_JS_PYTHON, ["-m", "hub.cli", "serve"], {
      cwd: REPO,
      env: env({ ATTENDANCE_HOST: "127.0.0.1", ATTENDANCE_PORT: String(this.port) }),
    });
    this.child.stdout.on("data", (d) => (this.log += d));
    this.child.stderr.on("data", (d) => (this.log += d));
    const exited = once(this.child, "exit");
    const deadline = Date.now() + timeoutMs;
    while (Date.now() < deadline) {
      if (this.child.exitCode !== null) throw new Error(`the hub exited:\n${this.log.slice(-3000)}`);
      try {
        const response = await fetch(`${this.base}/readyz`);
        if (response.status === 200) {
          this.exited = exited;
          return;
        }
      } catch {
        // not listening yet
      }
      await sleep(100);
    }
    throw new Error(`the hub did not become ready:\n${this.log.slice(-3000)}`);
  }

  /** SIGTERM (drain) or SIGKILL, and wait for the process to end. */
  async stop(signal = "SIGTERM") {
    if (!this.child || this.child.exitCode !== null || this.child.signalCode !== null) return;
    this.child.kill(signal);
    await this.exited;
  }
}

/** A new tenant with site `hq`, employees e1..e5 (badges b1..b5) and terminal `door`. */
export async function tenant(hub, prefix = "js") {
  const slug = `${prefix}-${randomBytes(5).toString("hex")}`;
  const { admin_token: admin } = JSON.parse(await cli("tenant", "create", slug, "--timezone", "UTC"));
  const api = (method, path, body, token = admin) =>
    fetch(`${hub.base}${path}`, {
      method,
      headers: { authorization: `Bearer ${token}`, "content-type": "application/json" },
      body: body === undefined ? undefined : JSON.stringify(body),
    }).then(async (r) => {
      const json = await r.json();
      if (r.status >= 300) throw new Error(`${method} ${path}: ${r.status} ${JSON.stringify(json)}`);
      return json;
    });
  await api("PUT", "/v1/sites/hq", { name: "HQ", timezone: "UTC" });
  for (let n = 1; n <= 5; n += 1) {
    await api("PUT", `/v1/employees/e${n}`, { name: `Employee ${n}`, site: "hq", badge: `b${n}` });
  }
  const { token: terminal } = await api("PUT", "/v1/devices/door", { site: "hq", name: "Door" });
  const { token: supervisor } = await api("POST", "/v1/tokens", { role: "supervisor", sub: "boss", sites: ["hq"] });
  return {
    slug,
    admin,
    terminal,
    supervisor,
    api,
    /** An employee token signed here, with any lifetime (the REST API gives at least 60 s). */
    employeeToken(employee, ttlS) {
      return sign({ tenant: slug, role: "employee", sub: employee, employee, exp: Math.floor(Date.now() / 1000) + ttlS });
    },
    /** Every stored punch of the tenant, all pages. */
    async punches() {
      const all = [];
      let after = "";
      for (;;) {
        const page = await api("GET", `/v1/punches?limit=1000${after ? `&after=${after}` : ""}`);
        all.push(...page.punches);
        if (!page.next) return all;
        after = encodeURIComponent(page.next);
      }
    },
  };
}

function sign(claims) {
  const part = (value) => Buffer.from(JSON.stringify(value)).toString("base64url");
  const body = `${part({ alg: "HS256", typ: "JWT" })}.${part(claims)}`;
  const mac = createHmac("sha256", process.env.ATTENDANCE_JS_SECRET).update(body).digest("base64url");
  return `${body}.${mac}`;
}

/** Polls `check` until it returns a truthy value, or fails after `ms`. */
export async function until(check, ms = 10_000, what = "the condition") {
  const deadline = Date.now() + ms;
  for (;;) {
    const value = await check();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
    await sleep(20);
  }
}
