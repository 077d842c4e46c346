// The kiosk's service worker: the page and its files come from the hub whenever it answers
// (so a new version is used at once), and from this cache when it does not, so that a kiosk
// reloaded while the hub is down still opens, with its queued punches from IndexedDB.
// Browsers run service workers only on https:, or on http://localhost and 127.0.0.1.

const CACHE = "attendance-hub-kiosk";
const FILES = ["/kiosk", "/static/kiosk.js", "/static/common.js", "/static/pages.css", "/static/icon.svg", "/js/index.js"];
// A hub that does not answer at all (a dead network rather than a refused connection).
const WAIT_MS = 4_000;

self.addEventListener("install", (event) => {
  event.waitUntil(
    caches
      .open(CACHE)
      .then((cache) => cache.addAll(FILES))
      .then(() => self.skipWaiting()),
  );
});

self.addEventListener("activate", (event) => {
  event.waitUntil(self.clients.claim());
});

async function fresh(request) {
  const cache = await caches.open(CACHE);
  const controller = new AbortController();
  const timer = setTimeout(() => controller.abort(), WAIT_MS);
  try {
    const response = await fetch(request, { signal: controller.signal, cache: "no-cache" });
    if (response.ok) await cache.put(request, response.clone());
    return response;
  } catch (err) {
    const kept = await cache.match(request, { ignoreSearch: true });
    if (kept) return kept;
    throw err;
  } finally {
    clearTimeout(timer);
  }
}

self.addEventListener("fetch", (event) => {
  const url = new URL(event.request.url);
  // Only the kiosk's own files: the REST API and the WebSocket never pass through here.
  if (event.request.method !== "GET" || url.origin !== self.location.origin || !FILES.includes(url.pathname)) return;
  event.respondWith(fresh(event.request));
});
