"""SCRAM-SHA-256 (RFC 5802, RFC 7677) as PostgreSQL speaks it, SASLprep, and md5 passwords.

Rules of this file:

* both sides of the exchange live here: `ScramServerExchange` (the proxy authenticating a
  client) and `ScramClientExchange` (the proxy logging in to Postgres);
* PBKDF2 is expensive by design; it runs in `make_scram_secret` (once per configured user at
  start-up) and, for server logins with a plaintext password, once per (password, salt,
  iterations) thanks to a small cache. Verifying a client only costs HMACs and a SHA-256;
* anything malformed from the peer raises `ProtocolError` (08P01), a failed proof raises
  `AuthError` (28P01): never another exception type from bytes received;
* pure: no I/O, no logging. Randomness is an argument (``nonce_source``) so tests are exact.

PostgreSQL specifics (docs, "Frontend/Backend Protocol" → "SASL Authentication"): the user
name in client-first-message is ignored (the startup packet's user counts), the server nonce
is 18 random bytes in base64, and only channel-binding flags ``n`` and ``y`` are accepted
because the proxy never offers SCRAM-SHA-256-PLUS.
"""

import base64
import binascii
import hashlib
import hmac
import secrets
import stringprep
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache

from pgproxy.errors import AuthError, ProtocolError

SCRAM_SHA_256 = "SCRAM-SHA-256"
DEFAULT_ITERATIONS = 4096  # Postgres' scram_iterations default
_SALT_LENGTH = 16  # SCRAM_DEFAULT_SALT_LEN in Postgres
_RAW_NONCE_LENGTH = 18  # SCRAM_RAW_NONCE_LEN in Postgres
_KEY_LENGTH = 32  # SHA-256 digest size
_MAX_ITERATIONS = 0x7FFFFFFF  # Postgres' scram_iterations is an int

NonceSource = Callable[[int], bytes]


@dataclass(frozen=True, slots=True)
class ScramSecret:
    """What a server stores for a SCRAM user; it cannot be used to log in as that user."""

    iterations: int
    salt: bytes
    stored_key: bytes = field(repr=False)
    server_key: bytes = field(repr=False)


# --- secrets ------------------------------------------------------------------------------


def parse_scram_secret(text: str) -> ScramSecret:
    """Parse ``SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`` (pg_authid format).

    Raises `ValueError` when the text is not such a secret.
    """
    try:
        method, iterations_salt, keys = text.split("$")
        iterations_text, salt_b64 = iterations_salt.split(":")
        stored_b64, server_b64 = keys.split(":")
    except ValueError:
        raise ValueError("not a SCRAM-SHA-256 secret") from None
    if method != SCRAM_SHA_256:
        raise ValueError(f"not a SCRAM-SHA-256 secret: method {method!r}")
    if not (iterations_text.isascii() and iterations_text.isdigit()) or len(iterations_text) > 10:
        raise ValueError("invalid SCRAM secret: iteration count is not a number")
    iterations = int(iterations_text)
    if iterations < 1:
        raise ValueError("invalid SCRAM secret: iteration count must be positive")
    try:
        salt = base64.b64decode(salt_b64, validate=True)
        stored_key = base64.b64decode(stored_b64, validate=True)
        server_key = base64.b64decode(server_b64, validate=True)
    except ValueError:
        raise ValueError("invalid SCRAM secret: bad base64") from None
    if not salt:
        raise ValueError("invalid SCRAM secret: empty salt")
    if len(stored_key) != _KEY_LENGTH or len(server_key) != _KEY_LENGTH:
        raise ValueError("invalid SCRAM secret: keys must be 32 bytes")
    return ScramSecret(iterations, salt, stored_key, server_key)


def format_scram_secret(secret: ScramSecret) -> str:
    """The pg_authid text form of a secret (inverse of `parse_scram_secret`)."""
    return (
        f"{SCRAM_SHA_256}${secret.iterations}:{_b64(secret.salt)}"
        f"${_b64(secret.stored_key)}:{_b64(secret.server_key)}"
    )


def make_scram_secret(
    password: str, *, salt: bytes | None = None, iterations: int = DEFAULT_ITERATIONS
) -> ScramSecret:
    """Derive a secret from a plaintext password (runs PBKDF2: call it once, at start-up)."""
    if salt is None:
        salt = secrets.token_bytes(_SALT_LENGTH)
    _, stored_key, server_key = _derive_keys(password, salt, iterations)
    return ScramSecret(iterations, salt, stored_key, server_key)


def saslprep(password: str) -> str:
    """Prepare a password with SASLprep (RFC 4013) the way PostgreSQL's pg_saslprep does.

    Postgres does not fail on a password SASLprep rejects (prohibited or unassigned
    characters, bad bidi, empty result, invalid UTF-8): it uses the raw bytes instead, and so
    does this function, so that both ends derive the same keys.
    """
    if password.isascii():
        return password  # pg_saslprep's fast path: ASCII passes unchanged, controls included
    try:
        password.encode()
    except UnicodeEncodeError:
        return password  # lone surrogates: not valid UTF-8
    # 1) Map: non-ASCII spaces (C.1.2) to a space, "commonly mapped to nothing" (B.1) removed.
    mapped = "".join(
        " " if stringprep.in_table_c12(ch) else "" if stringprep.in_table_b1(ch) else ch
        for ch in password
    )
    if not mapped:
        return password  # Postgres: "don't allow empty password"
    # 2) Normalize with NFKC.
    prepared = unicodedata.normalize("NFKC", mapped)
    # 3) Prohibit (RFC 4013 section 2.3) and refuse unassigned code points (A.1).
    for ch in prepared:
        if (
            stringprep.in_table_c12(ch)
            or stringprep.in_table_c21_c22(ch)
            or stringprep.in_table_c3(ch)
            or stringprep.in_table_c4(ch)
            or stringprep.in_table_c5(ch)
            or stringprep.in_table_c6(ch)
            or stringprep.in_table_c7(ch)
            or stringprep.in_table_c8(ch)
            or stringprep.in_table_c9(ch)
            or stringprep.in_table_a1(ch)
        ):
            return password
    # 4) Bidi (RFC 3454 section 6): with any RandALCat, no LCat, and RandALCat at both ends.
    if any(stringprep.in_table_d1(ch) for ch in prepared) and (
        any(stringprep.in_table_d2(ch) for ch in prepared)
        or not stringprep.in_table_d1(prepared[0])
        or not stringprep.in_table_d1(prepared[-1])
    ):
        return password
    return prepared


def _password_bytes(password: str) -> bytes:
    # surrogateescape: a password read from a non-UTF-8 source keeps its original bytes.
    return saslprep(password).encode("utf-8", "surrogateescape")


def _derive_keys(password: str, salt: bytes, iterations: int) -> tuple[bytes, bytes, bytes]:
    """(ClientKey, StoredKey, ServerKey) from a password (RFC 5802 section 3)."""
    salted = hashlib.pbkdf2_hmac("sha256", _password_bytes(password), salt, iterations)
    client_key = _hmac(salted, b"Client Key")
    return client_key, _sha256(client_key), _hmac(salted, b"Server Key")


# Server logins reuse one password against one server secret over and over: derive once.
_cached_keys = lru_cache(maxsize=64)(_derive_keys)


# --- small helpers ------------------------------------------------------------------------


def _hmac(key: bytes, message: bytes) -> bytes:
    return hmac.digest(key, message, "sha256")


def _sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _xor(left: bytes, right: bytes) -> bytes:
    return (int.from_bytes(left) ^ int.from_bytes(right)).to_bytes(len(left))


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(value: str, what: str) -> bytes:
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ProtocolError(f"malformed SCRAM message: invalid base64 in {what}") from None


def _text(data: bytes, what: str) -> str:
    try:
        return data.decode()
    except UnicodeDecodeError:
        raise ProtocolError(f"malformed SCRAM message: {what} is not valid UTF-8") from None


def _attributes(text: str, what: str) -> list[tuple[str, str]]:
    """Split ``a=value,b=value`` (RFC 5802 section 5.1); values never contain a comma."""
    out = []
    for part in text.split(","):
        if len(part) < 2 or part[1] != "=" or not ("a" <= part[0] <= "z" or "A" <= part[0] <= "Z"):
            raise ProtocolError(f"malformed SCRAM message: invalid attribute in {what}")
        out.append((part[0], part[2:]))
    return out


def _expect(attributes: list[tuple[str, str]], index: int, name: str, what: str) -> str:
    if index >= len(attributes) or attributes[index][0] != name:
        raise ProtocolError(f"malformed SCRAM message: expected attribute {name!r} in {what}")
    return attributes[index][1]


def _is_printable_nonce(nonce: str) -> bool:
    # RFC 5802: printable = %x21-2B / %x2D-7E (ASCII without space and comma).
    return bool(nonce) and all("\x21" <= ch <= "\x7e" and ch != "," for ch in nonce)


def _refuse_mandatory_extension(attributes: list[tuple[str, str]], what: str) -> None:
    if attributes[0][0] == "m":
        raise ProtocolError(f"unsupported SCRAM extension required by {what}")


# --- the proxy as SCRAM server (authenticating a client) ----------------------------------


class ScramServerExchange:
    """One SCRAM-SHA-256 exchange with a client, checked against a stored secret.

    `handle_client_first` → server-first-message, `handle_client_final` → server-final-message
    or `AuthError`. After success `client_key` holds the client's ClientKey, which lets the
    proxy prove the same identity to Postgres (SCRAM pass-through).
    """

    __slots__ = (
        "_client_first_bare",
        "_gs2_header",
        "_is_mock",
        "_nonce",
        "_nonce_source",
        "_secret",
        "_server_first",
        "_state",
        "client_key",
    )

    def __init__(self, secret: ScramSecret, nonce_source: NonceSource) -> None:
        self._secret = secret
        self._nonce_source = nonce_source
        self._is_mock = False
        self._state = 0  # 0: want client-first, 1: want client-final, 2: finished
        self._gs2_header = ""
        self._client_first_bare = ""
        self._server_first = ""
        self._nonce = ""
        self.client_key: bytes | None = None

    @classmethod
    def mock(
        cls,
        username_salt_seed: bytes,
        nonce_source: NonceSource,
        *,
        iterations: int = DEFAULT_ITERATIONS,
    ) -> "ScramServerExchange":
        """An exchange for an unknown user: same messages, always fails at the proof.

        ``username_salt_seed`` should be a secret seed plus the user name, so one unknown user
        always gets the same salt (as a real user would) and the salt reveals nothing. Same
        idea as Postgres' scram_mock_salt.
        """
        digest = hashlib.sha256(b"pgproxy mock salt\x00" + username_salt_seed).digest()
        secret = ScramSecret(iterations, digest[:_SALT_LENGTH], _sha256(digest), _sha256(digest))
        exchange = cls(secret, nonce_source)
        exchange._is_mock = True
        return exchange

    def handle_client_first(self, data: bytes) -> bytes:
        """Read client-first-message, return server-first-message."""
        if self._state != 0:
            raise ProtocolError("unexpected SCRAM client-first-message")
        text = _text(data, "client-first-message")
        parts = text.split(",", 2)
        if len(parts) != 3:
            raise ProtocolError("malformed SCRAM message: client-first-message is incomplete")
        flag, authzid, bare = parts
        if flag.startswith("p"):
            raise ProtocolError(
                "client requires SCRAM channel binding, but it is not supported",
                detail="The proxy offers SCRAM-SHA-256 only, not SCRAM-SHA-256-PLUS.",
            )
        if flag not in ("n", "y"):
            raise ProtocolError("malformed SCRAM message: unexpected channel-binding flag")
        if authzid:
            if authzid.startswith("a="):
                raise ProtocolError("client uses authorization identity, but it is not supported")
            raise ProtocolError("malformed SCRAM message: unexpected authorization identity")
        attributes = _attributes(bare, "client-first-message")
        _refuse_mandatory_extension(attributes, "client")
        _expect(attributes, 0, "n", "client-first-message")  # ignored, as Postgres does
        client_nonce = _expect(attributes, 1, "r", "client-first-message")
        if not _is_printable_nonce(client_nonce):
            raise ProtocolError("malformed SCRAM message: invalid client nonce")
        secret = self._secret
        self._gs2_header = f"{flag},,"
        self._client_first_bare = bare
        self._nonce = client_nonce + _b64(self._nonce_source(_RAW_NONCE_LENGTH))
        self._server_first = f"r={self._nonce},s={_b64(secret.salt)},i={secret.iterations}"
        self._state = 1
        return self._server_first.encode()

    def handle_client_final(self, data: bytes) -> bytes:
        """Read client-final-message, check the proof, return server-final-message."""
        if self._state != 1:
            raise ProtocolError("unexpected SCRAM client-final-message")
        text = _text(data, "client-final-message")
        attributes = _attributes(text, "client-final-message")
        channel_binding = _unb64(_expect(attributes, 0, "c", "client-final-message"), "c")
        nonce = _expect(attributes, 1, "r", "client-final-message")
        proof_b64 = _expect(attributes, len(attributes) - 1, "p", "client-final-message")
        # Without channel binding, c= carries the gs2 header exactly as sent ("biws" for "n,,").
        if channel_binding != self._gs2_header.encode():
            raise ProtocolError("SCRAM channel binding check failed")
        if nonce != self._nonce:
            raise ProtocolError("invalid SCRAM response: nonce mismatch")
        proof = _unb64(proof_b64, "p")
        if len(proof) != _KEY_LENGTH:
            raise ProtocolError("malformed SCRAM message: invalid ClientProof")
        self._state = 2
        without_proof = text[: text.rindex(",p=")]
        auth_message = f"{self._client_first_bare},{self._server_first},{without_proof}".encode()
        secret = self._secret
        client_key = _xor(proof, _hmac(secret.stored_key, auth_message))
        matches = hmac.compare_digest(_sha256(client_key), secret.stored_key)
        if self._is_mock or not matches:
            raise AuthError("SCRAM client proof does not match")
        self.client_key = client_key
        return f"v={_b64(_hmac(secret.server_key, auth_message))}".encode()


# --- the proxy as SCRAM client (logging in to Postgres) -----------------------------------


class ScramClientExchange:
    """One SCRAM-SHA-256 exchange with a server, as its client.

    Either with a plaintext ``password`` (keys derived from the server's salt and iteration
    count, cached), or in pass-through mode with the user's ``secret`` and the ``client_key``
    recovered from that user's own login to the proxy: this works only when the server stores
    the same secret (same salt and iteration count).
    """

    __slots__ = (
        "_client_first_bare",
        "_client_key",
        "_client_nonce",
        "_nonce_source",
        "_password",
        "_secret",
        "_server_signature",
        "_state",
    )

    def __init__(
        self,
        password: str | None = None,
        *,
        secret: ScramSecret | None = None,
        client_key: bytes | None = None,
        nonce_source: NonceSource = secrets.token_bytes,
    ) -> None:
        if password is None:
            if secret is None or client_key is None:
                raise ValueError("SCRAM needs a password, or a secret and a client key")
            if not hmac.compare_digest(_sha256(client_key), secret.stored_key):
                raise ValueError("the client key does not belong to this SCRAM secret")
        self._password = password
        self._secret = secret
        self._client_key = client_key
        self._nonce_source = nonce_source
        self._state = 0  # 0: nothing sent, 1: client-first sent, 2: client-final sent, 3: done
        self._client_nonce = ""
        self._client_first_bare = ""
        self._server_signature = b""

    @property
    def is_finished(self) -> bool:
        """True once the server's signature has been verified."""
        return self._state == 3

    def client_first(self) -> bytes:
        """client-first-message: gs2 header ``n,,`` (no channel binding), empty user name."""
        if self._state != 0:
            raise ProtocolError("SCRAM exchange already started")
        self._client_nonce = _b64(self._nonce_source(_RAW_NONCE_LENGTH))
        # Postgres ignores the name here and uses the startup packet's user.
        self._client_first_bare = f"n=,r={self._client_nonce}"
        self._state = 1
        return f"n,,{self._client_first_bare}".encode()

    def handle_server_first(self, data: bytes) -> bytes:
        """Read server-first-message, return client-final-message."""
        if self._state != 1:
            raise ProtocolError("unexpected SCRAM server-first-message")
        server_first = _text(data, "server-first-message")
        attributes = _attributes(server_first, "server-first-message")
        _refuse_mandatory_extension(attributes, "server")
        nonce = _expect(attributes, 0, "r", "server-first-message")
        salt = _unb64(_expect(attributes, 1, "s", "server-first-message"), "s")
        iterations_text = _expect(attributes, 2, "i", "server-first-message")
        if (
            not nonce.startswith(self._client_nonce)
            or len(nonce) == len(self._client_nonce)
            or not _is_printable_nonce(nonce)
        ):
            raise ProtocolError("invalid SCRAM server-first-message: bad nonce")
        if not salt:
            raise ProtocolError("invalid SCRAM server-first-message: empty salt")
        # At most 10 digits before int(): Python refuses to convert over 4300 of them.
        if not (iterations_text.isascii() and iterations_text.isdigit()) or len(
            iterations_text
        ) > len(str(_MAX_ITERATIONS)):
            raise ProtocolError("invalid SCRAM server-first-message: bad iteration count")
        iterations = int(iterations_text)
        if not 1 <= iterations <= _MAX_ITERATIONS:
            raise ProtocolError("invalid SCRAM server-first-message: bad iteration count")
        if self._password is not None:
            client_key, stored_key, server_key = _cached_keys(self._password, salt, iterations)
        else:
            secret = self._secret
            # Both set when there is no password (checked in __init__).
            assert secret is not None
            assert self._client_key is not None
            if salt != secret.salt or iterations != secret.iterations:
                raise AuthError(
                    "SCRAM pass-through failed: the server's secret for this user differs "
                    "from the proxy's (salt or iteration count)",
                    hint="Configure the proxy with the same SCRAM secret as in pg_authid, "
                    "or with the plaintext password.",
                )
            client_key, stored_key, server_key = (
                self._client_key,
                secret.stored_key,
                secret.server_key,
            )
        without_proof = f"c=biws,r={nonce}"  # "biws" = base64("n,,")
        auth_message = f"{self._client_first_bare},{server_first},{without_proof}".encode()
        proof = _xor(client_key, _hmac(stored_key, auth_message))
        self._server_signature = _hmac(server_key, auth_message)
        self._state = 2
        return f"{without_proof},p={_b64(proof)}".encode()

    def handle_server_final(self, data: bytes) -> None:
        """Verify server-final-message: the server must prove it knows the secret too."""
        if self._state != 2:
            raise ProtocolError("unexpected SCRAM server-final-message")
        attributes = _attributes(_text(data, "server-final-message"), "server-final-message")
        name, value = attributes[0]
        if name == "e":
            raise AuthError(f"server rejected SCRAM authentication: {value}")
        if name != "v":
            raise ProtocolError("malformed SCRAM message: expected attribute 'v'")
        if not hmac.compare_digest(_unb64(value, "v"), self._server_signature):
            raise AuthError("invalid SCRAM server signature: the server does not know the secret")
        self._state = 3


# --- md5 ----------------------------------------------------------------------------------


def _md5_hex(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def is_md5_secret(text: str) -> bool:
    """``md5`` + 32 lowercase hex digits, the same test as Postgres' get_password_type."""
    return (
        len(text) == 35
        and text.startswith("md5")
        and all(ch in "0123456789abcdef" for ch in text[3:])
    )


def md5_secret(user: str, password: str) -> str:
    """The stored md5 secret: ``"md5" + md5(password + user)`` in hex."""
    return "md5" + _md5_hex(password.encode() + user.encode())


def md5_response(secret_or_password: str, user: str, salt: bytes) -> bytes:
    """The PasswordMessage payload for AuthenticationMD5Password (without its NUL).

    ``"md5" + md5(md5(password + user) + salt)``; a stored md5 secret is enough to compute it.
    """
    secret = (
        secret_or_password
        if is_md5_secret(secret_or_password)
        else md5_secret(user, secret_or_password)
    )
    return b"md5" + _md5_hex(secret[3:].encode() + salt).encode()


def check_md5_response(secret: str, salt: bytes, response: bytes) -> bool:
    """Check a client's md5 response (without its NUL) against a stored md5 secret."""
    expected = b"md5" + _md5_hex(secret[3:].encode() + salt).encode()
    return hmac.compare_digest(expected, response)
