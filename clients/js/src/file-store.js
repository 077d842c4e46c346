// A punch store for Node: an append-only journal file, so that a process restart loses
// no queued punch. Each line is a JSON record, {"put": punch} or {"delete": id}; the file
// is rewritten compactly when it is opened. Every write is flushed to disk (fsync) before
// the promise resolves, so a punch is on disk before it is sent.
import { open, rename } from "node:fs/promises";

export class FileStore {
  #path;
  #handle = null;
  #chain = Promise.resolve();

  constructor(path) {
    this.#path = path;
  }

  async load() {
    const punches = new Map();
    let text = "";
    try {
      const handle = await open(this.#path, "r");
      try {
        text = await handle.readFile("utf8");
      } finally {
        await handle.close();
      }
    } catch (err) {
      if (err.code !== "ENOENT") throw err;
    }
    for (const line of text.split("\n")) {
      if (!line) continue;
      let record;
      try {
        record = JSON.parse(line);
      } catch {
        continue; // the last line of a write cut short by a crash
      }
      if (record.put) punches.set(record.put.id, record.put);
      else if (record.delete) punches.delete(record.delete);
    }
    const kept = [...punches.values()].sort((a, b) => a.order - b.order);
    const tmp = `${this.#path}.tmp`;
    const handle = await open(tmp, "w");
    await handle.writeFile(kept.map((p) => `${JSON.stringify({ put: p })}\n`).join(""));
    await handle.sync();
    await handle.close();
    await rename(tmp, this.#path);
    this.#handle = await open(this.#path, "a");
    return kept;
  }

  put(punch) {
    return this.#append({ put: punch });
  }

  delete(id) {
    return this.#append({ delete: id });
  }

  /** Closes the journal (the client keeps working from memory; for tests and shutdown). */
  async close() {
    await this.#chain;
    await this.#handle?.close();
    this.#handle = null;
  }

  #append(record) {
    // One write at a time, in order; a failed write fails its caller, not the next one.
    const done = this.#chain.then(async () => {
      if (!this.#handle) throw new Error(`${this.#path} is not open: load() first`);
      await this.#handle.write(`${JSON.stringify(record)}\n`);
      await this.#handle.sync();
    });
    this.#chain = done.catch(() => {});
    return done;
  }
}
