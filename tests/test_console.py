"""The web console in a real browser (Debian's Chromium, driven by Playwright) against a real
service with real MQTT devices: what an operator sees, live, without reloading."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiomqtt
import pytest
from playwright.async_api import Browser, Dialog, Page, Route, async_playwright, expect

from henge_mqtt import codec
from henge_mqtt.http import HttpServer
from henge_mqtt.models import config_sha256
from henge_mqtt.service import HengeService

from .conftest import ROOT, Running, reporting_device, wait_status, wait_until

CHROMIUM = os.environ.get("HENGE_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    assert Path(CHROMIUM).exists(), f"no Chromium at {CHROMIUM}: .ci/run installs Debian's chromium"
    async with async_playwright() as pw:
        launched = await pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            yield launched
        finally:
            await launched.close()


async def desktop_page(browser: Browser) -> tuple[Page, list[str]]:
    """A desktop-sized page and the script errors it raises (a test ends asserting there were none)."""
    page = await browser.new_page(viewport={"width": 1280, "height": 800})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    return page, errors


ARTIFACTS = Path(os.environ.get("HENGE_TEST_ARTIFACTS") or ROOT / ".artifacts" / "console")


async def keep_screenshot(page: Page, name: str) -> None:
    """A picture of the page as the test left it (HENGE_TEST_ARTIFACTS, or .artifacts/console)."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


@contextlib.asynccontextmanager
async def console_as(svc: HengeService, browser: Browser, *roles: str
                     ) -> AsyncIterator[tuple[HttpServer, dict[str, str], Page]]:
    """The console served, a token per role (``t-ROLE``) and a desktop page; no script error may
    have happened on it by the end."""
    async with HttpServer(svc, "127.0.0.1", 0) as server:
        tokens = {role: (await svc.create_token(f"t-{role}", role))["token"] for role in roles}
        page, errors = await desktop_page(browser)
        try:
            yield server, tokens, page
            assert errors == []
        finally:
            await page.close()


async def fits_a_phone(page: Page, name: str) -> None:
    """The page as it is, 390 px wide: nothing wider than the screen but inside its own scroller;
    kept as a picture; then the desktop size again."""
    await page.set_viewport_size({"width": 390, "height": 800})
    assert await page.evaluate("document.documentElement.scrollWidth") <= 390, name
    await keep_screenshot(page, name)
    await page.set_viewport_size({"width": 1280, "height": 800})


async def sign_in(page: Page, url: str, token: str) -> None:
    await page.goto(url)
    await page.get_by_label("API token").fill(token)
    await page.get_by_role("button", name="Sign in").click()
    await expect(page.locator("#live")).to_have_text("live", timeout=5000)


async def test_console_live_presence_push_roles_and_rejections(running: Running, browser: Browser) -> None:
    svc = running.service
    secrets = {d: await svc.add_device(d, {"site": "berlin" if d != "edge9" else "paris"})
               for d in ("cam1", "cam2", "edge9")}
    await svc.push("cam1", {"port": 80})
    await svc.push("cam2", {"port": 80})
    tasks: list[asyncio.Task[None]] = []
    async with HttpServer(svc, "127.0.0.1", 0) as server:
        operator = (await svc.create_token("ops", "operator"))["token"]
        viewer = (await svc.create_token("look", "viewer"))["token"]
        page, errors = await desktop_page(browser)
        try:
            await sign_in(page, server.url, operator)
            row = page.locator('tr[data-device="cam1"]')
            await expect(row).to_have_attribute("data-state", "offline")
            await expect(page.locator("#sum-devices b")).to_have_text("3")

            # A device connecting turns its row online within 2 s, without a reload.
            tasks.append(await reporting_device(running, "cam1", secrets["cam1"]))
            await expect(row).to_have_attribute("data-state", "online", timeout=2000)
            await expect(page.locator("#sum-online b")).to_have_text("1", timeout=2000)

            # Filters: a label and a state.
            await page.get_by_label("Label", exact=True).fill("site=paris")
            await expect(page.locator("tbody tr")).to_have_count(1)
            await page.get_by_label("Label", exact=True).fill("")
            await page.get_by_label("State").select_option("online")
            await expect(page.locator("tbody tr")).to_have_count(1)
            await page.get_by_label("State").select_option("")

            # A push from the page reaches the device, and its row shows the new version applied.
            await row.get_by_role("link", name="cam1").click()
            await expect(page.locator("#d-title")).to_have_text("cam1")
            config = page.get_by_label("Config (JSON) for the next version")
            await expect(config).to_have_value(json.dumps({"port": 80}, indent=2))
            await config.fill('{"port": 8080}')
            await page.get_by_label("Message").fill("from the console")
            await page.get_by_role("button", name="Push").click()
            await expect(page.locator("#push-note")).to_contain_text("Stored v2")
            await expect(page.locator('dd[data-fact="Applied"]')).to_contain_text("v2", timeout=5000)
            assert (await svc.get_version("cam1")).config == {"port": 8080}
            assert (await svc.get_version("cam1")).actor == "token:ops"
            await page.get_by_role("button", name="Compare").click()
            await expect(page.locator("#diff .del")).to_contain_text('"port": 80')
            await expect(page.locator("#diff .add")).to_contain_text('"port": 8080')
            await page.get_by_role("link", name="All devices").click()
            await expect(row.locator("td.version")).to_have_text("v2 (applied v2)", timeout=5000)

            # A rejected version shows the device's error.
            tasks.append(await reporting_device(running, "cam2", secrets["cam2"], reject="port 99999 is out of range"))
            await svc.push("cam2", {"port": 99999})
            cam2 = page.locator('tr[data-device="cam2"]')
            await expect(cam2).to_have_attribute("data-sync", "rejected", timeout=5000)
            await expect(cam2).to_contain_text("port 99999 is out of range")
            await expect(page.locator("#sum-rejected b")).to_have_text("1")

            # Rollout progress, live: a rollout started elsewhere appears with its waves.
            started = await svc.start_rollout({"port": 443}, labels={"site": "paris"}, waves=[100], min_applied=100)
            card = page.locator(f'article[data-rollout="{started["id"]}"]')
            await expect(card).to_have_attribute("data-state", "completed", timeout=5000)
            await expect(card.locator('li[data-wave="1"]')).to_contain_text("1 offline")
            await expect(page.locator('tr[data-device="edge9"] td.version')).to_have_text("v1", timeout=5000)
            if os.environ.get("HENGE_SCREENSHOT"):
                await page.screenshot(path=str(ROOT / "docs" / "console.png"))

            # A viewer can look, not push.
            await page.get_by_role("button", name="Sign out").click()
            await sign_in(page, server.url, viewer)
            await page.locator('tr[data-device="cam1"]').get_by_role("link", name="cam1").click()
            await expect(page.get_by_role("button", name="Push")).to_be_disabled()
            await expect(page.locator("#push-note")).to_contain_text("viewer")
            refused = await page.evaluate("""async (token) => (await fetch('/api/v1/devices/cam1/config', {
                method: 'PUT', headers: {'Authorization': 'Bearer ' + token, 'Content-Type': 'application/json'},
                body: '{"port": 1}'})).status""", viewer)
            assert refused == 403
            assert (await svc.get_version("cam1")).config == {"port": 8080}

            # On a phone-sized screen the page still works (the wide columns fold away).
            await page.set_viewport_size({"width": 390, "height": 800})
            await page.get_by_role("link", name="All devices").click()
            await expect(page.locator('tr[data-device="cam1"] td.wide').first).to_be_hidden()
            assert errors == []
        finally:
            await page.close()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


async def test_the_interactive_api_page_renders_offline(running: Running, browser: Browser) -> None:
    """Swagger UI from the package (no CDN): every route of the OpenAPI document is on the page."""
    async with HttpServer(running.service, "127.0.0.1", 0) as server:
        page = await browser.new_page()
        outside: list[str] = []
        page.on("request", lambda r: outside.append(r.url) if not r.url.startswith(server.url) else None)
        try:
            await page.goto(server.url + "api/v1/docs")
            await expect(page.locator(".opblock").first).to_be_visible(timeout=10_000)
            assert await page.locator(".opblock").count() >= 25
            await expect(page.get_by_text("PUT", exact=True).first).to_be_visible()
        finally:
            await page.close()
        assert outside == []


async def test_the_console_tells_the_truth(running: Running, browser: Browser) -> None:
    """Issue 19: a concurrent edit is refused (If-Match) and shown with its diff, then rebased; the
    note under the push form follows the device's answer; a rejection keeps its reason in the versions
    table after a later version; long errors wrap (the buttons stay on screen); times are relative with
    the exact time on hover; a device without a config says so."""
    import re

    svc = running.service
    secret = await svc.add_device("cam1")
    await svc.add_device("blank")
    await svc.push("cam1", {"port": 80})
    long_error = "port out of range: " + "the firmware only accepts ports below 1024; " * 12

    async def picky_device() -> None:  # rejects any port above 1023, applies the rest
        async with running.device_client("cam1", secret) as c:
            await c.subscribe(svc.topics.config("cam1"), qos=1)
            async for message in c.messages:
                snapshot = json.loads(message.payload)  # type: ignore[arg-type]
                bad = snapshot["config"].get("port", 0) > 1023
                report = {"version": snapshot["version"], "status": "rejected" if bad else "applied"} | (
                    {"error": long_error} if bad else {})
                await c.publish(svc.topics.report("cam1"), json.dumps(report), qos=1)

    device = asyncio.create_task(picky_device())
    async with HttpServer(svc, "127.0.0.1", 0) as server:
        operator = (await svc.create_token("ops", "operator"))["token"]
        page, errors = await desktop_page(browser)
        try:
            await sign_in(page, server.url, operator)
            await page.goto(f"{server.url}#/device/blank")
            await expect(page.locator('dd[data-fact="Sync"]')).to_have_text("no config")

            await page.goto(f"{server.url}#/device/cam1")
            config = page.get_by_label("Config (JSON) for the next version")
            await expect(config).to_have_value(json.dumps({"port": 80}, indent=2))
            # Someone else stores v2 while this page is open: the page's push is refused, not stored over it.
            await svc.push("cam1", {"port": 81}, message="from the CLI")
            await config.fill('{"port": 82}')
            await page.get_by_role("button", name="Push").click()
            note = page.locator("#push-note")
            await expect(note).to_contain_text("changed since you opened it (v1 → v2 by library")
            await expect(page.locator("#push-conflict pre")).to_contain_text('+  "port": 81')
            assert (await svc.get_version("cam1")).config == {"port": 81}
            await page.get_by_role("button", name="Rebase my edit onto v2").click()
            await page.get_by_role("button", name="Push").click()
            await expect(note).to_contain_text("Stored v3")
            await expect(note).to_have_text("The device applied v3.", timeout=5000)

            # A rejection: the note says so (not "waiting"), with the device's reason.
            await config.fill('{"port": 8080}')
            await page.get_by_role("button", name="Push").click()
            await expect(note).to_contain_text("The device rejected v4: port out of range", timeout=5000)
            # A later version is applied; v4 keeps its own report and reason in the table.
            await config.fill('{"port": 443}')
            await page.get_by_role("button", name="Push").click()
            await expect(note).to_have_text("The device applied v5.", timeout=5000)
            v4 = page.locator("#d-versions tbody tr", has_text="v4")
            await expect(v4.locator("td.sync-rejected")).to_contain_text("rejected: port out of range")
            # Long errors wrap: every Roll back button stays within the page's width.
            for button in await page.locator("#d-versions button").all():
                box = await button.bounding_box()
                assert box is not None and box["x"] + box["width"] <= 1280, box
            # Times as people read them, the exact time on hover.
            when = v4.locator("time")
            assert re.fullmatch(r"\d+s ago", await when.inner_text())
            assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", await when.get_attribute("title") or "")
            await expect(page.locator('dd[data-fact="Since"] time')).to_have_count(1)
            assert errors == []
        finally:
            await page.close()
            device.cancel()
            await asyncio.gather(device, return_exceptions=True)


async def test_the_console_shows_reported_state_drift_and_filters_where(running: Running, browser: Browser) -> None:
    """The device page shows what the device reports; a config edited on the device shows as
    drift, and an operator delivers the version again from the page; the Where box filters the
    table by what devices report (the service parses it: a typo shows its error)."""
    from .test_mqtt5 import device5
    from .test_twins import publish5, reported, subscribe_to_config

    svc = running.service
    clients = {}
    for device, fw in (("cam1", "2.3.1"), ("cam2", "2.4.0"), ("cam3", "2.10.0")):
        clients[device], _, _ = await device5(running, device, {"port": 80})
        await publish5(clients[device], svc.topics.reported(device), reported({"fw": fw}), 1)
    good = config_sha256({"port": 80})
    await publish5(clients["cam1"], svc.topics.reported("cam1"), reported(patch={"config_sha256": good}), 2)
    await publish5(clients["cam1"], svc.topics.report("cam1"), b'{"version": 1, "status": "applied"}', 3)
    await publish5(clients["cam1"], svc.topics.reported("cam1"), reported(patch={"config_sha256": "edited"}), 4)
    await wait_status(running, "cam1", lambda r: r["sync"] == "drift")
    async with console_as(svc, browser, "operator") as (server, tokens, page):
        await sign_in(page, server.url, tokens["operator"])
        await expect(page.locator('tr[data-device="cam1"]')).to_have_attribute("data-sync", "drift")
        await expect(page.locator("#sum-drift b")).to_have_text("1")
        where = page.get_by_label("Where")
        await where.fill('reported.fw < "2.4"')
        await expect(page.locator("#devices tbody tr")).to_have_count(1)
        await expect(page.locator('tr[data-device="cam1"]')).to_be_visible()
        await where.fill('reported.fw >= "2.4"')
        await expect(page.locator("#devices tbody tr")).to_have_count(2)
        await where.fill("reported.fw >= 2.4.0")
        await expect(page.locator("#f-where-error")).to_contain_text("quote strings and versions")
        await expect(page.locator("#devices tbody tr")).to_have_count(0)
        await where.fill("")
        await expect(page.locator("#devices tbody tr")).to_have_count(3)

        await page.locator('tr[data-device="cam1"]').get_by_role("link", name="cam1").click()
        await expect(page.locator("#d-reported")).to_contain_text('"fw": "2.3.1"')
        await expect(page.locator("#d-reported-when")).to_contain_text("#3")
        await subscribe_to_config(clients["cam1"], svc.topics.config("cam1"))
        await page.get_by_role("button", name="Deliver the current version again").click()
        await expect(page.locator("#reconcile-note")).to_contain_text("v1 delivered again.")
        again = await clients["cam1"].read_until(codec.Publish)
        assert json.loads(again.payload)["version"] == 1
        await publish5(clients["cam1"], svc.topics.reported("cam1"), reported(patch={"config_sha256": good}), 9)
        await expect(page.locator('dd[data-fact="Sync"]')).to_have_text("in_sync", timeout=5000)
        await expect(page.get_by_role("button", name="Deliver the current version again")).to_be_hidden()


async def test_a_view_can_be_shared_reloaded_and_paged_from_the_keyboard(running: Running, browser: Browser) -> None:
    """Filters, sort and page live in the URL (a view to share and reload); summary cards link to
    their filter; 250 devices page 100 at a time with n and p; / focuses the search."""
    svc = running.service
    await svc.worker.run(svc.store.add_devices, [(f"dev{i:03}", {"site": "berlin" if i % 2 else "paris"})
                                                  for i in range(250)])
    await svc.push("dev001", {"v": 1})
    async with console_as(svc, browser, "viewer") as (server, tokens, page):
        await sign_in(page, server.url, tokens["viewer"])
        rows = page.locator("#devices tbody tr")
        await expect(rows).to_have_count(100)
        await expect(page.locator("#shown")).to_contain_text("page 1 of 3")
        await page.locator("body").press("n")
        await expect(rows.first).to_have_attribute("data-device", "dev100")
        assert "page=2" in page.url
        await page.locator("body").press("n")
        await expect(rows).to_have_count(50)
        await expect(rows.first).to_have_attribute("data-device", "dev200")
        await page.locator("body").press("p")
        await page.locator("body").press("p")
        await expect(rows).to_have_count(100)
        await expect(rows.first).to_have_attribute("data-device", "dev000")
        await page.locator("body").press("/")
        await expect(page.locator("#f-q")).to_be_focused()
        # A filtered, sorted view is in the URL; opening that URL elsewhere shows the same view.
        await page.get_by_label("Label", exact=True).fill("site=berlin")
        await page.locator('th button[data-sort="device"]').click()  # descending
        await expect(rows.first).to_have_attribute("data-device", "dev249")
        shared = page.url
        assert "label=site%3Dberlin" in shared and "sort=-device" in shared
        other = await browser.new_page(viewport={"width": 1280, "height": 800})
        try:
            await other.goto(server.url)
            await other.evaluate("(t) => sessionStorage.setItem('henge-token', t)", tokens["viewer"])
            await other.goto(shared)
            await other.reload()  # a fresh load of the shared URL, signed in (the token is per tab)
            await expect(other.locator("#devices tbody tr")).to_have_count(100)
            await expect(other.locator("#devices tbody tr").first).to_have_attribute("data-device", "dev249")
            await expect(other.get_by_label("Label", exact=True)).to_have_value("site=berlin")
        finally:
            await other.close()
        # A summary card is a link to its filter, and the device page's back link returns to the view.
        await page.locator("#sum-offline a").click()  # the card's filter, alone
        await expect(page.get_by_label("State")).to_have_value("offline")
        await expect(page.get_by_label("Label", exact=True)).to_have_value("")
        assert page.url.endswith("#/?state=offline")
        await page.get_by_label("Search").fill("dev24")
        await page.locator('tr[data-device="dev249"]').get_by_role("link", name="dev249").click()
        await expect(page.locator("#d-title")).to_have_text("dev249")
        await page.get_by_role("link", name="All devices").click()
        await expect(page.get_by_label("State")).to_have_value("offline")
        await expect(page.get_by_label("Search")).to_have_value("dev24")
        await expect(rows).to_have_count(10)


async def test_device_actions_from_the_page_with_the_api_s_role_rules(running: Running, browser: Browser) -> None:
    """Kick, clear conflict, rotate secret (shown once), labels, remove (typed confirmation); a
    viewer sees every button disabled with the reason, an operator only the admin's."""
    svc = running.service
    secret = await svc.add_device("cam1", {"site": "berlin"})
    await svc.push("cam1", {"v": 1})
    tasks = [await reporting_device(running, "cam1", secret)]
    async with HttpServer(svc, "127.0.0.1", 0) as server:
        tokens = {role: (await svc.create_token(f"t-{role}", role))["token"]
                  for role in ("viewer", "operator", "admin")}
        page, errors = await desktop_page(browser)
        try:
            await sign_in(page, server.url, tokens["viewer"])
            await page.goto(server.url + "#/device/cam1")
            await expect(page.locator("#d-title")).to_have_text("cam1")
            for name in ("Kick (close its connection)", "Rotate secret", "Save labels", "Remove device"):
                button = page.get_by_role("button", name=name)
                await expect(button).to_be_disabled()
                await expect(button).to_have_attribute("title", re.compile("Your role \\(viewer\\) cannot"))
            await page.get_by_role("button", name="Sign out").click()

            await sign_in(page, server.url, tokens["operator"])
            await page.goto(server.url + "#/device/cam1")
            await expect(page.get_by_role("button", name="Rotate secret")).to_be_disabled()
            await expect(page.get_by_role("button", name="Clear conflict")).to_have_attribute(
                "title", "It has no identity conflict.")
            await wait_status(running, "cam1", lambda r: r["online"])
            await page.goto(server.url + "#/")
            await page.goto(server.url + "#/device/cam1")
            await page.get_by_role("button", name="Kick (close its connection)").click()
            await expect(page.locator("#act-note")).to_contain_text("Its connection was closed")
            await wait_status(running, "cam1", lambda r: r["reason"] == "kicked" or r["epoch"] > 1)
            await page.get_by_role("button", name="Sign out").click()

            await sign_in(page, server.url, tokens["admin"])
            await page.goto(server.url + "#/device/cam1")
            labels = page.get_by_label("Labels (k=v, comma-separated)")
            await expect(labels).to_have_value("site=berlin")
            await labels.fill("site=paris, tier=gold")
            await page.get_by_role("button", name="Save labels").click()
            await expect(page.locator("#act-note")).to_contain_text("Labels saved: site=paris, tier=gold.")
            assert (await svc.get_device("cam1")).labels == {"site": "paris", "tier": "gold"}
            await page.get_by_role("button", name="Rotate secret").click()
            shown = page.locator("#secret-value")
            await expect(shown).not_to_have_text("")
            new_secret = await shown.text_content()
            assert new_secret and svc.store.verify_device("cam1", new_secret) and not svc.store.verify_device(
                "cam1", secret)
            remove = page.get_by_role("button", name="Remove device")
            await expect(remove).to_be_disabled()
            await page.get_by_label("Type the device id to remove it").fill("cam")
            await expect(remove).to_be_disabled()
            await page.get_by_label("Type the device id to remove it").fill("cam1")
            await remove.click()
            await expect(page.locator("#fleet")).to_be_visible()
            await wait_until(lambda: not svc.store.has_device("cam1"), what="cam1 removed")
            assert [e["action"] for e in await svc.audit(limit=20) if e["device"] == "cam1"][-4:] == [
                "kick", "device.label", "device.rotate_secret", "device.remove"]
            assert errors == []
        finally:
            await page.close()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


async def test_the_audit_trail_with_filters_in_the_url(running: Running, browser: Browser) -> None:
    svc = running.service
    await svc.add_device("cam1")
    await svc.add_device("cam2")
    await svc.push("cam1", {"v": 1})
    await svc.push("cam1", {"v": 2})
    await svc.push("cam2", {"v": 1})
    async with console_as(svc, browser, "viewer") as (server, tokens, page):
        await sign_in(page, server.url, tokens["viewer"])
        await page.get_by_role("link", name="Audit").click()
        rows = page.locator("#a-table tbody tr")
        await expect(rows).to_have_count(6)  # 2 adds, 3 pushes, the token
        await expect(rows.first).to_have_attribute("data-action", "token.create")  # newest first
        await page.get_by_label("Device", exact=True).fill("cam1")
        await expect(rows).to_have_count(3)
        await page.get_by_label("Action or actor").fill("push")
        await expect(rows).to_have_count(2)
        assert "device=cam1" in page.url and "q=push" in page.url
        await keep_screenshot(page, "audit")
        await fits_a_phone(page, "audit-phone")
        await page.reload()
        await expect(page.get_by_label("Device", exact=True)).to_have_value("cam1")
        await expect(rows).to_have_count(2)
        await rows.first.get_by_role("link", name="cam1").click()
        await expect(page.locator("#d-title")).to_have_text("cam1")


async def _accept(dialog: Dialog) -> None:
    await dialog.accept()


async def _dismiss(dialog: Dialog) -> None:
    await dialog.dismiss()


async def test_rollouts_are_paused_resumed_and_aborted_from_the_page(running: Running, browser: Browser) -> None:
    """A running rollout's buttons: a viewer sees them disabled with the reason; an operator pauses,
    resumes, cancels an abort at the confirmation, then aborts and reverts it."""
    svc = running.service
    silent = contextlib.AsyncExitStack()
    for device in ("r1", "r2", "r3", "r4"):
        secret = await svc.add_device(device, {"site": "x"})
        await svc.push(device, {"v": 0})
        await silent.enter_async_context(aiomqtt.Client("127.0.0.1", running.port, identifier=device,
                                                        username=device, password=secret, timeout=5))
        await wait_status(running, device, lambda r: r["online"])
    # Connected devices that never report: the first wave waits for them (a long timeout) and stays running.
    started = await svc.start_rollout({"v": 1}, labels={"site": "x"}, waves=[50, 100], min_applied=100,
                                      wave_timeout=3600)
    rollout = started["id"]
    async with silent, console_as(svc, browser, "viewer", "operator") as (server, tokens, page):
        await sign_in(page, server.url, tokens["viewer"])
        article = page.locator(f'article[data-rollout="{rollout}"]')
        await expect(article).to_have_attribute("data-state", "running")
        for name in ("Pause", "Abort", "Abort and revert"):
            button = article.get_by_role("button", name=name, exact=True)
            await expect(button).to_be_disabled()
            await expect(button).to_have_attribute("title", re.compile(r"Your role \(viewer\) cannot"))
        await page.get_by_role("button", name="Sign out").click()

        await sign_in(page, server.url, tokens["operator"])
        await article.get_by_role("button", name="Pause", exact=True).click()
        await expect(article).to_have_attribute("data-state", "paused")
        assert (await svc.rollout_status(rollout))["state"] == "paused"
        await article.get_by_role("button", name="Resume", exact=True).click()
        await expect(article).to_have_attribute("data-state", "running")
        page.once("dialog", _dismiss)  # asked to confirm, the operator says no: nothing happens
        await article.get_by_role("button", name="Abort", exact=True).click()
        await expect(page.locator("#rollout-note")).not_to_contain_text("Abort")
        assert (await svc.rollout_status(rollout))["state"] == "running"
        page.once("dialog", _accept)
        await article.get_by_role("button", name="Abort and revert", exact=True).click()
        await expect(page.locator("#rollout-note")).to_contain_text(f"Abort and revert: rollout {rollout} is")
        await expect(article).to_have_attribute("data-state", "aborted")
        await expect(article.get_by_role("button")).to_have_count(0)  # nothing left to do with it
        status = await svc.rollout_status(rollout)
        assert status["state"] == "aborted"
        for device in ("r1", "r2", "r3", "r4"):
            assert (await svc.get_version(device)).config == {"v": 0}  # reverted (or never changed)


async def test_devices_are_added_and_imported_with_a_preview(running: Running, browser: Browser,
                                                            tmp_path: Path) -> None:
    """Add one device (its secret shown once, with a copy button); import many from CSV, pasted or
    from a file, with a line-by-line preview that lists problems first and stores nothing until
    they are fixed; the new secrets are a download, once; a viewer's buttons say why not."""
    svc = running.service
    await svc.add_device("old1", {"site": "moon"})
    async with console_as(svc, browser, "viewer", "admin") as (server, tokens, page):
        await sign_in(page, server.url, tokens["viewer"])
        await page.get_by_text("Add devices").click()
        await expect(page.get_by_role("button", name="Add device")).to_have_attribute(
            "title", "Your role (viewer) cannot: this needs admin.")
        await page.get_by_role("button", name="Sign out").click()

        await sign_in(page, server.url, tokens["admin"])
        await page.get_by_text("Add devices").click()
        await page.get_by_label("New device id").fill("new1")
        await page.get_by_label("With labels k=v, comma-separated").fill("site=lab, tier=gold")
        await page.get_by_role("button", name="Add device").click()
        shown = page.locator("#add-secret")
        await expect(shown).not_to_have_text("")
        secret = await shown.text_content()
        assert secret and svc.store.verify_device("new1", secret)
        assert (await svc.get_device("new1")).labels == {"site": "lab", "tier": "gold"}
        await expect(page.locator("#devices tbody tr[data-device='new1']")).to_have_count(1)

        csv = page.get_by_label("or paste it")
        await csv.fill('id,site\ncam-a,berlin\ncam-b,"paris, 11e"\nbad id,x\ncam-a,again\nold1,sun\n')
        preview = page.locator("#import-preview tbody tr")
        await expect(preview).to_have_count(5)
        await expect(preview.nth(0)).to_contain_text("not a device id")  # problems first
        await expect(preview.nth(1)).to_contain_text("appears twice")
        await expect(preview.nth(2)).to_contain_text("exists (tick the box")
        importing = page.locator("#import-button")
        await expect(importing).to_be_disabled()
        await expect(importing).to_have_attribute("title", "Fix the lines marked first.")
        await csv.fill('id,site\ncam-a,berlin\ncam-b,"paris, 11e"\nold1,sun\n')
        await page.get_by_label("devices that exist get these labels").check()
        await expect(page.locator("#import-summary")).to_have_text("3 lines: 2 new devices, 1 updated.")
        await expect(preview.nth(1)).to_contain_text("site=paris, 11e")
        assert not svc.store.has_device("cam-a")  # a preview stores nothing
        await page.get_by_role("button", name="Import 3 devices").click()
        await expect(page.locator("#add-note")).to_have_text("Imported: 2 new devices, 1 updated.")
        async with page.expect_download() as download_info:
            await page.get_by_role("link", name=re.compile("Download the 2 new secrets")).click()
        download = await download_info.value
        lines = Path(await download.path()).read_text().splitlines()
        assert lines[0] == "id,secret" and sorted(line.split(",")[0] for line in lines[1:]) == ["cam-a", "cam-b"]
        for line in lines[1:]:
            device, device_secret = line.split(",")
            assert svc.store.verify_device(device, device_secret)
        assert (await svc.get_device("cam-b")).labels == {"site": "paris, 11e"}
        assert (await svc.get_device("old1")).labels == {"site": "sun"}

        # From a file: the same preview.
        path = tmp_path / "more.csv"
        path.write_text("id,site\ncam-c,rome\n")
        await page.locator("#import-file").set_input_files(str(path))
        await expect(page.locator("#import-summary")).to_have_text("1 lines: 1 new devices, 0 updated.")
        await expect(page.get_by_role("button", name="Import 1 devices")).to_be_enabled()


async def test_tokens_are_created_and_revoked_from_the_page(running: Running, browser: Browser) -> None:
    """The tokens view: an admin lists, creates (the token shown once) and revokes (after a
    confirmation) tokens; a viewer is told it cannot."""
    svc = running.service
    async with console_as(svc, browser, "viewer", "admin") as (server, tokens, page):
        await sign_in(page, server.url, tokens["viewer"])
        await page.get_by_role("link", name="Tokens").click()
        await expect(page.locator("#t-note")).to_have_text(
            "Your role (viewer) cannot see or make tokens: this needs admin.")
        await expect(page.get_by_role("button", name="Create token")).to_be_disabled()
        await page.get_by_role("button", name="Sign out").click()

        await sign_in(page, server.url, tokens["admin"])
        await page.goto(server.url + "#/tokens")
        rows = page.locator("#t-table tbody tr")
        await expect(rows).to_have_count(2)
        await page.get_by_label("Token name").fill("ci-bot")
        await page.get_by_label("Role").select_option("operator")
        await page.get_by_role("button", name="Create token").click()
        shown = page.locator("#t-secret")
        await expect(shown).not_to_have_text("")
        token = await shown.text_content()
        assert token and svc.verify_token(token) == ("ci-bot", "operator")
        await expect(rows).to_have_count(3)
        page.once("dialog", _accept)
        await page.locator("#t-table tr[data-token='ci-bot']").get_by_role("button", name="Revoke").click()
        await expect(page.locator("#t-note")).to_have_text("Token ci-bot revoked.")
        await expect(rows).to_have_count(2)
        assert svc.verify_token(token) is None
        assert [e["action"] for e in await svc.audit(limit=10)][-2:] == ["token.create", "token.revoke"]
        await keep_screenshot(page, "tokens")
        await fits_a_phone(page, "tokens-phone")


async def test_a_fleet_push_is_previewed_then_pushed_from_the_page(running: Running, browser: Browser) -> None:
    """Push to many: the preview names the devices that would change and shows one diff, stores
    nothing; the push button waits for a preview of exactly what is in the form; a viewer may
    preview, not push."""
    svc = running.service
    for device, site in (("p1", "b"), ("p2", "b"), ("p3", "c")):
        await svc.add_device(device, {"site": site})
    await svc.push("p1", {"port": 80})
    async with console_as(svc, browser, "viewer", "operator") as (server, tokens, page):
        await sign_in(page, server.url, tokens["operator"])
        await page.get_by_text("Push to many devices").click()
        await page.get_by_label("Target (k=v, or a filter)").fill("site=b")
        await page.get_by_label("Layer for every device (JSON)").fill('{"port": 81}')
        push = page.locator("#many-push")
        await expect(push).to_be_disabled()
        await expect(push).to_have_attribute("title", "Preview first: see which devices change, and how.")
        await page.get_by_role("button", name="Preview").click()
        await expect(page.locator("#many-note")).to_have_text(
            "Would change 2 of 2 devices (0 already there): p1, p2. The change for p1:")
        await expect(page.locator("#many-diff .add")).to_contain_text(['+  "port": 81'])
        await expect(page.locator("#many-diff .del")).to_contain_text(['-  "port": 80'])
        assert [r.version for r in svc.store.history("p1")] == [1] and not svc.store.history("p2")
        await page.get_by_label("Layer for every device (JSON)").fill('{"port": 82}')
        await expect(push).to_be_disabled()  # not what was previewed
        await page.get_by_role("button", name="Preview").click()
        await page.get_by_role("button", name="Push to 2 devices").click()
        await expect(page.locator("#many-note")).to_contain_text("Pushed: 2 devices, 0 unchanged;")
        assert (await svc.get_version("p1")).config == {"port": 82}
        assert (await svc.get_version("p2")).config == {"port": 82}
        assert not svc.store.history("p3")
        await page.get_by_role("button", name="Sign out").click()

        await sign_in(page, server.url, tokens["viewer"])
        await page.get_by_text("Push to many devices").click()
        await page.get_by_label("Devices", exact=True).select_option("where")
        await page.get_by_label("Target (k=v, or a filter)").fill('labels.site == "c"')
        await page.get_by_label("Layer for every device (JSON)").fill('{"port": 82}')
        await page.get_by_role("button", name="Preview").click()
        await expect(page.locator("#many-note")).to_contain_text("Would change 1 of 1 devices")
        await expect(push).to_be_disabled()
        await expect(push).to_have_attribute("title", "Your role (viewer) cannot: this needs operator.")


async def test_a_rollout_is_planned_previewed_and_started_from_the_page(running: Running, browser: Browser) -> None:
    """The rollout wizard: target, change, waves and thresholds; the preview shows each wave's size
    and one device's diff and starts nothing; the start button starts exactly what was previewed,
    and the rollout shows above with its buttons."""
    svc = running.service
    for i in range(10):
        await svc.add_device(f"w{i}", {"site": "b"})
    async with console_as(svc, browser, "operator") as (server, tokens, page):
        await sign_in(page, server.url, tokens["operator"])
        await page.get_by_text("Push to many devices, at once or in waves").click()
        await page.get_by_label("Target (k=v, or a filter)").fill("site=b")
        await page.get_by_label("Layer for every device (JSON)").fill('{"v": 1}')
        await expect(page.locator("#many-waves")).to_be_hidden()  # at once: no waves to set
        await page.get_by_label("How").select_option("rollout")
        await expect(page.locator("#many-waves")).to_be_visible()
        await page.get_by_label("Waves, cumulative %").fill("10,100")
        await page.get_by_label("A wave passes at % applied").fill("100")
        await page.get_by_role("button", name="Preview").click()
        await expect(page.locator("#many-wave-sizes li")).to_have_text(["wave 1: 1 devices", "wave 2: 9 devices"])
        await expect(page.locator("#many-note")).to_contain_text(
            "Would roll out to 10 devices in 2 waves, changing the config of 10 (0 already there). A wave goes on "
            "when 100% of its online devices applied within 300 s")
        await expect(page.locator("#many-diff .add")).to_contain_text(['+  "v": 1'])
        assert await svc.list_rollouts() == []
        await page.get_by_role("button", name="Start rollout of 10 devices").click()
        await expect(page.locator("#many-note")).to_contain_text("started: 10 devices in 2 waves")
        started = await svc.list_rollouts()
        assert len(started) == 1
        assert [w["targeted"] for w in (await svc.rollout_status(started[0]["id"]))["waves"]] == [1, 9]
        article = page.locator(f'article[data-rollout="{started[0]["id"]}"]')
        await expect(article).to_be_visible()


async def test_the_fleet_over_time_is_drawn_from_the_stored_series(running: Running, browser: Browser) -> None:
    """The chart of the fleet over 24 hours and 7 days: every stored point drawn (a gap where the
    service was down stays a gap), the legend's latest numbers the API's."""
    svc = running.service
    await svc.add_device("a")
    now = int(time.time() // 60)
    for i in range(30):  # 20 minutes, a 10-minute gap, then the last minutes
        if not 20 <= i < 25:
            online = i % 7
            await svc.worker.run(svc.store.record_point, now - 40 + i, {
                "devices": 10, "online": online, "in_sync": online, "pending": 0, "rejected": 10 - online,
                "drift": 0, "conflicts": 0})
    async with console_as(svc, browser, "viewer") as (server, tokens, page):
        before = await svc.fleet_series("24h")
        await sign_in(page, server.url, tokens["viewer"])
        chart = page.locator("#chart")
        await expect(chart).to_have_attribute("data-window", "24h")
        after = await svc.fleet_series("24h")  # (a minute may have turned meanwhile: a point more)
        drawn = await chart.get_attribute("data-points")
        series = before if drawn == str(len(before["points"])) else after
        assert drawn == str(len(series["points"]))
        latest = series["points"][-1]
        for key in ("online", "in_sync", "rejected"):
            await expect(page.locator(f"#chart-legend li[data-series='{key}'] b")).to_have_text(str(latest[key]))
        assert await chart.locator("polyline[data-series='online']").count() >= 2  # the gap splits the line
        await expect(page.locator("#devices tbody tr")).to_have_count(1)
        await keep_screenshot(page, "fleet")
        await page.get_by_role("button", name="Last 7 days").click()
        await expect(chart).to_have_attribute("data-window", "7d")
        week = await svc.fleet_series("7d")
        assert await chart.get_attribute("data-points") in {str(len(week["points"])),
                                                            str(len(week["points"]) - 1)}
        await expect(page.get_by_role("button", name="Last 7 days")).to_have_attribute("aria-pressed", "true")
        # On a phone the page folds: nothing wider than the screen but inside its own scroller.
        await page.set_viewport_size({"width": 390, "height": 800})
        await page.get_by_text("Push to many devices, at once or in waves").click()
        await page.get_by_text("Add devices").click()
        assert await page.evaluate("document.documentElement.scrollWidth") <= 390
        await keep_screenshot(page, "fleet-phone")


async def test_a_devices_presence_is_a_band_over_the_day_and_the_week(running: Running, browser: Browser) -> None:
    """The device page's presence band: the stored segments and marks of GET /devices/{id}/timeline."""
    svc = running.service
    secret = await svc.add_device("cam1")
    for _ in range(2):  # online, offline, online, offline
        async with aiomqtt.Client("127.0.0.1", running.port, identifier="cam1", username="cam1", password=secret,
                                  timeout=5):
            await wait_status(running, "cam1", lambda r: r["online"])
        await wait_status(running, "cam1", lambda r: not r["online"])

    async def stored() -> bool:
        return len((await svc.presence_timeline("cam1"))["segments"]) == 5

    await wait_until(stored, what="four changes in the stored history")
    async with console_as(svc, browser, "viewer") as (server, tokens, page):
        await sign_in(page, server.url, tokens["viewer"])
        await page.goto(server.url + "#/device/cam1")
        band = page.locator("#d-band")
        await expect(band).to_have_attribute("data-segments", "5")
        assert await band.locator("rect.seg-online").count() == 2
        assert await band.locator("rect.seg-offline").count() == 2
        await expect(page.locator("#d-band-desc")).to_contain_text(
            "of the last 24 hours; 0 takeovers, 0 conflicts.")
        await keep_screenshot(page, "device")
        await fits_a_phone(page, "device-phone")
        await page.get_by_role("button", name="Last 7 days").click()
        await expect(band).to_have_attribute("data-window", "7d")
        await expect(page.locator("#d-band-desc")).to_contain_text("of the last 7 days")


async def test_layers_are_edited_with_a_preview_as_you_type_and_explained(running: Running, browser: Browser) -> None:
    """The layers view: a layer checked as it is typed (not JSON; a schema it would break, with the
    device and pointer; which devices it changes and one diff), saved only when it passes, listed,
    edited again; and a device's config explained value by value."""
    svc = running.service
    for device, site in (("d1", "a"), ("d2", "a"), ("d3", "b")):
        await svc.add_device(device, {"site": site})
        await svc.push(device, {"name": device})
    await svc.set_schema({"site": "a"}, {"type": "object", "properties": {"port": {"type": "integer", "maximum": 100}}})
    async with console_as(svc, browser, "viewer", "operator") as (server, tokens, page):
        await sign_in(page, server.url, tokens["operator"])
        await page.get_by_role("link", name="Layers").click()
        await page.get_by_label("Which layer").fill("ports")
        await page.get_by_label("For devices labelled k=v, comma-separated").fill("site=a")
        content = page.get_by_label("Layer content (JSON, merged over the layers below it)")
        check, save = page.locator("#l-check"), page.locator("#l-save")
        await content.fill('{"port": ')
        await expect(check).to_contain_text("Not JSON")
        await expect(save).to_be_disabled()
        await content.fill('{"port": 999}')
        await expect(check).to_contain_text("Its schemas would refuse it: d1: /port:")
        await expect(save).to_be_disabled()
        await content.fill('{"port": 81}')
        await expect(check).to_have_text("Would change the config of 2 device(s): d1, d2. The change for d1:")
        await expect(page.locator("#l-diff .add")).to_contain_text(['+  "port": 81'])
        assert (await svc.get_version("d1")).config == {"name": "d1"}  # a preview stores nothing
        await expect(save).to_be_enabled()
        await page.get_by_label("Why this change").fill("ports for site a")
        await save.click()
        await expect(page.locator("#l-note")).to_have_text(
            "Layer ports is at version 1; 2 device(s) got a new version.")
        assert (await svc.get_version("d1")).config == {"name": "d1", "port": 81}
        assert (await svc.get_version("d3")).config == {"name": "d3"}
        row = page.locator("#l-table tr[data-layer='ports']")
        await expect(row).to_contain_text("site=a")
        await content.fill("{}")
        await row.get_by_role("button", name="Edit").click()
        await expect(content).to_have_value('{\n  "port": 81\n}')
        await expect(page.locator("#l-editing")).to_have_text("Layer ports (v1)")
        # Someone else changes the layer meanwhile: saving is refused (412), who and what is shown, and
        # the edit is kept to rebase onto their version.
        await svc.set_layer("ports", {"port": 82}, message="someone else")
        await content.fill('{"port": 83}')
        await expect(check).to_contain_text("Would change the config of 2 device(s)")
        await save.click()
        await expect(page.locator("#l-note")).to_contain_text(
            'Not stored: layer ports changed since you opened it (v1 → v2 by library: "someone else")')
        await expect(page.locator("#l-conflict pre")).to_contain_text('+  "port": 82')
        assert (await svc.get_version("d1")).config == {"name": "d1", "port": 82}
        await page.get_by_role("button", name="Rebase my edit onto v2").click()
        await expect(content).to_have_value('{"port": 83}')
        await expect(save).to_be_enabled()
        await save.click()
        await expect(page.locator("#l-note")).to_have_text(
            "Layer ports is at version 3; 2 device(s) got a new version.")
        await expect(page.locator("#l-editing")).to_have_text("Layer ports (v3)")
        assert (await svc.get_version("d1")).config == {"name": "d1", "port": 83}
        await page.get_by_label("Explain device").fill("d1")
        await page.get_by_role("button", name="Explain").click()
        explained = page.locator("#x-table tbody tr")
        await expect(explained).to_have_count(2)
        await expect(explained.filter(has_text="/port")).to_contain_text("ports@3")
        await keep_screenshot(page, "layers")
        await fits_a_phone(page, "layers-phone")
        await page.get_by_role("button", name="Sign out").click()

        await sign_in(page, server.url, tokens["viewer"])
        await page.goto(server.url + "#/layers")
        await row.get_by_role("button", name="Edit").click()
        await expect(save).to_have_attribute("title", "Your role (viewer) cannot: this needs operator.")


async def test_schemas_are_checked_against_every_config_as_they_are_typed(running: Running, browser: Browser) -> None:
    """The schema editor: not JSON, not a JSON Schema, a schema current configs break (which device,
    which pointer): each said as typed, and saving waits for a schema every config passes."""
    svc = running.service
    for device, port in (("d1", 500), ("d2", 50)):
        await svc.add_device(device, {"site": "a"})
        await svc.push(device, {"port": port})
    async with console_as(svc, browser, "operator", "admin") as (server, tokens, page):
        await sign_in(page, server.url, tokens["admin"])
        await page.goto(server.url + "#/layers")
        await page.get_by_label("For devices with").fill("site=a")
        document = page.get_by_label("Schema document (JSON Schema 2020-12)")
        check, save = page.locator("#s-check"), page.locator("#s-save")
        await document.fill('{"type": "object", "properties": {"port": {"maximum": 100}}')
        await expect(check).to_contain_text("Not JSON")
        await document.fill('{"type": 5}')
        await expect(check).to_contain_text("schema")
        await expect(check).to_have_class("error")
        await document.fill('{"type": "object", "properties": {"port": {"maximum": 100}}}')
        await expect(check).to_contain_text("It would refuse the current config of 1 device(s): d1: /port:")
        await expect(save).to_be_disabled()
        assert await svc.list_schemas() == []
        await document.fill('{"type": "object", "properties": {"port": {"maximum": 1000}}}')
        await expect(check).to_have_text("Every current config passes it; it would be schema site=a version 1.")
        await save.click()
        await expect(page.locator("#s-note")).to_have_text("Schema site=a is at version 1.")
        assert [s["schema"] for s in await svc.list_schemas()] == ["site=a"]
        await expect(page.locator("#s-table tr[data-schema='site=a']")).to_contain_text("v1")
        # Someone else sets version 2 meanwhile: this page's save (from v1) is refused (If-Match, 412),
        # the note says who and what, the edit is kept, and it is saved once rebased.
        await svc.set_schema({"site": "a"}, {"type": "object", "properties": {"port": {"maximum": 2000}}})
        await document.fill('{"type": "object", "properties": {"port": {"maximum": 600}}}')
        await expect(check).to_contain_text("Every current config passes it")
        await save.click()
        note = page.locator("#s-note")
        await expect(note).to_have_text("Not stored: schema site=a changed since you opened it (v1 → v2 by library). "
                                        "Your edit is kept above; rebase it onto v2 and save again.")
        await expect(page.locator("#s-conflict pre")).to_contain_text('+       "maximum": 2000')
        assert (await svc.get_schema({"site": "a"}))["version"] == 2
        await page.get_by_role("button", name="Rebase my schema onto v2").click()
        await expect(note).to_have_text("Your edit now applies to v2: save when ready.")
        await expect(check).to_contain_text("Every current config passes it")
        await save.click()
        await expect(note).to_have_text("Schema site=a is at version 3.")
        assert (await svc.get_schema({"site": "a"}))["document"]["properties"]["port"]["maximum"] == 600
        await page.get_by_role("button", name="Sign out").click()

        await sign_in(page, server.url, tokens["operator"])
        await page.goto(server.url + "#/layers")
        await page.locator("#s-table tr[data-schema='site=a']").get_by_role("button", name="Edit").click()
        await expect(check).to_contain_text("Every current config passes it")
        await expect(save).to_have_attribute("title", "Your role (operator) cannot: this needs admin.")


# Labels an operator's (or another team's) browser test finds fields by, as Playwright's get_by_label
# does: a case-insensitive substring. Each must stay one field, whatever views are added.
UNIQUE_LABELS = ("API token", "Search", "State", "Sync", "Where", "Config (JSON) for the next version", "Message",
                 "Labels (k=v, comma-separated)", "Type the device id to remove it", "Action or actor", "Newest",
                 "From", "Token name", "Role", "How", "Which layer")


async def test_every_field_an_operator_finds_by_its_label_is_one_field(browser: Browser) -> None:
    page, errors = await desktop_page(browser)
    try:
        await page.set_content((ROOT / "henge_mqtt" / "http" / "static" / "index.html").read_text())
        for label in UNIQUE_LABELS:
            assert await page.get_by_label(label).count() == 1, label
        assert errors == []
    finally:
        await page.close()


async def test_a_labels_edit_that_began_from_other_labels_is_refused_and_rebased(running: Running,
                                                                                  browser: Browser) -> None:
    """Labels are edited with If-Match (the labels' ETag): changed by someone else meanwhile, the
    save is refused (412), the page says from what to what and by whom, keeps the edit, and saves
    it once rebased."""
    svc = running.service
    await svc.add_device("cam1", {"site": "berlin"})
    async with console_as(svc, browser, "admin") as (server, tokens, page):
        await sign_in(page, server.url, tokens["admin"])
        await page.goto(server.url + "#/device/cam1")
        labels = page.get_by_label("Labels (k=v, comma-separated)")
        await expect(labels).to_have_value("site=berlin")
        await labels.fill("site=paris")
        await svc.set_labels("cam1", {"tier": "gold"}, [])  # someone else, meanwhile
        await page.get_by_role("button", name="Save labels").click()
        await expect(page.locator("#act-note")).to_have_text(
            "Not saved: the labels changed since you opened them (site=berlin → site=berlin, tier=gold, by library). "
            "Your edit is kept; rebase it onto theirs and save again.")
        assert (await svc.get_device("cam1")).labels == {"site": "berlin", "tier": "gold"}
        await expect(labels).to_have_value("site=paris")
        await page.get_by_role("button", name="Rebase my edit onto their labels").click()
        await expect(page.locator("#act-note")).to_have_text("Your edit now applies to their labels: save when ready.")
        await labels.fill("site=paris, tier=gold")
        await page.get_by_role("button", name="Save labels").click()
        await expect(page.locator("#act-note")).to_have_text("Labels saved: site=paris, tier=gold.")
        assert (await svc.get_device("cam1")).labels == {"site": "paris", "tier": "gold"}


async def test_an_edit_typed_while_the_page_refreshes_is_what_gets_pushed(running: Running, browser: Browser) -> None:
    """The device page refreshes itself on every event; when the operator types into the push form
    while that refresh's config is still on its way, their edit stays and is what the Push stores
    (the refresh had overwritten it with the current config: "Unchanged: v3 already holds this
    config", seen once in CI). The refresh's config request is held in the browser until the
    operator has typed."""
    svc = running.service
    await svc.add_device("cam1")
    await svc.push("cam1", {"port": 80})
    async with console_as(svc, browser, "operator") as (server, tokens, page):
        await sign_in(page, server.url, tokens["operator"])
        await page.goto(f"{server.url}#/device/cam1")
        config = page.get_by_label("Config (JSON) for the next version")
        await expect(config).to_have_value(json.dumps({"port": 80}, indent=2))
        held: asyncio.Queue[Route] = asyncio.Queue()

        async def hold_the_first(route: Route) -> None:
            if held.empty() and not release.is_set():
                await held.put(route)
            else:
                await route.continue_()

        release = asyncio.Event()
        await page.route(re.compile(r".*/devices/cam1/config$"), hold_the_first)
        await svc.push("cam1", {"port": 81}, message="from the CLI")  # an event: the page refreshes
        route = await asyncio.wait_for(held.get(), 10)  # the refresh asks for the config (v2's)
        release.set()
        await config.fill('{"port": 8443}')
        await route.continue_()
        await expect(page.locator('dd[data-fact="Desired version"]')).to_have_text("2")
        await expect(config).to_have_value('{"port": 8443}')
        await page.get_by_role("button", name="Push").click()
        # The edit began from v1 (the page had not shown v2): refused, never stored over v2 or lost.
        await expect(page.locator("#push-note")).to_contain_text("changed since you opened it (v1 → v2")
        await expect(config).to_have_value('{"port": 8443}')
        assert (await svc.get_version("cam1")).config == {"port": 81}
