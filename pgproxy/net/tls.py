"""TLS contexts from the settings: one for clients (the proxy as server), one for Postgres.

Built at start and again by RELOAD/SIGHUP, so renewed certificates are picked up without a
restart; a file that does not load is a `ConfigError` naming its setting, and then nothing
changes. Connections already encrypted keep the context they were made with.
"""

from __future__ import annotations

import ssl

from pgproxy.config import Settings, TlsMode
from pgproxy.errors import ConfigError

# Postgres' ALPN protocol name (PostgreSQL 17 clients send it).
ALPN = "postgresql"


def client_context(settings: Settings) -> ssl.SSLContext | None:
    """The context the proxy answers a client's SSLRequest with; None: TLS is refused."""
    mode = settings.client_tls_sslmode
    if mode is TlsMode.DISABLE:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols([ALPN])
    _load_chain(ctx, settings.client_tls_cert_file, settings.client_tls_key_file, "client_tls")
    if mode.verifies:
        _load_ca(ctx, settings.client_tls_ca_file, "client_tls_ca_file")
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def server_context(settings: Settings) -> ssl.SSLContext | None:
    """The context for TLS to Postgres; None: never ask for it."""
    mode = settings.server_tls_sslmode
    if mode is TlsMode.DISABLE:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if mode.verifies:
        if settings.server_tls_ca_file:
            _load_ca(ctx, settings.server_tls_ca_file, "server_tls_ca_file")
        else:
            ctx.load_default_certs()
        ctx.check_hostname = mode is TlsMode.VERIFY_FULL
    else:
        # require/prefer/allow: encrypted, but anyone's certificate will do (as libpq's).
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if settings.server_tls_cert_file:
        _load_chain(ctx, settings.server_tls_cert_file, settings.server_tls_key_file, "server_tls")
    return ctx


def _load_chain(ctx: ssl.SSLContext, cert: str, key: str, prefix: str) -> None:
    try:
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"{prefix}_cert_file", f"{cert} with {key}: {_why(exc)}") from None


def _load_ca(ctx: ssl.SSLContext, path: str, setting: str) -> None:
    try:
        ctx.load_verify_locations(cafile=path)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(setting, f"{path}: {_why(exc)}") from None


def _why(exc: OSError | ssl.SSLError) -> str:
    if isinstance(exc, ssl.SSLError):
        return exc.reason or str(exc)
    return exc.strerror or str(exc)


def peer_common_name(cert: dict[str, object] | None) -> str | None:
    """The CN of a peer certificate as `SSLObject.getpeercert()` returns it."""
    if not cert:
        return None
    subject = cert.get("subject", ())
    if not isinstance(subject, tuple):
        return None
    for rdn in subject:
        for name, value in rdn:
            if name == "commonName":
                return str(value)
    return None
