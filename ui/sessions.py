"""Who is signed in: a signed, HttpOnly, SameSite=Strict cookie holding no secret.

The cookie carries the tenant (the fingerprint of the key the user signed in
with: the key itself is never kept), whether that key is an admin's, a CSRF
token, an expiry and the session's id, signed with HMAC-SHA256 under a secret kept
in the database (made on first use), so every worker and host on the same database
accepts it.  The session itself is a row there too (``ui_sessions``): every request
checks it is still on, so signing out, idle time, ``distillery db end-sessions`` or a
key removed from ``[auth]`` end it at once, everywhere.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from dataclasses import asdict, dataclass

import orjson

COOKIE = "distillery_session"
SECRET = "ui-session"  # its name in the store's secrets


@dataclass(frozen=True)
class Session:
    tenant: str
    admin: bool
    csrf: str
    expires: float
    # Its record in the database (store/dashboard.py), checked on every request: a cookie
    # from before sessions were recorded has none, and is no session.
    id: str = ""

    @property
    def tenants(self) -> tuple[str, ...] | None:
        """Whose calls this user sees: ``None`` is everyone's (an admin)."""
        return None if self.admin else (self.tenant,)

    @classmethod
    def start(cls, tenant: str, admin: bool, hours: float, session_id: str) -> Session:
        expires = time.time() + hours * 3600
        return cls(tenant, admin, secrets.token_urlsafe(24), expires, session_id)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def encode(session: Session, secret: bytes) -> str:
    payload = _b64(orjson.dumps(asdict(session)))
    signature = hmac.new(secret, payload.encode(), hashlib.sha256).digest()
    return f"{payload}.{_b64(signature)}"


def decode(value: str | None, secret: bytes, now: float | None = None) -> Session | None:
    """The session in a cookie value, or ``None`` if it is missing, forged or expired."""
    if not value or value.count(".") != 1:
        return None
    payload, signature = value.split(".")
    try:
        # Cookies are whatever a client sends: bytes that are not UTF-8 arrive as
        # surrogates, and encoding them raises (a ValueError) -- an unknown session.
        expected = hmac.new(secret, payload.encode(), hashlib.sha256).digest()
        if not hmac.compare_digest(expected, _unb64(signature)):
            return None
        session = Session(**orjson.loads(_unb64(payload)))
    except (ValueError, TypeError):
        return None
    return session if session.expires > (now or time.time()) else None


def same(given: str, expected: str) -> bool:
    """Whether a token a client sent is the expected one, in constant time, whatever
    characters it holds (``secrets.compare_digest`` refuses non-ASCII text)."""
    return hmac.compare_digest(
        given.encode("utf-8", "surrogateescape"), expected.encode("utf-8", "surrogateescape")
    )


def open_mode_token(secret: bytes) -> str:
    """The CSRF token of the signed-out dashboard ``ui.open`` serves on 127.0.0.1: derived
    from the database's secret, so every process agrees, and no other site can know it."""
    return _b64(hmac.new(secret, b"open-mode-csrf", hashlib.sha256).digest())
