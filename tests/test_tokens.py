"""Token signing and key rotation (hub/tokens.py)."""

from __future__ import annotations

import time

import jwt
import pytest

from hub import tokens
from hub.tokens import TokenError, TokenIssuer, key_id

OLD = "old-signing-key-" + "o" * 32
NEW = "new-signing-key-" + "n" * 32
OTHER = "someone-elses-key-" + "x" * 32


def issue(issuer: TokenIssuer, **claims: object) -> str:
    return issuer.issue(tenant="acme", role="admin", sub="root", **claims)[0]  # type: ignore[arg-type]


def test_tokens_name_their_key() -> None:
    token = issue(TokenIssuer(NEW))
    assert jwt.get_unverified_header(token)["kid"] == key_id(NEW) != key_id(OLD)


def test_during_a_rotation_both_keys_verify_and_only_the_new_one_signs() -> None:
    before = issue(TokenIssuer(OLD))
    rotating = TokenIssuer(NEW, previous=[OLD])
    assert rotating.verify(before).sub == "root"
    after = issue(rotating)
    assert jwt.get_unverified_header(after)["kid"] == key_id(NEW)
    assert TokenIssuer(NEW).verify(after).sub == "root"
    # Once the old key is dropped, its tokens stop working.
    with pytest.raises(TokenError, match="key this hub does not accept"):
        TokenIssuer(NEW).verify(before)


def test_a_token_without_kid_is_tried_against_every_accepted_key() -> None:
    legacy = jwt.encode({"tenant": "acme", "role": "admin", "sub": "root", "exp": 2**40}, OLD)
    assert TokenIssuer(NEW, previous=[OLD]).verify(legacy).tenant == "acme"
    with pytest.raises(TokenError, match="Signature verification failed"):
        TokenIssuer(NEW).verify(legacy)


def test_a_forged_kid_does_not_help() -> None:
    forged = jwt.encode(
        {"tenant": "acme", "role": "admin", "sub": "root", "exp": 2**40},
        OTHER,
        headers={"kid": key_id(NEW)},
    )
    with pytest.raises(TokenError, match="not valid"):
        TokenIssuer(NEW, previous=[OLD]).verify(forged)


def test_every_key_must_be_long_enough() -> None:
    with pytest.raises(ValueError, match="at least 32"):
        TokenIssuer(NEW, previous=["short"])


@pytest.mark.parametrize("version", [0, -1, "2", 1.5, True])
def test_a_device_token_version_must_be_a_positive_integer(version: object) -> None:
    token = jwt.encode(
        {
            "tenant": "acme",
            "role": "terminal",
            "sub": "d",
            "site": "hq",
            "exp": 2**40,
            "ver": version,
        },
        NEW,
    )
    with pytest.raises(TokenError, match="`ver`"):
        TokenIssuer(NEW).verify(token)


def test_a_remembered_token_still_expires_and_the_memory_is_bounded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    issuer = TokenIssuer(NEW)
    token, exp = issuer.issue(tenant="acme", role="admin", sub="root", ttl_s=60)
    assert issuer.verify(token).sub == "root"
    checked: list[str] = []
    real = issuer._verify

    def counting(token: str) -> tokens.Claims:
        checked.append(token)
        return real(token)

    monkeypatch.setattr(issuer, "_verify", counting)
    assert issuer.verify(token).exp == exp
    assert checked == [], "the signature was checked again"
    monkeypatch.setattr(time, "time", lambda: exp + 0.5)
    with pytest.raises(TokenError, match="expired"):
        issuer.verify(token)
    monkeypatch.undo()
    monkeypatch.setattr(tokens, "VERIFIED_MAX", 3)
    many = [issue(issuer, sites=[str(n)]) for n in range(5)]
    for token in many:
        issuer.verify(token)
    assert list(issuer._verified.values()) == [issuer._verify(token) for token in many[2:]]
    # Tampered with after it was remembered: another string, checked afresh, refused.
    head, body, signature = many[-1].split(".")
    flipped = "A" if signature[10] != "A" else "B"
    with pytest.raises(TokenError, match="not valid"):
        issuer.verify(f"{head}.{body}.{signature[:10]}{flipped}{signature[11:]}")
