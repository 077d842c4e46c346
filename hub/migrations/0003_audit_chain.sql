-- A tamper-evident audit log: each tenant's rows form a hash chain. hub/audit.py computes
-- the hashes; docs/operations.md ("The audit chain") describes the encoding.

-- Sequence numbers count per tenant instead of one identity shared by every tenant, so that a
-- missing number is a missing row. Rows written before this migration keep their order; the
-- negation first keeps the primary key unique at every step of the renumbering.
ALTER TABLE audit_log ALTER COLUMN seq DROP IDENTITY;
ALTER TABLE audit_log ALTER COLUMN at DROP DEFAULT;
UPDATE audit_log SET seq = -seq;
UPDATE audit_log AS a
   SET seq = renumbered.seq
  FROM (SELECT tenant, seq AS old,
               row_number() OVER (PARTITION BY tenant ORDER BY seq DESC) AS seq
          FROM audit_log) AS renumbered
 WHERE a.tenant = renumbered.tenant AND a.seq = renumbered.old;

-- `content_digest` is sha256 over `content_salt` and the canonical JSON of [before, after];
-- the row's `hash` covers the digest, never the personal data itself, so redaction can replace
-- names and badges in before/after (setting `redacted_at` and dropping the salt) and the chain
-- still verifies. The four chain columns are NULL only for rows written before this migration,
-- which all lie at or below their tenant's anchor and are outside the chain.
ALTER TABLE audit_log
    ADD COLUMN content_digest text,
    ADD COLUMN content_salt   bytea,
    ADD COLUMN prev_hash      text,
    ADD COLUMN hash           text,
    ADD COLUMN redacted_at    timestamptz;

CREATE INDEX audit_log_by_target ON audit_log (tenant, target, seq);

-- One row per tenant: the newest entry (`seq`, `hash`, `at`) and the anchor the chain starts
-- from. Appending locks this row until the transaction ends, which serialises a tenant's
-- appends; `at` keeps a tenant's times from going backwards when the clock does. Retention
-- moves the anchor to the last row it deleted, so the remaining rows still verify.
CREATE TABLE audit_heads (
    tenant       text PRIMARY KEY REFERENCES tenants (id) ON DELETE CASCADE,
    seq          bigint NOT NULL,
    hash         text NOT NULL,
    at           timestamptz NOT NULL,
    anchor_seq   bigint NOT NULL,
    anchor_hash  text NOT NULL
);

INSERT INTO audit_heads (tenant, seq, hash, at, anchor_seq, anchor_hash)
SELECT tenant, max(seq), repeat('0', 64), max(at), max(seq), repeat('0', 64)
  FROM audit_log
 GROUP BY tenant;
