// The client against protocol.schema.json, the JSON Schema generated from hub/protocol.py
// (`python -m hub.schema`): the frame types of index.d.ts, every frame the client sends,
// and the frames docs/protocol.md shows. No hub needed: the socket is a fake.
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { describe, test } from "node:test";
import Ajv2020Module from "ajv/dist/2020.js";
import addFormatsModule from "ajv-formats";
import ts from "typescript";

import { AttendanceClient, CONNECTED } from "../src/index.js";

const SCHEMA_FILE = new URL("../protocol.schema.json", import.meta.url);
const TYPES_FILE = new URL("../src/index.d.ts", import.meta.url);
const DOCS_FILE = new URL("../../../docs/protocol.md", import.meta.url);
const REGENERATE = "if hub/protocol.py changed, run `python -m hub.schema`; else fix the client side";

const schema = JSON.parse(readFileSync(SCHEMA_FILE, "utf8"));
const defs = schema.$defs;
const defName = (ref) => ref.replace(/^#\/\$defs\//, "");

/** Frame tag -> definition name, per direction. */
const TAGS = {
  client: new Map(Object.entries(defs.ClientFrame.discriminator.mapping).map(([tag, ref]) => [tag, defName(ref)])),
  server: new Map(Object.entries(defs.ServerFrame.discriminator.mapping).map(([tag, ref]) => [tag, defName(ref)])),
};

/** The directions each definition is used in: a frame's own, and those of the frames that refer to it. */
function directionsOfDefinitions() {
  const found = new Map();
  const visit = (node, direction) => {
    if (Array.isArray(node)) return node.forEach((n) => visit(n, direction));
    if (!node || typeof node !== "object") return;
    if (typeof node.$ref === "string") {
      const name = defName(node.$ref);
      const seen = found.get(name) ?? new Set();
      if (!seen.has(direction)) {
        found.set(name, seen.add(direction));
        visit(defs[name], direction);
      }
    }
    for (const [key, value] of Object.entries(node)) if (key !== "$ref") visit(value, direction);
  };
  for (const direction of ["client", "server"]) {
    for (const name of TAGS[direction].values()) visit({ $ref: `#/$defs/${name}` }, direction);
  }
  return found;
}

// -- validators ---------------------------------------------------------------------------

const Ajv2020 = Ajv2020Module.default ?? Ajv2020Module;
const addFormats = addFormatsModule.default ?? addFormatsModule;
const ajv = new Ajv2020({ allErrors: true });
addFormats(ajv);
// msgspec adds OpenAPI's `discriminator` to each union; for ajv it is only an annotation.
ajv.addKeyword({ keyword: "discriminator" });
// The hub ignores fields it does not know, so a field the client renames would pass the
// schema as it is and be lost; here every struct is closed, and such a field fails.
const closed = structuredClone(schema);
for (const definition of Object.values(closed.$defs)) {
  if (definition.type === "object" && definition.properties) definition.additionalProperties = false;
}
ajv.addSchema(closed, "protocol.schema.json");
const validators = new Map();

function explain(error) {
  const extra = error.params?.additionalProperty;
  return `${error.instancePath || "/"} ${error.message}${extra ? `: \`${extra}\`` : ""}`;
}

/** Why `frame` is not a valid frame of `direction` (by its own definition), or null. */
function invalid(frame, direction) {
  const name = TAGS[direction].get(frame?.type) ?? (direction === "client" ? "ClientFrame" : "ServerFrame");
  if (!validators.has(name)) validators.set(name, ajv.compile({ $ref: `protocol.schema.json#/$defs/${name}` }));
  const validate = validators.get(name);
  return validate(frame) ? null : `${JSON.stringify(frame)}\n    ${name}: ${validate.errors.map(explain).join("; ")}`;
}

function assertAllValid(frames, direction, what) {
  const problems = frames.map((frame) => invalid(frame, direction)).filter(Boolean);
  assert.equal(problems.length, 0, `${what} that protocol.schema.json refuses (${REGENERATE}):\n  ${problems.join("\n  ")}`);
}

// -- index.d.ts against the schema -------------------------------------------------------

/**
 * A type on either side, reduced to what both can say: `strings` is "any" for a plain string,
 * or the set of literals; `items` is the shape of an array's elements; `refs` names structs.
 */
function shape() {
  return { strings: null, number: false, boolean: false, object: false, null: false, any: false, items: null, refs: new Set() };
}

function merge(into, other) {
  if (into.strings === "any" || other.strings === "any") into.strings = "any";
  else if (other.strings) into.strings = new Set([...(into.strings ?? []), ...other.strings]);
  for (const key of ["number", "boolean", "object", "null", "any"]) into[key] ||= other[key];
  if (other.items) into.items = merge(into.items ?? shape(), other.items);
  for (const ref of other.refs) into.refs.add(ref);
  return into;
}

function literal(into, value) {
  if (typeof value === "string") {
    if (into.strings !== "any") into.strings = new Set([...(into.strings ?? []), value]);
  } else if (value === null) into.null = true;
  else if (typeof value === "number") into.number = true;
  else if (typeof value === "boolean") into.boolean = true;
  else throw new Error(`no shape for the literal ${JSON.stringify(value)}`);
}

function fromSchema(node) {
  const result = shape();
  let said = false;
  if (node.$ref) {
    result.refs.add(defName(node.$ref));
    said = true;
  }
  for (const alternative of [...(node.anyOf ?? []), ...(node.oneOf ?? [])]) {
    merge(result, fromSchema(alternative));
    said = true;
  }
  for (const type of [node.type ?? []].flat()) {
    said = true;
    if (type === "string") result.strings = "any";
    else if (type === "integer" || type === "number") result.number = true;
    else if (type === "array") result.items = merge(result.items ?? shape(), fromSchema(node.items ?? {}));
    else result[type] = true; // boolean, object, null
  }
  const values = [...(node.enum ?? []), ...("const" in node ? [node.const] : [])];
  if (values.length) {
    said = true;
    if (result.strings === "any") result.strings = null; // {type: string, enum: [...]}: the enum says
    for (const value of values) literal(result, value);
  }
  if (!said) result.any = true;
  return result;
}

function readTypes() {
  const file = ts.createSourceFile("index.d.ts", readFileSync(TYPES_FILE, "utf8"), ts.ScriptTarget.Latest, true);
  const interfaces = new Map();
  const aliases = new Map();
  for (const statement of file.statements) {
    if (ts.isInterfaceDeclaration(statement)) interfaces.set(statement.name.text, statement);
    if (ts.isTypeAliasDeclaration(statement)) aliases.set(statement.name.text, statement);
  }
  return { interfaces, aliases };
}

/** An interface's properties (with those of the interfaces it extends): name -> {optional, type}. */
function propertiesOf(declaration, interfaces) {
  const properties = new Map();
  for (const clause of declaration.heritageClauses ?? []) {
    for (const base of clause.types) {
      const parent = interfaces.get(base.expression.getText());
      if (parent) for (const [name, p] of propertiesOf(parent, interfaces)) properties.set(name, p);
    }
  }
  for (const member of declaration.members) {
    if (ts.isPropertySignature(member) && member.name && !ts.isComputedPropertyName(member.name)) {
      properties.set(member.name.text, { optional: Boolean(member.questionToken), type: member.type });
    }
  }
  return properties;
}

function fromTypeNode(node, types, structOf) {
  const result = shape();
  if (!node) {
    result.any = true; // a property declared without a type
    return result;
  }
  switch (node.kind) {
    case ts.SyntaxKind.StringKeyword:
      result.strings = "any";
      return result;
    case ts.SyntaxKind.NumberKeyword:
    case ts.SyntaxKind.BigIntKeyword:
      result.number = true;
      return result;
    case ts.SyntaxKind.BooleanKeyword:
      result.boolean = true;
      return result;
    case ts.SyntaxKind.NullKeyword:
      result.null = true;
      return result;
    case ts.SyntaxKind.ObjectKeyword:
    case ts.SyntaxKind.TypeLiteral:
      result.object = true;
      return result;
    case ts.SyntaxKind.UnknownKeyword:
    case ts.SyntaxKind.AnyKeyword:
      result.any = true;
      return result;
    case ts.SyntaxKind.ParenthesizedType:
      return fromTypeNode(node.type, types, structOf);
    case ts.SyntaxKind.UnionType:
      for (const member of node.types) merge(result, fromTypeNode(member, types, structOf));
      return result;
    case ts.SyntaxKind.ArrayType:
      result.items = fromTypeNode(node.elementType, types, structOf);
      return result;
    case ts.SyntaxKind.LiteralType: {
      const lit = node.literal;
      if (lit.kind === ts.SyntaxKind.NullKeyword) literal(result, null);
      else if (lit.kind === ts.SyntaxKind.TrueKeyword || lit.kind === ts.SyntaxKind.FalseKeyword) literal(result, true);
      else if (ts.isStringLiteral(lit)) literal(result, lit.text);
      else literal(result, Number(lit.getText()));
      return result;
    }
    case ts.SyntaxKind.TypeReference: {
      const name = node.typeName.getText();
      if (name === "Array" || name === "ReadonlyArray") {
        result.items = fromTypeNode(node.typeArguments?.[0], types, structOf);
        return result;
      }
      if (name === "Record") {
        result.object = true;
        return result;
      }
      if (types.interfaces.has(name)) {
        result.refs.add(structOf.get(name) ?? `${name} (an interface of no schema definition)`);
        return result;
      }
      if (types.aliases.has(name)) return fromTypeNode(types.aliases.get(name).type, types, structOf);
      throw new Error(`index.d.ts: no shape for the type ${name}`);
    }
    default:
      throw new Error(`index.d.ts: no shape for \`${node.getText()}\``);
  }
}

function describeShape(s) {
  const parts = [];
  if (s.any) parts.push("anything");
  if (s.strings === "any") parts.push("string");
  else if (s.strings) parts.push([...s.strings].sort().map((v) => JSON.stringify(v)).join(" | "));
  if (s.number) parts.push("number");
  if (s.boolean) parts.push("boolean");
  if (s.object) parts.push("object");
  if (s.items) parts.push(`Array<${describeShape(s.items)}>`);
  parts.push(...[...s.refs].sort());
  if (s.null) parts.push("null");
  return parts.join(" | ") || "never";
}

function kindsOf(s) {
  return ["any", "number", "boolean", "object"].filter((k) => s[k])
    .concat(s.strings ? ["string"] : [], s.items ? ["array"] : [], s.refs.size ? ["struct"] : [])
    .sort()
    .join(",");
}

/**
 * Mismatches between a schema type and a .d.ts type. `server`: the hub sends it, so the
 * .d.ts must take every value the schema allows; else the client sends it, so every value
 * the .d.ts allows must be one the schema takes.
 */
function compareShapes(fromHub, fromDts, { server, optional, where }) {
  if (fromHub.any) return [];
  const problems = [];
  const says = `the schema says ${describeShape(fromHub)}, index.d.ts says ${describeShape(fromDts)}`;
  // msgspec's `X | None = None`: the hub leaves the field out rather than send null.
  const hubNull = fromHub.null && !optional;
  if (fromDts.null && !fromHub.null) problems.push(`${where}: ${says} (the hub never sends or takes null here)`);
  if (server && hubNull && !fromDts.null) problems.push(`${where}: ${says} (the hub may send null)`);
  if (kindsOf(fromHub) !== kindsOf(fromDts)) return [...problems, `${where}: ${says}`];
  if (fromHub.strings instanceof Set) {
    const dts = fromDts.strings;
    const sorted = (set) => [...set].sort().join(",");
    if (dts === "any") problems.push(`${where}: ${says} (only those values)`);
    else if (server && sorted(dts) !== sorted(fromHub.strings)) problems.push(`${where}: ${says} (the literal sets differ)`);
    else if (!server && [...dts].some((v) => !fromHub.strings.has(v))) problems.push(`${where}: ${says} (the hub refuses the others)`);
  }
  if (fromHub.items) problems.push(...compareShapes(fromHub.items, fromDts.items, { server, optional: false, where: `${where}[]` }));
  const refs = (s) => [...s.refs].sort().join(",");
  if (refs(fromHub) !== refs(fromDts)) problems.push(`${where}: ${says}`);
  return problems;
}

function compareDefinition(name, declaration, directions, types, structOf) {
  const definition = defs[name];
  const required = new Set(definition.required ?? []);
  const properties = propertiesOf(declaration, types.interfaces);
  const label = `${declaration.name.text} (schema ${name}, ${[...directions].map((d) => (d === "server" ? "hub -> client" : "client -> hub")).join(" and ")})`;
  const problems = [];
  for (const field of Object.keys(definition.properties ?? {})) {
    if (!properties.has(field)) problems.push(`${label}: \`${field}\` is in the schema but not in index.d.ts`);
  }
  for (const [field, declared] of properties) {
    const where = `${label}.${field}`;
    const property = definition.properties?.[field];
    if (!property) {
      problems.push(`${where}: index.d.ts declares it, the schema has no such field`);
      continue;
    }
    const optional = !required.has(field);
    if (directions.has("server") && optional && !declared.optional) {
      problems.push(`${where}: index.d.ts requires it, but the hub may leave it out`);
    }
    if (directions.has("client") && !optional && declared.optional) {
      problems.push(`${where}: index.d.ts makes it optional, but the hub requires it`);
    }
    const fromDts = fromTypeNode(declared.type, types, structOf);
    for (const server of new Set([...directions].map((d) => d === "server"))) {
      problems.push(...compareShapes(fromSchema(property), fromDts, { server, optional, where }));
    }
  }
  return problems;
}

function typeDrift() {
  const types = readTypes();
  const problems = [];
  // The frame interfaces: those whose `type` is one string literal.
  const frameInterfaces = new Map();
  for (const [name, declaration] of types.interfaces) {
    const tag = propertiesOf(declaration, types.interfaces).get("type")?.type;
    if (tag && ts.isLiteralTypeNode(tag) && ts.isStringLiteral(tag.literal)) {
      if (frameInterfaces.has(tag.literal.text)) problems.push(`index.d.ts: two interfaces for the frame type "${tag.literal.text}"`);
      frameInterfaces.set(tag.literal.text, name);
    }
  }
  const structOf = new Map(); // interface name -> schema definition name
  const directions = directionsOfDefinitions();
  const wanted = []; // [definition, interface]
  for (const direction of ["client", "server"]) {
    for (const [tag, name] of TAGS[direction]) {
      const iface = frameInterfaces.get(tag);
      if (!iface) problems.push(`index.d.ts has no interface for the ${direction} frame "${tag}" (schema ${name})`);
      else {
        structOf.set(iface, name);
        wanted.push([name, iface]);
      }
    }
    // The .d.ts union of the direction lists exactly its frames.
    const union = `${direction === "client" ? "Client" : "Server"}Frame`;
    const alias = types.aliases.get(union)?.type;
    const listed = new Set(alias && ts.isUnionTypeNode(alias) ? alias.types.map((t) => t.getText()) : []);
    const expected = new Set([...TAGS[direction].keys()].map((tag) => frameInterfaces.get(tag)).filter(Boolean));
    for (const name of expected) if (!listed.has(name)) problems.push(`index.d.ts: ${union} does not list ${name}`);
    for (const name of listed) if (!expected.has(name)) problems.push(`index.d.ts: ${union} lists ${name}, which is no ${direction} frame of the schema`);
  }
  const tags = new Set([...TAGS.client.keys(), ...TAGS.server.keys()]);
  for (const [tag, iface] of frameInterfaces) {
    if (!tags.has(tag)) problems.push(`index.d.ts: ${iface} is a frame "${tag}" the schema does not have`);
  }
  // The structs inside frames (Geo, the members) are interfaces of the same name.
  const frameDefs = new Set([...TAGS.client.values(), ...TAGS.server.values(), "ClientFrame", "ServerFrame"]);
  for (const name of Object.keys(defs)) {
    if (frameDefs.has(name)) continue;
    if (!types.interfaces.has(name)) problems.push(`index.d.ts has no interface ${name} (schema ${name})`);
    else {
      structOf.set(name, name);
      wanted.push([name, name]);
    }
  }
  for (const [name, iface] of wanted) {
    problems.push(...compareDefinition(name, types.interfaces.get(iface), directions.get(name) ?? new Set(["server"]), types, structOf));
  }
  return problems;
}

describe("index.d.ts", () => {
  test("declares every frame and struct of the schema, with the same fields, requiredness and types", () => {
    const problems = typeDrift();
    assert.equal(problems.length, 0, `index.d.ts disagrees with protocol.schema.json (${REGENERATE}):\n  ${problems.join("\n  ")}`);
  });
});

// -- the frames the client sends ---------------------------------------------------------

/** A fake WebSocket class recording what the client sends; the test plays the hub. */
function fakeSockets() {
  const sockets = [];
  const waiting = [];
  class FakeSocket {
    constructor(url, protocols) {
      this.url = url;
      this.protocols = protocols;
      this.readyState = 0;
      this.sent = [];
      this.onopen = this.onmessage = this.onerror = this.onclose = null;
      sockets.push(this);
      for (const resolve of waiting.splice(0)) resolve(this);
    }

    send(data) {
      assert.equal(this.readyState, 1, "the client sent on a socket that is not open");
      this.sent.push(JSON.parse(data));
    }

    close(code, reason) {
      this.readyState = 3;
      this.closedWith = { code, reason };
    }

    // The hub's side.
    open() {
      this.readyState = 1;
      this.onopen?.({});
    }

    receive(frame) {
      this.onmessage?.({ data: JSON.stringify(frame) });
    }

    drop(code) {
      this.readyState = 3;
      this.onclose?.({ code, reason: "" });
    }

    last(type) {
      return this.sent.filter((f) => f.type === type).at(-1);
    }
  }
  return {
    FakeSocket,
    sent: () => sockets.flatMap((s) => s.sent),
    next: () => new Promise((resolve) => waiting.push(resolve)),
  };
}

const SERVER_TIME = "2026-11-28T12:28:06.572Z";

function welcome(ref) {
  return { type: "welcome", session: "d389e48b45c5485b8a4dde16b45040ca", server_time: SERVER_TIME, heartbeat_s: 30, role: "terminal", tenant: "demo", sub: "door-1", ref };
}

function newClient(FakeSocket) {
  return new AttendanceClient({
    url: "ws://hub.test/v1/ws",
    token: "eyJhbGciOiJIUzI1NiJ9.e30.c2ln",
    WebSocket: FakeSocket,
    client: "schema-test 1.0",
    // Reconnect after 1 ms: the backoff is not what this test is about.
    backoffBaseMs: 2,
    backoffMaxMs: 2,
    random: () => 0,
  });
}

describe("frames the client sends", () => {
  test("hello, punch, subscribe, unsubscribe, ping and refresh all validate against the schema", async () => {
    const { FakeSocket, sent, next } = fakeSockets();
    const client = newClient(FakeSocket);
    try {
      const presence = client.subscribe("presence:hq");
      let opened = next();
      client.connect();
      let socket = await opened;
      socket.open();
      socket.receive(welcome(socket.last("hello").ref));
      assert.equal(client.state, CONNECTED);

      await client.punch({ employee: "e1", kind: "in" });
      await client.punch({
        badge: "1001",
        kind: "out",
        method: "badge",
        seq: 7,
        geo: { lat: 52.52, lon: 13.405, accuracy_m: 9 },
        at: new Date("2026-11-28T12:28:06.100Z"),
      });

      const subscribe = socket.last("subscribe");
      socket.receive({ type: "subscribed", channel: "presence:hq", version: 41, recovered: false, ref: subscribe.ref });
      socket.receive({
        type: "snapshot",
        channel: "presence:hq",
        version: 41,
        members: [{ employee: "e1", name: "Ann Lee", state: "in", since: SERVER_TIME, site: "hq" }],
      });
      assert.equal(presence.version, 41);

      const pong = client.ping();
      const ping = socket.last("ping");
      socket.receive({ type: "pong", server_time: SERVER_TIME, t: ping.t, ref: ping.ref });
      await pong;

      const refreshed = client.refresh("eyJhbGciOiJIUzI1NiJ9.e30.bmV3");
      const refresh = socket.last("refresh");
      socket.receive({ type: "refreshed", expires_at: "2026-11-29T12:28:06.572Z", ref: refresh.ref });
      assert.equal(await refreshed, "2026-11-29T12:28:06.572Z");

      // The hub restarts; a punch made meanwhile is marked offline.
      opened = next();
      socket.drop(1012);
      await client.punch({ employee: "e1", kind: "break_start" });
      socket = await opened;
      socket.open();
      socket.receive(welcome(socket.last("hello").ref));
      presence.close();
    } finally {
      client.close();
    }

    const frames = sent();
    assertAllValid(frames, "client", "frames the client sent");
    const has = (what, predicate) => assert.ok(frames.some(predicate), `the client sent no ${what}: ${JSON.stringify(frames)}`);
    has("hello", (f) => f.type === "hello" && f.client === "schema-test 1.0");
    has("punch by employee", (f) => f.type === "punch" && f.employee && f.offline === false);
    has("punch by badge with method, seq and geo", (f) => f.type === "punch" && f.badge && f.method && "seq" in f && f.geo);
    has("offline punch", (f) => f.type === "punch" && f.offline === true);
    has("subscribe without since", (f) => f.type === "subscribe" && !("since" in f));
    has("subscribe with since", (f) => f.type === "subscribe" && "since" in f);
    has("unsubscribe", (f) => f.type === "unsubscribe");
    has("automatic ping", (f) => f.type === "ping" && !("ref" in f));
    has("ping()", (f) => f.type === "ping" && "ref" in f);
    has("refresh", (f) => f.type === "refresh");
  });
});

// -- the examples of docs/protocol.md ----------------------------------------------------

/**
 * The JSON values in the ```json blocks of docs/protocol.md. A block may hold several
 * values, and the docs wrap long strings: a line break inside a string reads as one space.
 */
function docsExamples() {
  const text = readFileSync(DOCS_FILE, "utf8");
  const values = [];
  for (const [, block] of text.matchAll(/```json\n([\s\S]*?)```/g)) {
    let depth = 0;
    let inString = false;
    let escaped = false;
    let current = "";
    for (let i = 0; i < block.length; i += 1) {
      const c = block[i];
      if (inString && c === "\n") {
        while (block[i + 1] === " ") i += 1;
        current += " ";
        continue;
      }
      if (depth > 0 || c === "{" || c === "[") current += c;
      if (inString) {
        if (escaped) escaped = false;
        else if (c === "\\") escaped = true;
        else if (c === '"') inString = false;
      } else if (c === '"') inString = true;
      else if (c === "{" || c === "[") depth += 1;
      else if (c === "}" || c === "]") {
        depth -= 1;
        if (depth === 0) {
          values.push(current);
          current = "";
        }
      }
    }
  }
  return values.map((source) => {
    try {
      return JSON.parse(source);
    } catch (err) {
      assert.fail(`docs/protocol.md: an example is not JSON (${err.message}):\n${source}`);
    }
  });
}

function docsFrames() {
  const frames = docsExamples().filter((v) => v && typeof v === "object" && typeof v.type === "string");
  const unknown = frames.filter((f) => !TAGS.client.has(f.type) && !TAGS.server.has(f.type));
  assert.equal(unknown.length, 0, `docs/protocol.md shows frame types the schema does not have: ${JSON.stringify(unknown)}`);
  return {
    client: frames.filter((f) => TAGS.client.has(f.type)),
    server: frames.filter((f) => TAGS.server.has(f.type)),
  };
}

describe("docs/protocol.md", () => {
  test("its example frames validate against the schema", () => {
    const { client, server } = docsFrames();
    assert.ok(client.length >= 3 && server.length >= 8, `too few example frames found: ${client.length} client, ${server.length} server`);
    assertAllValid(client, "client", "example client frames in docs/protocol.md");
    assertAllValid(server, "server", "example server frames in docs/protocol.md");
  });

  test("the client takes its example server frames", async () => {
    const { server } = docsFrames();
    const { FakeSocket, next } = fakeSockets();
    const client = newClient(FakeSocket);
    const seen = [];
    const problems = [];
    client.on("frame", (frame) => seen.push(frame));
    client.on("protocol_error", (info) => problems.push(info));
    try {
      for (const channel of new Set(server.map((f) => f.channel).filter(Boolean))) client.subscribe(channel);
      const opened = next();
      client.connect();
      const socket = await opened;
      socket.open();
      const hello = socket.last("hello");
      const first = server.find((f) => f.type === "welcome") ?? welcome();
      socket.receive({ ...first, ref: hello.ref });
      assert.equal(client.state, CONNECTED);
      for (const frame of server.filter((f) => f !== first)) socket.receive(frame);
    } finally {
      client.close();
    }
    assert.deepEqual(problems, []);
    assert.equal(seen.length, server.length + (server.some((f) => f.type === "welcome") ? 0 : 1));
  });
});
