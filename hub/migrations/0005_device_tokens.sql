-- A terminal's token carries its device's token version (`ver`). Revoking a device raises
-- the version and stamps `revoked_at`: every token issued before stops working, and
-- registering the device again (PUT) clears `revoked_at` and issues a token of the new
-- version. `updated_at` moves with every change, so hub processes can pick changes up.
ALTER TABLE devices
    ADD COLUMN token_version integer NOT NULL DEFAULT 1 CHECK (token_version >= 1),
    ADD COLUMN revoked_at timestamptz;
CREATE INDEX devices_by_update ON devices (updated_at);
