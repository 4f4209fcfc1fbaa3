"""The Redis client of the `redis` cluster, and how ``rediss://`` checks the server.

coredis builds its own context from a ``rediss://`` URL, but checks no host name: any
certificate a trusted CA signed, for any name, would pass. Ours checks the certificate
and the URL's host against it, always. The URL's query names the files, with coredis's
(and redis-py's) names: ``ssl_ca_certs`` (the CA that signed Redis's certificate; the
system's CAs when absent), ``ssl_certfile`` and ``ssl_keyfile`` (a client certificate, for a
Redis started with ``--tls-auth-clients yes``).
"""

from __future__ import annotations

import ssl
import urllib.parse

import coredis

from .._errors import ConfigError


def tls_context(url: str) -> ssl.SSLContext | None:
    """How a ``rediss://`` URL's server is checked; None for ``redis://``.

    Raises:
      ConfigError: a file the URL names cannot be read or holds no certificate or key.
    """
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "rediss":
        return None
    query = urllib.parse.parse_qs(parts.query)

    def named(name: str) -> str | None:
        values = query.get(name)
        return values[0] if values else None

    ca, certfile, keyfile = named("ssl_ca_certs"), named("ssl_certfile"), named("ssl_keyfile")
    try:
        context = ssl.create_default_context(cafile=ca)
        if certfile is not None:
            context.load_cert_chain(certfile, keyfile)
    except OSError as exc:
        # ssl.SSLError is an OSError too: a file that is there but holds no PEM.
        raise ConfigError(
            f"TRIO_CHAT_REDIS_URL: cannot load the TLS files its query names"
            f" (ssl_ca_certs={ca}, ssl_certfile={certfile}, ssl_keyfile={keyfile}): {exc}"
        ) from None
    return context


def redis_client(url: str, tls: ssl.SSLContext | None) -> coredis.Redis[bytes]:
    """A client for ``url``; over TLS with ``tls`` (from `tls_context`) if given."""
    if tls is None:
        return coredis.Redis.from_url(url, decode_responses=False)
    # Given a context, coredis ignores the URL's ssl_* query (it would build a laxer one).
    return coredis.Redis.from_url(url, decode_responses=False, ssl_context=tls)


def leaf_error(error: BaseException) -> BaseException:
    """The first exception inside nested groups: what a log line or a report shows."""
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    return error


def certificate_failure(error: BaseException) -> ssl.SSLCertVerificationError | None:
    """The failed certificate check behind ``error`` (coredis wraps it), if that is what
    it is."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None
