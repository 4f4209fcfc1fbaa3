"""Who a client is in jwt mode, and which rooms it may see: tokens and the one room rule.

The app's backend signs a token (docs/auth.md); `Tokens.check_untrusted` verifies it
with PyJWT and returns an `Identity`. The algorithms accepted follow the configured keys
only: HS256 for ``TRIO_CHAT_JWT_KEY``, and for ``TRIO_CHAT_JWT_PUBLIC_KEY`` the one
family its key type signs with. A token's header picks a key among those, so ``alg:
none`` and a token HMAC-signed with the public key (algorithm confusion) are refused.
`room_allowed` is the single permission rule of every way into a room's content.
"""

from __future__ import annotations

import fnmatch
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from .._errors import ConfigError, ProtocolError
from ..protocol._codes import CLOSE_UNAUTHORIZED

if TYPE_CHECKING:
    from collections.abc import Iterable

    from ..settings._settings import Settings

#: Seconds of clock skew tolerated on ``exp``, ``nbf`` and ``iat``.
LEEWAY: Final = 30.0
#: Longest token accepted, in characters: checked before anything is decoded, so a
#: 100 KB token costs a length comparison. Real tokens are well under 2 KB.
MAX_TOKEN: Final = 8 * 1024
MAX_NAME: Final = 64
MAX_ROOM_PATTERNS: Final = 256
MAX_ROOM_PATTERN: Final = 128


@dataclass(frozen=True, slots=True)
class Identity:
    """A verified token's claims."""

    sub: str
    name: str
    #: Globs of the private rooms this user may see.
    rooms: tuple[str, ...]
    admin: bool
    #: Unix time the token expires.
    exp: float


def unauthorized(message: str) -> ProtocolError:
    """The refusal of a missing or bad token: error ``unauthorized``, close 4001."""
    return ProtocolError("unauthorized", message, close_code=CLOSE_UNAUTHORIZED)


def room_allowed(identity: Identity | None, room: str, public: frozenset[str]) -> bool:
    """Whether a client may see ``room``: a public glob or one of its token's matches.

    The one rule for join, send, typing and history over the socket and over HTTP.
    ``identity`` is None in open mode, or for an HTTP request without a token.
    """
    patterns: Iterable[str] = public if identity is None else (*public, *identity.rooms)
    return any(fnmatch.fnmatchcase(room, pattern) for pattern in patterns)


def _public_key_algorithms(key: object) -> list[str]:
    if isinstance(key, rsa.RSAPublicKey):
        return ["RS256"]
    if isinstance(key, ec.EllipticCurvePublicKey):
        by_curve = {"secp256r1": "ES256", "secp384r1": "ES384"}
        if key.curve.name in by_curve:
            return [by_curve[key.curve.name]]
    if isinstance(key, ed25519.Ed25519PublicKey):
        return ["EdDSA"]
    raise ConfigError(
        "TRIO_CHAT_JWT_PUBLIC_KEY must be an RSA, EC (P-256, P-384) or Ed25519 public key"
    )


class Tokens:
    """Verifies tokens against the configured keys.

    Raises:
      ConfigError: the public key file is unreadable or not a supported key.
    """

    def __init__(self, settings: Settings) -> None:
        #: Each accepted algorithm, with the key that verifies it.
        self._keys: dict[str, Any] = {}
        if settings.jwt_key is not None:
            self._keys["HS256"] = settings.jwt_key
        if settings.jwt_public_key is not None:
            try:
                key = load_pem_public_key(settings.jwt_public_key.read_bytes())
            except (OSError, ValueError, TypeError) as exc:
                raise ConfigError(
                    f"TRIO_CHAT_JWT_PUBLIC_KEY={settings.jwt_public_key}: {exc}"
                ) from None
            for algorithm in _public_key_algorithms(key):
                self._keys[algorithm] = key
        self._audience = settings.jwt_audience
        self._issuer = settings.jwt_issuer

    def check_untrusted(self, token: object) -> Identity:
        """Verify ``token`` (anything a client sent) and read its claims.

        Raises:
          ProtocolError: ``unauthorized`` (close 4001), the message saying why.
        """
        if not isinstance(token, str) or not token:
            raise unauthorized("a token is required")
        if len(token) > MAX_TOKEN:
            raise unauthorized(f"tokens are limited to {MAX_TOKEN} characters")
        try:
            algorithm = jwt.get_unverified_header(token).get("alg")
        except jwt.PyJWTError:
            raise unauthorized("the token is not a JWT") from None
        key = self._keys.get(algorithm) if isinstance(algorithm, str) else None
        if key is None or not isinstance(algorithm, str):
            raise unauthorized(f"tokens signed with {algorithm!r} are not accepted")
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[algorithm],
                audience=self._audience,
                issuer=self._issuer,
                leeway=LEEWAY,
                options={"require": ["sub", "exp"], "verify_aud": self._audience is not None},
            )
        except jwt.ExpiredSignatureError:
            raise unauthorized("the token has expired") from None
        except jwt.ImmatureSignatureError:
            raise unauthorized("the token is not valid yet (nbf)") from None
        except jwt.PyJWTError as exc:
            raise unauthorized(f"the token was refused: {exc}") from None
        return _identity(claims)


def _identity(claims: dict[str, Any]) -> Identity:
    sub, exp = claims["sub"], claims["exp"]
    if not isinstance(sub, str) or not 1 <= len(sub) <= MAX_NAME or not sub.isprintable():
        raise unauthorized(f"sub must be 1-{MAX_NAME} printable characters")
    name = claims.get("name", sub)
    if not isinstance(name, str) or not 1 <= len(name) <= MAX_NAME or not name.isprintable():
        raise unauthorized(f"name must be 1-{MAX_NAME} printable characters")
    rooms = claims.get("rooms", [])
    if (
        not isinstance(rooms, list)
        or len(rooms) > MAX_ROOM_PATTERNS
        or not all(isinstance(r, str) and 1 <= len(r) <= MAX_ROOM_PATTERN for r in rooms)
    ):
        raise unauthorized(f"rooms must be a list of at most {MAX_ROOM_PATTERNS} globs")
    admin = claims.get("admin", False)
    if not isinstance(admin, bool):
        raise unauthorized("admin must be true or false")
    return Identity(
        sub=sub, name=name.strip() or sub, rooms=tuple(rooms), admin=admin, exp=float(exp)
    )


def issue(
    key: bytes, sub: str, *, name: str | None, rooms: list[str], admin: bool, ttl: float
) -> str:
    """An HS256 token for development (``trio-chat token``)."""
    claims: dict[str, Any] = {"sub": sub, "exp": int(time.time() + ttl)}
    if name is not None:
        claims["name"] = name
    if rooms:
        claims["rooms"] = rooms
    if admin:
        claims["admin"] = True
    return jwt.encode(claims, key, algorithm="HS256")
