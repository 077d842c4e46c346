import type { PunchStore, StoredPunch } from "./index.js";

/** Node only: queued punches in an append-only journal file, fsynced on every write. */
export declare class FileStore implements PunchStore {
  constructor(path: string);
  load(): Promise<StoredPunch[]>;
  put(punch: StoredPunch): Promise<void>;
  delete(id: string): Promise<void>;
  /** Flushes and closes the journal. */
  close(): Promise<void>;
}
