"""TLS on both sides, with a CA, certificates and keys the tests make with openssl.

Clients: psycopg (libpq) with sslmode=verify-full against the proxy's certificate, client
certificates for verify-ca/verify-full, plaintext refused under require. Postgres: a cluster
of its own with ssl=on, reached with server_tls_sslmode=verify-full and, where its
pg_hba.conf asks for one, a client certificate.
"""

from __future__ import annotations

import logging
import os
import pwd
import shutil
import socket
import ssl
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

from pgproxy.config import load_settings
from pgproxy.core.server_login import ServerCredentials
from pgproxy.errors import BackendUnavailableError, ConfigError
from pgproxy.localpg import LocalPostgres
from pgproxy.net.query_client import QueryConnection
from pgproxy.net.tls import server_context
from pgproxy.wire import messages

from .conftest import ProxyThread
from .helpers import APP_PASSWORD, wait_for
from .test_backpressure import _buffered, _server_reading_paused


@dataclass(frozen=True)
class Certs:
    dir: Path
    ca: Path
    server_cert: Path
    server_key: Path
    other_ca: Path  # a CA that signed nothing here

    def client(self, name: str) -> tuple[Path, Path]:
        return self.dir / f"{name}.crt", self.dir / f"{name}.key"


def _openssl(*args: str | Path, cwd: Path) -> None:
    subprocess.run(["openssl", *map(str, args)], cwd=cwd, check=True, capture_output=True)


def _ca(cwd: Path, name: str) -> None:
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.crt", "-days", "2", "-subj", f"/CN={name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=cwd,
    )  # fmt: skip


def _signed(cwd: Path, name: str, cn: str, extensions: str = "") -> None:
    _openssl(
        "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={cn}",
        cwd=cwd,
    )  # fmt: skip
    ext = cwd / f"{name}.ext"
    ext.write_text(extensions or "basicConstraints=CA:FALSE\n")
    _openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
        "-CAcreateserial", "-out", f"{name}.crt", "-days", "2", "-extfile", ext.name,
        cwd=cwd,
    )  # fmt: skip
    (cwd / f"{name}.key").chmod(0o600)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    d = tmp_path_factory.mktemp("certs")
    d.chmod(0o755)  # the postgres OS user reads the server's files (tests as root)
    _ca(d, "ca")
    _ca(d, "other-ca")
    _signed(d, "server", "localhost", "subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    _signed(d, "app", "app")
    _signed(d, "mallory", "mallory")
    _signed(d, "renewed", "localhost", "subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    return Certs(d, d / "ca.crt", d / "server.crt", d / "server.key", d / "other-ca.crt")


def tls_connect(port: int, certs: Certs, **params: object) -> psycopg.Connection:
    base: dict[str, object] = {
        "host": "localhost",
        "port": port,
        "user": "app",
        "password": APP_PASSWORD,
        "dbname": "app",
        "sslmode": "verify-full",
        "sslrootcert": str(certs.ca),
        "autocommit": True,
    }
    base.update(params)
    return psycopg.connect(**base)  # type: ignore[arg-type]


@pytest.fixture
def tls_proxy(make_proxy: Callable[..., ProxyThread], certs: Certs) -> Callable[..., ProxyThread]:
    def make(mode: str = "require", **flags: object) -> ProxyThread:
        settings: dict[str, object] = {
            "client_tls_sslmode": mode,
            "client_tls_cert_file": str(certs.server_cert),
            "client_tls_key_file": str(certs.server_key),
        }
        settings.update(flags)
        return make_proxy(**settings)

    return make


def test_verify_full_client_reaches_postgres_through_an_encrypted_proxy(
    tls_proxy: Callable[..., ProxyThread], certs: Certs
) -> None:
    proxy = tls_proxy("require")
    with tls_connect(proxy.port, certs) as conn:
        assert conn.pgconn.ssl_in_use
        assert conn.execute("SELECT 41 + 1").fetchone() == (42,)
    # psql, as an operator would run it.
    psql = shutil.which("psql")
    if psql is not None:
        out = subprocess.run(
            [
                psql,
                f"host=localhost port={proxy.port} user=app dbname=app sslmode=verify-full "
                f"sslrootcert={certs.ca}",
                "-Atc",
                "SELECT 'over tls'",
            ],
            env={**os.environ, "PGPASSWORD": APP_PASSWORD},
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        assert out.stdout.strip() == "over tls"


def test_require_refuses_a_plaintext_client_with_a_clear_error(
    tls_proxy: Callable[..., ProxyThread], certs: Certs
) -> None:
    proxy = tls_proxy("require")
    with pytest.raises(psycopg.OperationalError) as caught:
        tls_connect(proxy.port, certs, sslmode="disable")
    assert "accepts TLS connections only" in str(caught.value)
    # A verify-full client that checks the name refuses a certificate for another host.
    with pytest.raises(psycopg.OperationalError, match=r"certificate|SSL"):
        tls_connect(proxy.port, certs, sslrootcert=str(certs.other_ca))
    # The proxy is fine afterwards.
    with tls_connect(proxy.port, certs) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_prefer_serves_tls_and_plaintext_clients_and_disable_answers_n(
    tls_proxy: Callable[..., ProxyThread], make_proxy: Callable[..., ProxyThread], certs: Certs
) -> None:
    proxy = tls_proxy("prefer")
    with tls_connect(proxy.port, certs) as conn:
        assert conn.pgconn.ssl_in_use
    with tls_connect(proxy.port, certs, sslmode="disable") as conn:
        assert not conn.pgconn.ssl_in_use
        assert conn.execute("SELECT 1").fetchone() == (1,)
    plain = make_proxy()  # client_tls_sslmode=disable
    with pytest.raises(psycopg.OperationalError, match=r"does not support SSL|SSL"):
        tls_connect(plain.port, certs, sslmode="require")


def test_client_certificates_are_checked_against_the_ca_and_the_user(
    tls_proxy: Callable[..., ProxyThread], certs: Certs
) -> None:
    proxy = tls_proxy("verify-full", client_tls_ca_file=str(certs.ca))
    app_cert, app_key = certs.client("app")
    with tls_connect(proxy.port, certs, sslcert=str(app_cert), sslkey=str(app_key)) as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("app",)
    cert, key = certs.client("mallory")
    with pytest.raises(psycopg.OperationalError, match='does not name user "app"'):
        tls_connect(proxy.port, certs, sslcert=str(cert), sslkey=str(key))
    with pytest.raises(psycopg.OperationalError):
        tls_connect(proxy.port, certs, sslcert="", sslkey="")  # no certificate at all
    # verify-ca: any certificate of the CA will do.
    loose = tls_proxy("verify-ca", client_tls_ca_file=str(certs.ca))
    with tls_connect(loose.port, certs, sslcert=str(cert), sslkey=str(key)) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_plaintext_bytes_after_an_ssl_request_are_refused(
    tls_proxy: Callable[..., ProxyThread],
) -> None:
    """The SSLRequest and a StartupMessage in one packet: the startup would be trusted as if
    it came over TLS (CVE-2021-23214); the proxy refuses it with 08P01."""
    proxy = tls_proxy("prefer")
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        sock.sendall(messages.ssl_request() + messages.startup_message({"user": "app"}))
        answer = sock.recv(65536)
    assert answer[:1] == b"E"
    assert b"08P01" in answer and b"unencrypted data after SSL request" in answer


def _served(port: int, certs: Certs) -> tuple[str, bytes]:
    """The CN and DER bytes of the certificate the proxy shows now, read with Python's ssl."""
    ctx = ssl.create_default_context(cafile=str(certs.ca))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        raw.sendall(messages.ssl_request())
        assert raw.recv(1) == b"S"
        with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            cert = tls.getpeercert()
            der = tls.getpeercert(binary_form=True)
    assert cert is not None and der is not None
    subject = dict(x[0] for x in cert["subject"])  # type: ignore[arg-type]
    return str(subject["commonName"]), der


def test_reload_reads_renewed_certificates_and_a_bad_key_changes_nothing(
    pg: LocalPostgres,
    tls_proxy: Callable[..., ProxyThread],
    certs: Certs,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    cert, key = tmp_path / "live.crt", tmp_path / "live.key"
    shutil.copy(certs.server_cert, cert)
    shutil.copy(certs.server_key, key)
    proxy = tls_proxy(client_tls_cert_file=str(cert), client_tls_key_file=str(key))
    # The configuration reads the same; only the files behind it change.
    proxy.proxy._reload_settings = proxy.proxy.settings.model_copy
    cn_before, der_before = _served(proxy.port, certs)
    renewed_cert, renewed_key = certs.client("renewed")
    shutil.copy(renewed_cert, cert)
    shutil.copy(renewed_key, key)
    with caplog.at_level(logging.INFO, logger="pgproxy"):
        assert proxy.call(proxy.proxy.reload) == []
    # No setting changed, and the log says the certificates were read again anyway.
    assert "reload: no setting changed; TLS certificates read again" in caplog.text
    cn_after, der_after = _served(proxy.port, certs)
    assert cn_after == cn_before == "localhost"
    assert der_after != der_before  # the renewed certificate is served
    # A key that does not match: RELOAD fails, the renewed certificate stays in use.
    shutil.copy(certs.server_key, key)
    with pytest.raises(ConfigError, match="client_tls_cert_file"):
        proxy.call(proxy.proxy.reload)
    with tls_connect(proxy.port, certs) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_back_pressure_holds_over_tls(tls_proxy: Callable[..., ProxyThread], certs: Certs) -> None:
    """A psql that stops reading its TLS socket makes the proxy pause Postgres; the proxy's
    buffers stay small and all 50 MB arrive."""
    proxy = tls_proxy("require", default_pool_size="1")
    rows, row = 50_000, 1000
    sql = f"COPY (SELECT repeat('x', {row}) FROM generate_series(1, {rows})) TO STDOUT"
    env = dict(
        os.environ, PGPASSWORD=APP_PASSWORD, PGSSLMODE="verify-full", PGSSLROOTCERT=str(certs.ca)
    )
    command = ["psql", "-X", "-h", "localhost", "-p", str(proxy.port), "-U", "app", "app"]
    with subprocess.Popen(
        [*command, "-c", sql], env=env, stdout=subprocess.PIPE, bufsize=0
    ) as psql:
        assert psql.stdout is not None
        received = len(psql.stdout.read(65536))
        wait_for(
            lambda: proxy.call(lambda: _server_reading_paused(proxy)),
            timeout=30,
            what="the proxy to pause reading from Postgres",
        )
        samples = [proxy.call(lambda: _buffered(proxy))]
        for _ in range(100):
            received += len(psql.stdout.read(16384))
            samples.append(proxy.call(lambda: _buffered(proxy)))
        while chunk := psql.stdout.read(1 << 20):
            received += len(chunk)
        assert psql.wait(30) == 0
    assert received == rows * (row + 1)
    assert max(samples) < 2 * 1024 * 1024, f"proxy buffered up to {max(samples)} bytes"


# -- TLS to Postgres -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ssl_pg(certs: Certs) -> Iterator[LocalPostgres]:
    """A cluster of its own with ssl=on, its key readable by the postgres OS user only."""
    # Not under pytest's temporary root: that is private to this user, not to postgres.
    files = Path(tempfile.mkdtemp(prefix="pgproxy-tls-"))
    files.chmod(0o755)
    for name in ("server.crt", "server.key", "ca.crt"):
        shutil.copy(certs.dir / name, files / name)
    (files / "server.key").chmod(0o600)
    if os.geteuid() == 0:
        entry = pwd.getpwnam("postgres")
        for path in (files, files / "server.crt", files / "server.key", files / "ca.crt"):
            os.chown(path, entry.pw_uid, entry.pw_gid)
    settings = {
        "ssl": "on",
        "ssl_cert_file": str(files / "server.crt"),
        "ssl_key_file": str(files / "server.key"),
        # Client certificates signed by the test CA are checked where pg_hba.conf asks.
        "ssl_ca_file": str(files / "ca.crt"),
    }
    try:
        with LocalPostgres(max_connections=10, settings=settings) as cluster:
            cluster.create_user("app", APP_PASSWORD)
            cluster.create_database("app", owner="app")
            yield cluster
    finally:
        shutil.rmtree(files, ignore_errors=True)


def test_server_tls_verify_full_encrypts_the_server_connections(
    make_proxy: Callable[..., ProxyThread], ssl_pg: LocalPostgres, certs: Certs
) -> None:
    proxy = make_proxy(
        server=f"{ssl_pg.host}:{ssl_pg.port}",
        server_tls_sslmode="verify-full",
        server_tls_ca_file=str(certs.ca),
    )
    with psycopg.connect(
        host="127.0.0.1", port=proxy.port, user="app", password=APP_PASSWORD, dbname="app"
    ) as conn:
        row = conn.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone()
        assert row == (True,)


def test_the_proxys_own_queries_use_server_tls_too(ssl_pg: LocalPostgres, certs: Certs) -> None:
    """The monitor's and auth_query's connection asks for TLS as the pool's servers do."""

    def connect(ca: Path) -> QueryConnection:
        settings = load_settings(
            {"server_tls_sslmode": "verify-full", "server_tls_ca_file": str(ca)}, environ={}
        )
        return QueryConnection.connect(
            host="localhost",
            port=ssl_pg.port,
            database="app",
            credentials=ServerCredentials(user="app", password=APP_PASSWORD),
            application_name="tls-check",
            timeout=5.0,
            tls=server_context(settings),
            tls_mode=settings.server_tls_sslmode,
        )

    with connect(certs.ca) as conn:
        rows = conn.query("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        assert rows == [("t",)]
    # A CA that signed nothing here: the certificate check refuses the server.
    with pytest.raises(BackendUnavailableError, match="TLS with the server failed"):
        connect(certs.other_ca)


def test_server_tls_client_certificate_satisfies_a_clientcert_rule_in_pg_hba(
    make_proxy: Callable[..., ProxyThread], ssl_pg: LocalPostgres, certs: Certs
) -> None:
    """server_tls_cert_file/key_file: Postgres requires a certificate naming the user for
    one database (`clientcert=verify-full`); the proxy logs in with app's."""
    ssl_pg.create_database("certdb", owner="app")
    hba = ssl_pg.data_dir / "pg_hba.conf"
    rules = hba.read_text()
    hba.write_text(
        "hostssl certdb app 127.0.0.1/32 scram-sha-256 clientcert=verify-full\n"
        "host certdb all 127.0.0.1/32 reject\n" + rules
    )
    ssl_pg.execute("SELECT pg_reload_conf()")

    def refused_without_a_certificate() -> bool:
        try:
            psycopg.connect(ssl_pg.dsn("app", APP_PASSWORD, "certdb"), sslmode="require").close()
        except psycopg.OperationalError as exc:
            return "certificate" in str(exc)
        return False

    wait_for(refused_without_a_certificate, what="pg_hba.conf to ask for a certificate")
    app_cert, app_key = certs.client("app")
    proxy = make_proxy(
        server=f"{ssl_pg.host}:{ssl_pg.port}",
        server_tls_sslmode="verify-full",
        server_tls_ca_file=str(certs.ca),
        server_tls_cert_file=str(app_cert),
        server_tls_key_file=str(app_key),
    )
    with psycopg.connect(
        host="127.0.0.1", port=proxy.port, user="app", password=APP_PASSWORD, dbname="certdb"
    ) as conn:
        row = conn.execute(
            "SELECT ssl, client_dn FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
        ).fetchone()
        assert row == (True, "/CN=app")
    # The same proxy without the certificate is refused by Postgres, and says so.
    bare = make_proxy(
        server=f"{ssl_pg.host}:{ssl_pg.port}",
        server_tls_sslmode="verify-full",
        server_tls_ca_file=str(certs.ca),
    )
    with pytest.raises(psycopg.OperationalError, match="certificate"):
        psycopg.connect(
            host="127.0.0.1", port=bare.port, user="app", password=APP_PASSWORD, dbname="certdb"
        ).execute("SELECT 1")


def test_server_tls_with_the_wrong_ca_or_no_tls_fails_with_08006(
    make_proxy: Callable[..., ProxyThread], ssl_pg: LocalPostgres, pg: LocalPostgres, certs: Certs
) -> None:
    wrong = make_proxy(
        server=f"{ssl_pg.host}:{ssl_pg.port}",
        server_tls_sslmode="verify-ca",
        server_tls_ca_file=str(certs.other_ca),
        server_connect_timeout="5",
    )
    with pytest.raises(psycopg.OperationalError) as caught:
        psycopg.connect(
            host="127.0.0.1", port=wrong.port, user="app", password=APP_PASSWORD, dbname="app"
        ).execute("SELECT 1")
    assert "TLS with the server failed (server_tls_sslmode=verify-ca)" in str(caught.value)
    assert "CERTIFICATE_VERIFY_FAILED" in str(caught.value)
    plain_server = make_proxy(server_tls_sslmode="require", server_connect_timeout="5")
    with pytest.raises(psycopg.OperationalError, match="does not accept TLS"):
        psycopg.connect(
            host="127.0.0.1",
            port=plain_server.port,
            user="app",
            password=APP_PASSWORD,
            dbname="app",
        ).execute("SELECT 1")
    # prefer (the default) falls back to plaintext with a server that has no TLS.
    default = make_proxy()
    with psycopg.connect(
        host="127.0.0.1", port=default.port, user="app", password=APP_PASSWORD, dbname="app"
    ) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_tls_settings_that_do_not_fit_are_named(certs: Certs) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings({"client_tls_sslmode": "require"}, environ={})
    assert caught.value.setting == "client_tls_cert_file"
    with pytest.raises(ConfigError) as caught:
        load_settings(
            {
                "client_tls_sslmode": "verify-ca",
                "client_tls_cert_file": str(certs.server_cert),
                "client_tls_key_file": str(certs.server_key),
            },
            environ={},
        )
    assert caught.value.setting == "client_tls_ca_file"
    with pytest.raises(ConfigError) as caught:
        load_settings({"server_tls_ca_file": "/nonexistent/ca.crt"}, environ={})
    assert caught.value.setting == "server_tls_ca_file"


def test_a_failed_or_abandoned_handshake_leaves_no_client_behind(
    tls_proxy: Callable[..., ProxyThread],
) -> None:
    proxy = tls_proxy("require")
    for ending in (b"this is not a ClientHello" * 10, b""):
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
            sock.sendall(messages.ssl_request())
            assert sock.recv(1) == b"S"
            if ending:
                sock.sendall(ending)
                sock.settimeout(10)
                try:
                    while sock.recv(65536):
                        pass
                except ConnectionResetError:
                    pass
    wait_for(
        lambda: proxy.call(lambda: len(proxy.proxy.clients)) == 0,
        what="the proxy to forget the clients whose handshake failed",
    )
