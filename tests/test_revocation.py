"""Revoking a terminal over REST, against real hubs sharing one real PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator

import asyncpg
import pytest
import websockets

from hub.auth import REFRESH_S
from tests.conftest import TEST_SECRET
from tests.support import (
    JSON,
    Client,
    HubProcess,
    TenantKit,
    provisioned_tenant,
    punch_frame,
    running_hub,
)

pytestmark = pytest.mark.postgres


@pytest.fixture(scope="module")
def second_hub(database: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubProcess]:
    """Another hub process on the same database, as in a scale-out deployment."""
    env = {"ATTENDANCE_DATABASE_URL": database, "ATTENDANCE_SECRET": TEST_SECRET}
    with running_hub(tmp_path_factory.mktemp("second-hub"), env) as process:
        yield process


async def expect_revoked_close(client: object, timeout: float) -> None:
    """The next frame is `error token_revoked`, then the socket closes with 4001."""
    frame = await client.recv(timeout)  # type: ignore[attr-defined]
    assert frame["type"] == "error" and frame["code"] == "token_revoked", frame
    with pytest.raises(websockets.ConnectionClosed) as closed:
        await client.recv(timeout)  # type: ignore[attr-defined]
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 4001


async def expect_hello_refused(tenant: TenantKit, token: str) -> None:
    client = Client(await websockets.connect(tenant.ws_url, open_timeout=10), JSON)
    frame = await client.hello(token)
    assert (frame["type"], frame["code"]) == ("error", "bad_token"), frame
    assert "revoked" in frame["message"] or "replaced" in frame["message"]
    with pytest.raises(websockets.ConnectionClosed) as closed:
        await client.recv()
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 4001


async def test_revoking_a_device_closes_its_sockets_and_retires_its_token(
    tenant: TenantKit,
) -> None:
    old_token = tenant.terminal_token
    client = await tenant.connect(old_token)
    assert (await client.punch(punch_frame("e1")))["status"] == "accepted"

    response = await tenant.http.delete("/v1/devices/door")
    assert response.status_code == 200, response.text
    assert response.json() == {"device": "door", "revoked": True}
    # Same process as the REST call: at once.
    await expect_revoked_close(client, timeout=5)

    await expect_hello_refused(tenant, old_token)
    refused = await tenant.http.get("/v1/punches", headers={"authorization": f"Bearer {old_token}"})
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "unauthorized"
    # No new token for a revoked device until it is registered again.
    issued = await tenant.http.post("/v1/tokens", json={"role": "terminal", "sub": "door"})
    assert issued.status_code == 409, issued.text

    again = await tenant.http.put("/v1/devices/door", json={"site": "hq", "name": "Door"})
    assert again.status_code == 200, again.text
    new_token = again.json()["token"]
    client = await tenant.connect(new_token)
    assert (await client.punch(punch_frame("e2")))["status"] == "accepted"
    await client.close()
    await expect_hello_refused(tenant, old_token)

    conn = await asyncpg.connect(tenant.dsn)
    try:
        actions = await conn.fetch(
            "SELECT action, target FROM audit_log WHERE tenant = $1 ORDER BY seq", tenant.slug
        )
    finally:
        await conn.close()
    assert ("device.revoke", "device:door") in [tuple(row) for row in actions]


async def test_a_revocation_reaches_the_sockets_of_another_hub_within_seconds(
    tenant: TenantKit, second_hub: HubProcess
) -> None:
    elsewhere = TenantKit(second_hub.base_url, tenant.dsn, TEST_SECRET, tenant.slug)
    try:
        client = await elsewhere.connect(tenant.terminal_token)
        response = await tenant.http.delete("/v1/devices/door")
        assert response.status_code == 200, response.text
        # The other hub reads revocations every REFRESH_S seconds.
        await expect_revoked_close(client, timeout=REFRESH_S + 5)
        await expect_hello_refused(elsewhere, tenant.terminal_token)
    finally:
        await elsewhere.http.aclose()


async def test_only_admins_revoke_and_only_their_own_tenants_devices(
    tenant: TenantKit, hub_process: HubProcess
) -> None:
    supervisor = tenant.token("supervisor", "boss", sites=["*"])
    response = await tenant.http.delete(
        "/v1/devices/door", headers={"authorization": f"Bearer {supervisor}"}
    )
    assert response.status_code == 403
    async with provisioned_tenant(hub_process.base_url, tenant.dsn, TEST_SECRET, "twin") as twin:
        # The other tenant's `door` is its own: revoking it leaves this tenant's alone.
        assert (await twin.http.delete("/v1/devices/door")).status_code == 200
        assert (await twin.http.delete("/v1/devices/ghost")).status_code == 404
    client = await tenant.connect()
    assert (await client.punch(punch_frame("e1")))["status"] == "accepted"
    await client.close()
