"""The dashboard (`/`) and the kiosk (`/kiosk`) in a real Chromium against a real hub process:
how they are served, a terminal's punch reaching the dashboard, punches kept in the kiosk while
the hub is down and delivered once when it is back, and the screenshots in docs/.

The browser is Debian's Chromium at /usr/bin/chromium, driven by Playwright. Without it these
tests skip, saying why; with ``ATTENDANCE_TEST_REQUIRE_SERVICES=1`` they fail instead.
``ATTENDANCE_WRITE_SCREENSHOTS=1`` makes the screenshot test write docs/dashboard.png and
docs/kiosk.png (otherwise it writes them under pytest's temporary directory).
"""

from __future__ import annotations

import asyncio
import os
import re
import struct
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg
import httpx
import pytest

from tests.conftest import TEST_SECRET, missing_service
from tests.support import HubProcess, TenantKit, provisioned_tenant, punch_frame, running_hub

# Several processes against one database, and a browser: one server is enough.
pytestmark = [pytest.mark.postgres, pytest.mark.one_server]

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
ROOT = Path(__file__).resolve().parent.parent
JAVASCRIPT = ("text/javascript", "application/javascript")
VIEWPORT = {"width": 1280, "height": 800}
# How long a page may take to show what the hub already sent (generous: a loaded CI machine).
SHOWN_MS = 10_000


def ago(seconds: float) -> str:
    return (datetime.now(UTC) - timedelta(seconds=seconds)).isoformat()


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Any]:
    """One headless Chromium for the module; each test opens a context of its own."""
    reason = None
    try:
        from playwright.async_api import async_playwright
    except ImportError as exc:
        reason = f"Playwright for Python is not installed: {exc}"
    if reason is None and not os.access(CHROMIUM, os.X_OK):
        reason = f"{CHROMIUM} is missing (Debian: apt-get install chromium)"
    if reason is not None:
        missing_service(reason)
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS
        )
        try:
            yield launched
        finally:
            await launched.close()


@pytest.fixture(scope="module")
def web_hub(database: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubProcess]:
    env = {"ATTENDANCE_DATABASE_URL": database, "ATTENDANCE_SECRET": TEST_SECRET}
    with running_hub(tmp_path_factory.mktemp("pages-hub"), env) as process:
        yield process


@pytest.fixture
def own_hub(database: str, tmp_path: Path) -> Iterator[HubProcess]:
    """A hub of this test's own: the test stops and starts it on the same port."""
    env = {"ATTENDANCE_DATABASE_URL": database, "ATTENDANCE_SECRET": TEST_SECRET}
    with running_hub(tmp_path, env) as process:
        yield process


class Browsing:
    """Pages of one browser context, and what went wrong in them: uncaught exceptions and
    anything the Content-Security-Policy refused."""

    def __init__(self, context: Any, base_url: str) -> None:
        self.context = context
        self.base_url = base_url
        self.problems: list[str] = []

    async def open(self, path: str) -> Any:
        page = await self.context.new_page()
        page.on("pageerror", lambda exc: self.problems.append(f"{path}: {exc}"))

        def console(message: Any) -> None:
            # A refused WebSocket while the hub is down is logged as an error too: expected.
            if message.type == "error" and "Content Security Policy" in message.text:
                self.problems.append(f"{path}: {message.text}")

        page.on("console", console)
        await page.goto(self.base_url + path)
        return page


async def browsing(browser: Any, hub: HubProcess, timezone: str = "UTC") -> Browsing:
    # UTC by default, so that a time shown in a site's zone cannot be the browser's by luck.
    context = await browser.new_context(viewport=VIEWPORT, locale="en-GB", timezone_id=timezone)
    return Browsing(context, hub.base_url)


async def sign_in(page: Any, token: str) -> None:
    await page.fill("#token", token)
    await page.click("#sign-in-form button[type=submit]")


async def connected(page: Any) -> None:
    await page.locator('#connection[data-state="connected"]').wait_for(timeout=SHOWN_MS)


async def text(page: Any, selector: str) -> str:
    return str(await page.locator(selector).inner_text()).strip()


# -- serving ----------------------------------------------------------------------------------


def policy(header: str) -> dict[str, list[str]]:
    directives = (d.split() for d in header.split(";") if d.strip())
    return {d[0]: d[1:] for d in directives}


async def test_the_pages_and_the_library_are_served_with_a_strict_policy(
    web_hub: HubProcess,
) -> None:
    host = f"127.0.0.1:{web_hub.port}"
    served = {
        "/": "text/html",
        "/kiosk": "text/html",
        "/js/index.js": JAVASCRIPT,
        "/static/dashboard.js": JAVASCRIPT,
        "/static/kiosk.js": JAVASCRIPT,
        "/static/common.js": JAVASCRIPT,
        "/static/pages.css": "text/css",
        "/static/icon.svg": "image/svg+xml",
        "/kiosk-worker.js": JAVASCRIPT,
    }
    async with httpx.AsyncClient(base_url=web_hub.base_url, timeout=10) as http:
        for path, media in served.items():
            response = await http.get(path)
            assert response.status_code == 200, (path, response.text)
            assert response.headers["content-type"].split(";")[0] in media, path
            if media == "text/html":
                assert "charset=utf-8" in response.headers["content-type"]
            assert response.headers["cache-control"] == "no-cache", path
            assert response.headers["x-content-type-options"] == "nosniff", path
            header = response.headers["content-security-policy"]
            assert "unsafe" not in header, path
            assert policy(header) == {
                "default-src": ["'none'"],
                "script-src": ["'self'"],
                "style-src": ["'self'"],
                "img-src": ["'self'"],
                "connect-src": ["'self'", f"ws://{host}", f"wss://{host}"],
                "base-uri": ["'none'"],
                "form-action": ["'none'"],
                "frame-ancestors": ["'none'"],
            }, path
        # The library is the one in clients/js, through the link.
        library = await http.get("/js/index.js")
        assert library.text == (ROOT / "clients/js/src/index.js").read_text()
        # Nothing inline for the policy to have to allow: one module script by address each.
        for path, script in (("/", "dashboard.js"), ("/kiosk", "kiosk.js")):
            html = (await http.get(path)).text
            assert re.findall(r"<script\b[^>]*>", html) == [
                f'<script type="module" src="/static/{script}">'
            ]
            assert "<style" not in html
            assert re.search(r"\s(on[a-z]+|style)=", html) is None
        # A Host that is not a host name is left out of the policy rather than written into it.
        odd = await http.get("/", headers={"host": "x; script-src *"})
        assert policy(odd.headers["content-security-policy"])["connect-src"] == ["'self'"]
        # Nothing outside the page files, and files that are not there are 404.
        for path in ("/static/%2e%2e/app.py", "/js/%2e%2e/%2e%2e/README.md", "/js/nope.js"):
            assert (await http.get(path)).status_code == 404, path


# -- the dashboard ------------------------------------------------------------------------------


async def test_the_dashboard_signs_in_with_a_token_and_keeps_it(
    browser: Any, web_hub: HubProcess, database: str
) -> None:
    async with provisioned_tenant(web_hub.base_url, database, TEST_SECRET, "dash") as kit:
        response = await kit.http.put("/v1/sites/plant", json={"name": "Plant", "timezone": "UTC"})
        assert response.status_code == 201
        pages = await browsing(browser, web_hub)
        page = await pages.open("/")
        await page.locator("#sign-in").wait_for()
        # Tokens that cannot open the dashboard say why, and are not kept.
        await sign_in(page, "not-a-token")
        await page.get_by_text("The hub refused this token").wait_for()
        await sign_in(page, kit.terminal_token)
        await page.get_by_text("A terminal token cannot open the dashboard").wait_for()
        await sign_in(page, kit.token("supervisor", "nobody"))
        await page.get_by_text("This token covers no site").wait_for()
        assert await page.evaluate("localStorage.length") == 0
        # An admin sees every site and chooses; a reload opens the same board again.
        await sign_in(page, f"  Bearer {kit.admin_token}\n")
        await page.locator("#pick-site").wait_for()
        assert await page.locator("#site-list button").all_inner_texts() == [
            "HQ\nhq · UTC",
            "Plant\nplant · UTC",
        ]
        await page.click('#site-list button[data-site="plant"]')
        await connected(page)
        assert await text(page, "#title") == "Plant"
        await page.reload()
        await connected(page)
        assert await text(page, "#title") == "Plant"
        await page.click("#change-site")
        await page.click('#site-list button[data-site="hq"]')
        await connected(page)
        assert await text(page, "#title") == "HQ"
        # Signing out forgets the token.
        await page.click("#sign-out")
        await page.locator("#sign-in").wait_for()
        assert await page.evaluate("localStorage.length") == 0
        assert await page.get_attribute("#connection", "data-state") == "disconnected"
        # A supervisor of one site goes straight to it; "change site" has nothing to offer.
        await sign_in(page, kit.token("supervisor", "lead", sites=["hq"]))
        await connected(page)
        assert await text(page, "#title") == "HQ"
        assert await page.locator("#change-site").is_hidden()
        await page.reload()
        await connected(page)
        assert await text(page, "#title") == "HQ"
        await pages.context.close()
        assert pages.problems == []


async def test_the_dashboard_says_at_once_when_the_browser_loses_its_network(
    browser: Any, web_hub: HubProcess, database: str
) -> None:
    async with provisioned_tenant(web_hub.base_url, database, TEST_SECRET, "net") as kit:
        pages = await browsing(browser, web_hub)
        page = await pages.open("/")
        await sign_in(page, kit.token("supervisor", "lead", sites=["hq"]))
        await connected(page)
        # Every state and reason the badge shows, in order.
        await page.evaluate(
            """() => {
                const badge = document.querySelector("#connection");
                window.seen = [];
                new MutationObserver(() =>
                    window.seen.push(`${badge.dataset.state}:${badge.dataset.reason}`)
                ).observe(badge, { attributes: true });
            }"""
        )
        await pages.context.set_offline(True)
        # The browser's `offline` event, not the heartbeat (25 s), tells the client.
        await page.locator('#connection[data-reason="offline"]').wait_for(timeout=2_000)
        assert await page.get_attribute("#connection", "data-state") == "disconnected"
        await pages.context.set_offline(False)
        await connected(page)
        seen = await page.evaluate("window.seen")
        assert "connecting:online" in seen, seen
        await pages.context.close()
        assert pages.problems == []


async def test_the_dashboard_shows_a_terminal_punch_within_a_second(
    browser: Any, web_hub: HubProcess, database: str
) -> None:
    async with provisioned_tenant(web_hub.base_url, database, TEST_SECRET, "live") as kit:
        zone = "America/New_York"
        response = await kit.http.put("/v1/sites/hq", json={"name": "HQ", "timezone": zone})
        assert response.status_code == 200
        pages = await browsing(browser, web_hub)
        page = await pages.open("/")
        await sign_in(page, kit.token("supervisor", "lead", sites=["hq"]))
        await connected(page)
        await page.locator("#people-empty").wait_for()
        assert await text(page, "#connection") == "Connected"
        door = await kit.connect()
        await page.locator('#terminals li[data-device="door"][data-online="true"]').wait_for()
        assert await text(page, "#count-terminals") == "1 / 1"

        # The requirement: a committed punch is on the board within a second of its ack.
        first = punch_frame("e1", at=ago(30))
        assert (await door.punch(first))["status"] == "accepted"
        acked = time.monotonic()
        row = page.locator('#people tr[data-employee="e1"][data-state="in"]')
        await row.wait_for(timeout=SHOWN_MS)
        shown_s = time.monotonic() - acked
        assert shown_s < 1.0, f"the punch took {shown_s:.3f} s from its ack to the board"
        # Its time is the site's, not the browser's (UTC here).
        local = datetime.fromisoformat(first["at"]).astimezone(ZoneInfo(zone))
        assert await text(row, "td.name") == "Employee 1"
        assert await text(row, "td.since time") == local.strftime("%H:%M")
        offset = local.utcoffset()
        assert offset is not None
        hours = int(offset.total_seconds() // 3600)
        assert (await text(page, "#clock")).endswith(f"GMT{hours:+d}")

        # A break, and a buddy punch: e3 badged half a second after e2 on the same door.
        for frame in (
            punch_frame("e2", at=ago(20)),
            punch_frame("e2", kind="break_start", at=ago(10)),
            punch_frame("e3", at=ago(9.5)),
        ):
            assert (await door.punch(frame))["status"] == "accepted"
        await page.locator('#people tr[data-employee="e2"][data-state="break"]').wait_for()
        await page.locator('#people tr[data-employee="e3"][data-state="in"]').wait_for()
        assert await text(page, "#count-in") == "2"
        assert await text(page, "#count-break") == "1"
        assert await text(page, "#count-late") == "0"
        alert = page.locator('#alerts li[data-kind="buddy_punch"]')
        await alert.wait_for(timeout=SHOWN_MS)
        # Which of the pair the hub reports depends on when it checked each: show its choice.
        [raised] = (await kit.http.get("/v1/alerts", params={"site": "hq"})).json()["alerts"]
        assert raised["employee"] in ("e2", "e3")
        assert await text(alert, ".employee") == f"Employee {raised['employee'][1]}"
        assert await text(alert, ".message") == raised["message"]
        assert await text(alert, ".kind") == "Buddy punch"
        assert await text(alert, ".severity") == "WARNING"
        assert await page.locator("#alerts li").first.get_attribute("data-kind") == "buddy_punch"

        # Clocking out takes them off the floor; the door going away shows it offline.
        assert (await door.punch(punch_frame("e1", kind="out", at=ago(5))))["status"] == "accepted"
        await page.locator('#people tr[data-employee="e1"]').wait_for(state="detached")
        await door.close()
        await page.locator('#terminals li[data-device="door"][data-online="false"]').wait_for()
        assert await text(page, "#count-terminals") == "0 / 1"
        await pages.context.close()
        assert pages.problems == []


# -- the kiosk ----------------------------------------------------------------------------------


async def kiosk_punch(page: Any, identify: str, who: str, kind: str) -> None:
    await page.check(f'input[name="identify"][value="{identify}"]')
    await page.fill("#who", who)
    await page.click(f'button[data-kind="{kind}"]')


async def count(page: Any, selector: str, n: int, timeout: float = SHOWN_MS) -> None:
    """Waits until `selector` matches `n` elements. (No `wait_for_function`: it evaluates a
    string, which the pages' policy rightly refuses.)"""
    from playwright.async_api import expect

    await expect(page.locator(selector)).to_have_count(n, timeout=timeout)


async def pending_ids(page: Any) -> list[str]:
    ids = await page.locator("#pending li").evaluate_all("items => items.map(li => li.dataset.id)")
    return [str(i) for i in ids]


async def test_the_kiosk_keeps_punches_while_the_hub_is_down_and_sends_each_once(
    browser: Any, own_hub: HubProcess, database: str
) -> None:
    async with provisioned_tenant(own_hub.base_url, database, TEST_SECRET, "kiosk") as kit:
        pages = await browsing(browser, own_hub)
        page = await pages.open("/kiosk")
        await sign_in(page, kit.token("supervisor", "lead", sites=["hq"]))
        await page.get_by_text("the kiosk needs a terminal token").wait_for()
        await sign_in(page, kit.terminal_token)
        await connected(page)
        # Online: the answer, with the name the floor gives the badge; and a refusal.
        await kiosk_punch(page, "badge", "b1", "in")
        result = page.locator('#result[data-status="accepted"]')
        await result.get_by_text("Employee 1: In").wait_for(timeout=SHOWN_MS)
        await kiosk_punch(page, "badge", "no-such-badge", "in")
        refused = page.locator('#result[data-status="rejected"]')
        await refused.get_by_text("nobody has this badge or employee ID").wait_for()
        await kiosk_punch(page, "employee", "not an id", "in")
        await page.get_by_text("An employee ID is 1 to 64 letters").wait_for()

        # Its service worker keeps the page itself, for a reload while the hub is down.
        await page.locator('#offline-ready[data-ready="true"]').wait_for(timeout=SHOWN_MS)
        # A supervisor watches the same floor, on a screen of its own.
        screen = await browsing(browser, own_hub)
        board = await screen.open("/")
        await sign_in(board, kit.token("supervisor", "lead", sites=["hq"]))
        await board.locator('#people tr[data-employee="e1"][data-state="in"]').wait_for()

        await asyncio.to_thread(own_hub.stop)
        await page.locator('#connection[data-state="disconnected"]').wait_for(timeout=SHOWN_MS)
        # Both say so, and why; the board says that what it shows is no longer live.
        await board.locator('#connection[data-state="disconnected"]').wait_for(timeout=SHOWN_MS)
        assert await board.get_attribute("#connection", "data-reason") in (
            "drain",
            "restart",
            "unreachable",
        )
        assert (await text(board, "#connection")).startswith("Disconnected: ")
        await board.locator("#stale").wait_for()
        offline = [
            ("badge", "b1", "out"),
            ("employee", "e2", "in"),
            ("badge", "b3", "in"),
            ("employee", "e2", "break_start"),
            ("badge", "b3", "out"),
        ]
        for identify, who, kind in offline:
            await kiosk_punch(page, identify, who, kind)
            await (
                page.locator('#result[data-status="pending"]')
                .get_by_text("Saved on this tablet")
                .wait_for()
            )
        await count(page, "#pending li", len(offline))
        ids = await pending_ids(page)
        assert len(set(ids)) == len(offline)
        assert await text(page, "#pending-count") == str(len(offline))
        assert await page.locator("#sign-out").is_disabled()

        # A reload while the hub is still down: the same punches, from IndexedDB.
        await page.reload()
        await count(page, "#pending li", len(offline))
        assert await pending_ids(page) == ids
        assert await page.get_attribute("#connection", "data-state") != "connected"

        # The hub is back on the same port: the kiosk reconnects by itself and sends them.
        await asyncio.to_thread(own_hub.start)
        await count(page, "#pending li", 0, timeout=45_000)
        await connected(page)
        for punch_id in ids:
            answered = f'#recent li[data-id="{punch_id}"][data-status="accepted"]'
            await page.locator(answered).wait_for()

        # The board is live again and shows where they left the floor: only e2, on a break.
        # Its client backs off up to 20 s between attempts (full jitter) while the hub is down.
        await board.locator('#connection[data-state="connected"]').wait_for(timeout=25_000)
        await board.locator('#people tr[data-employee="e2"][data-state="break"]').wait_for()
        await count(board, "#people tr", 1)
        assert await board.locator("#stale").is_hidden()

        # Stored, each exactly once, as made offline, with what the kiosk was told.
        stored = await kit.stored(*ids)
        assert sorted(stored) == sorted(ids)
        expected = [("e1", "out", "badge"), ("e2", "in", None), ("e3", "in", "badge")]
        expected += [("e2", "break_start", None), ("e3", "out", "badge")]
        made = [(stored[i]["employee"], stored[i]["kind"], stored[i]["method"]) for i in ids]
        assert made == expected
        assert all(stored[i]["offline"] for i in ids)
        assert await kit.count_punches() == 1 + len(offline)
        conn = await asyncpg.connect(kit.dsn)
        try:
            copies = await conn.fetch(
                "SELECT id FROM punches WHERE tenant = $1 GROUP BY id HAVING count(*) > 1",
                kit.slug,
            )
        finally:
            await conn.close()
        assert copies == []
        # With the hub up, a reload gets the page from it again (through the worker).
        await page.reload()
        await connected(page)
        assert await text(page, "#pending-count") == "0"
        await pages.context.close()
        await screen.context.close()
        assert pages.problems + screen.problems == []


# -- screenshots for docs/ ----------------------------------------------------------------------


def png_size(path: Path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n", path
    width, height = struct.unpack(">II", header[16:24])
    return width, height


async def a_morning(kit: TenantKit) -> None:
    """A floor worth a picture: people in, one on break, one late, two doors, an alert."""
    http = kit.http
    site = {"name": "Headquarters", "timezone": "Europe/Berlin"}
    assert (await http.put("/v1/sites/hq", json=site)).status_code == 200
    people = {
        "e1": ("Ada Lovelace", "b1"),
        "e2": ("Grace Hopper", "b2"),
        "e3": ("Alan Turing", "b3"),
        "e4": ("Katherine Johnson", "b4"),
        "e5": ("Edsger Dijkstra", "b5"),
        "e6": ("Margaret Hamilton", "b6"),
    }
    for employee, (name, badge) in people.items():
        body = {"name": name, "site": "hq", "badge": badge}
        assert (await http.put(f"/v1/employees/{employee}", json=body)).status_code in (200, 201)
    dock = {"site": "hq", "name": "Loading dock"}
    assert (await http.put("/v1/devices/dock", json=dock)).status_code == 201
    response = await http.put("/v1/devices/door", json={"site": "hq", "name": "Front door"})
    kit.terminal_token = response.json()["token"]
    now = datetime.now(UTC)
    start, end = now - timedelta(minutes=25), now + timedelta(hours=7)
    shift = [{"site": "hq", "start": start.isoformat(), "end": end.isoformat()}]
    assert (await http.put("/v1/schedules/e6", json=shift)).status_code == 200


async def test_screenshots_of_both_pages(
    browser: Any, web_hub: HubProcess, database: str, tmp_path: Path
) -> None:
    target = ROOT / "docs" if os.environ.get("ATTENDANCE_WRITE_SCREENSHOTS") == "1" else tmp_path
    async with provisioned_tenant(web_hub.base_url, database, TEST_SECRET, "shots") as kit:
        await a_morning(kit)
        door = await kit.connect()
        # Made earlier in the morning: sent as a terminal's offline queue would send them.
        for employee, kind, minutes in (
            ("e1", "in", 128),
            ("e2", "in", 95),
            ("e3", "in", 81),
            ("e3", "break_start", 9),
        ):
            frame = punch_frame(employee, kind=kind, at=ago(minutes * 60), offline=True)
            assert (await door.punch(frame))["status"] == "accepted"
        for frame in (punch_frame("e4", at=ago(40.6)), punch_frame("e5", at=ago(40))):
            assert (await door.punch(frame))["status"] == "accepted"

        # A tablet at the door keeps the site's time, as the dashboard shows it.
        pages = await browsing(browser, web_hub, timezone="Europe/Berlin")
        dashboard = await pages.open("/")
        await sign_in(dashboard, kit.token("supervisor", "lead", sites=["hq"]))
        await connected(dashboard)
        for employee, state in (("e1", "in"), ("e3", "break"), ("e5", "in"), ("e6", "late")):
            row = f'tr[data-employee="{employee}"][data-state="{state}"]'
            await dashboard.locator(row).wait_for()
        await dashboard.locator('#alerts li[data-kind="buddy_punch"]').wait_for(timeout=SHOWN_MS)
        await dashboard.locator('#terminals li[data-online="false"]').wait_for()
        assert await text(dashboard, "#title") == "Headquarters"
        assert (await text(dashboard, "#count-in"), await text(dashboard, "#count-late")) == (
            "4",
            "1",
        )
        await dashboard.screenshot(path=target / "dashboard.png")

        kiosk = await pages.open("/kiosk")
        await sign_in(kiosk, kit.terminal_token)
        await connected(kiosk)
        await kiosk_punch(kiosk, "employee", "e4", "break_start")
        await kiosk.locator("#recent li").wait_for(timeout=SHOWN_MS)
        await kiosk_punch(kiosk, "badge", "b2", "out")
        await (
            kiosk.locator('#result[data-status="accepted"]')
            .get_by_text("Grace Hopper: Out")
            .wait_for(timeout=SHOWN_MS)
        )
        await kiosk.locator("#recent li").nth(1).wait_for()
        await kiosk.screenshot(path=target / "kiosk.png")
        await door.close()
        await pages.context.close()
        assert pages.problems == []
    assert png_size(target / "dashboard.png") == (VIEWPORT["width"], VIEWPORT["height"])
    assert png_size(target / "kiosk.png") == (VIEWPORT["width"], VIEWPORT["height"])
