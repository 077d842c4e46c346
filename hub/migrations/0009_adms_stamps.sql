-- ZKTeco (ADMS) terminals: the `Stamp` of the last ATTLOG and OPERLOG upload the hub
-- committed, given back in the handshake so that a terminal that restarts sends only what
-- came after (it would resend everything for `None`; the ids make that harmless, but slow).
ALTER TABLE devices
    ADD COLUMN adms_attlog_stamp text,
    ADD COLUMN adms_operlog_stamp text;
