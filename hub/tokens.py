"""Signed bearer tokens (JWT, HS256) and the claims they carry."""

from __future__ import annotations

import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal, cast

import jwt

Role = Literal["admin", "supervisor", "terminal", "employee"]
ROLES: Final[tuple[Role, ...]] = ("admin", "supervisor", "terminal", "employee")
ALGORITHM: Final = "HS256"
DEFAULT_TTL_S: Final = 24 * 3600


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

    def sees_site(self, site: str) -> bool:
        if self.role == "admin":
            return True
        if self.role == "supervisor":
            return "*" in self.sites or site in self.sites
        return self.role == "terminal" and self.site == site


class TokenIssuer:
    def __init__(self, secret: str) -> None:
        if len(secret) < 32:
            raise ValueError("the token signing secret must be at least 32 characters")
        self._secret = secret

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
    ) -> tuple[str, int]:
        """Return the token and its expiry (seconds since the epoch)."""
        exp = int(time.time()) + ttl_s
        payload: dict[str, Any] = {"tenant": tenant, "role": role, "sub": sub, "exp": exp}
        if site is not None:
            payload["site"] = site
        if sites is not None:
            payload["sites"] = sites
        if employee is not None:
            payload["employee"] = employee
        return jwt.encode(payload, self._secret, algorithm=ALGORITHM), exp

    def verify(self, token: str) -> Claims:
        try:
            payload = jwt.decode(
                token,
                self._secret,
                algorithms=[ALGORITHM],
                options={"require": ["exp", "tenant", "role", "sub"]},
            )
        except jwt.ExpiredSignatureError:
            raise TokenError("the token has expired") from None
        except jwt.InvalidTokenError as exc:
            raise TokenError(f"the token is not valid: {exc}") from None
        return _claims_from(payload)


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
    return Claims(
        tenant=tenant,
        role=cast(Role, role),
        sub=sub,
        exp=int(payload["exp"]),
        site=site if isinstance(site, str) else None,
        sites=tuple(sites),
        employee=employee if isinstance(employee, str) else None,
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
