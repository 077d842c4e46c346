"""Signed bearer tokens (JWT, HS256) and the claims they carry."""

from __future__ import annotations

import hashlib
import os
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal, cast

import jwt

Role = Literal["admin", "supervisor", "terminal", "employee"]
ROLES: Final[tuple[Role, ...]] = ("admin", "supervisor", "terminal", "employee")
ALGORITHM: Final = "HS256"
DEFAULT_TTL_S: Final = 24 * 3600
# Tokens whose signature this process has checked, remembered: a hub restarting under ten
# thousand terminals checks each one's `hello` once, not twice, and each reconnect again
# costs no HMAC.
VERIFIED_MAX: Final = 16_384


class TokenError(Exception):
    """The token is missing, malformed, badly signed, expired or lacks a claim."""


@dataclass(frozen=True, slots=True)
class Claims:
    tenant: str
    role: Role
    sub: str
    exp: int
    site: str | None = None
    sites: tuple[str, ...] = ()
    employee: str | None = None
    # A terminal's device token version; tokens from before versions count as 1.
    version: int = 1

    def sees_site(self, site: str) -> bool:
        if self.role == "admin":
            return True
        if self.role == "supervisor":
            return "*" in self.sites or site in self.sites
        return self.role == "terminal" and self.site == site


def key_id(secret: str) -> str:
    """A short public name for a signing key, carried as the token header's `kid`."""
    return hashlib.sha256(secret.encode()).hexdigest()[:12]


class TokenIssuer:
    """Signs with ``secret``; verifies with it and with each key in ``previous``.

    During a key rotation the new key signs while tokens signed with the old
    ones keep working until they expire or the old key is dropped. Each token
    names its key in the header (`kid`); one without a `kid` is tried against
    every accepted key.
    """

    def __init__(self, secret: str, previous: Sequence[str] = ()) -> None:
        for key in (secret, *previous):
            if len(key) < 32:
                raise ValueError("every token signing secret must be at least 32 characters")
        self._secret = secret
        self._kid = key_id(secret)
        self._keys = {key_id(key): key for key in (*previous, secret)}
        # SHA-256 of the token -> its claims, oldest first (the digest, 32 bytes, not the
        # token, some 250); the keys never change for this issuer.
        self._verified: dict[bytes, Claims] = {}

    def issue(
        self,
        *,
        tenant: str,
        role: Role,
        sub: str,
        ttl_s: int = DEFAULT_TTL_S,
        site: str | None = None,
        sites: list[str] | None = None,
        employee: str | None = None,
        version: int | None = None,
    ) -> tuple[str, int]:
        """Return the token and its expiry (seconds since the epoch).

        ``version`` is a terminal's device token version (`ver`): revoking the
        device raises it, which retires every token issued before.
        """
        exp = int(time.time()) + ttl_s
        payload: dict[str, Any] = {"tenant": tenant, "role": role, "sub": sub, "exp": exp}
        if site is not None:
            payload["site"] = site
        if sites is not None:
            payload["sites"] = sites
        if employee is not None:
            payload["employee"] = employee
        if version is not None:
            payload["ver"] = version
        token = jwt.encode(payload, self._secret, algorithm=ALGORITHM, headers={"kid": self._kid})
        return token, exp

    def verify(self, token: str) -> Claims:
        """The token's claims if it is signed with an accepted key and has not expired."""
        digest = hashlib.sha256(token.encode()).digest()
        claims = self._verified.get(digest)
        if claims is None:
            claims = self._verify(token)
            if len(self._verified) >= VERIFIED_MAX:
                del self._verified[next(iter(self._verified))]
            self._verified[digest] = claims
        # Checked on every use: a remembered token expires like any other (PyJWT's rule).
        if claims.exp <= time.time():
            raise TokenError("the token has expired")
        return claims

    def _verify(self, token: str) -> Claims:
        try:
            kid = jwt.get_unverified_header(token).get("kid")
        except jwt.InvalidTokenError as exc:
            raise TokenError(f"the token is not valid: {exc}") from None
        if kid is None:
            keys = list(self._keys.values())
        elif isinstance(kid, str) and kid in self._keys:
            keys = [self._keys[kid]]
        else:
            raise TokenError("the token is signed with a key this hub does not accept")
        for key in keys:
            try:
                payload = jwt.decode(
                    token,
                    key,
                    algorithms=[ALGORITHM],
                    options={"require": ["exp", "tenant", "role", "sub"]},
                )
            except jwt.InvalidSignatureError:
                continue
            except jwt.ExpiredSignatureError:
                raise TokenError("the token has expired") from None
            except jwt.InvalidTokenError as exc:
                raise TokenError(f"the token is not valid: {exc}") from None
            return _claims_from(payload)
        raise TokenError("the token is not valid: Signature verification failed")


def _claims_from(payload: dict[str, Any]) -> Claims:
    role = payload["role"]
    if role not in ROLES:
        raise TokenError(f"unknown role {role!r}")
    tenant, sub = payload["tenant"], payload["sub"]
    if not isinstance(tenant, str) or not isinstance(sub, str):
        raise TokenError("`tenant` and `sub` must be strings")
    site = payload.get("site")
    sites = payload.get("sites", [])
    employee = payload.get("employee")
    if role == "terminal" and not isinstance(site, str):
        raise TokenError("a terminal token needs a `site`")
    if role == "employee" and not isinstance(employee, str):
        raise TokenError("an employee token needs an `employee`")
    if not isinstance(sites, list) or not all(isinstance(s, str) for s in sites):
        raise TokenError("`sites` must be a list of site ids")
    version = payload.get("ver", 1)
    if type(version) is not int or version < 1:
        raise TokenError("`ver` must be a positive integer")
    return Claims(
        tenant=tenant,
        role=cast(Role, role),
        sub=sub,
        exp=int(payload["exp"]),
        site=site if isinstance(site, str) else None,
        sites=tuple(sites),
        employee=employee if isinstance(employee, str) else None,
        version=version,
    )


def load_or_create_secret(data_dir: Path) -> str:
    """The embedded hub's signing key: generated once, kept in the data dir."""
    path = data_dir / "secret"
    if path.exists():
        return path.read_text().strip()
    data_dir.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_urlsafe(48)
    tmp = data_dir / f".secret.{os.getpid()}"
    tmp.write_text(secret + "\n")
    tmp.chmod(0o600)
    # Linking fails if the file exists, so two processes racing here agree on
    # one secret: the loser reads the winner's file.
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)
    return path.read_text().strip()
