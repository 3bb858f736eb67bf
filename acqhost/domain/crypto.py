"""All cryptography of profile ACQ1 (PROTOCOL.md section 4).

* Session keys: libsodium ``crypto_kx`` (terminal = client, host = server); each direction's
  32-byte key ``k`` gives ``mac_key`` and ``enc_key`` by personalised keyed BLAKE2b.
* MAC (field 64/128): keyed BLAKE2b, 8 bytes, over the message bytes that precede the MAC field.
* Identities and sign-on transcripts: Ed25519 (detached signatures).
* Encrypted operator password (48 PW): SecretBox, 24-byte nonce first, hex.
* Operator password storage: argon2id strings.
* Settlement accounts: keyed BLAKE2b for equality checks without storing the number.

BLAKE2b comes from :mod:`hashlib` (the same function as libsodium's ``crypto_generichash``, and
cheaper to call than pynacl on the hot path); everything else from pynacl.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import stat
from dataclasses import dataclass, field
from typing import Final

import nacl.bindings as _sodium
import nacl.exceptions
import nacl.pwhash.argon2id as _argon2id
import nacl.secret
import nacl.utils

__all__ = (
    "KEY_BYTES",
    "MAC_BYTES",
    "SIGNATURE_BYTES",
    "CryptoError",
    "HostKeys",
    "SessionKeys",
    "account_hash",
    "audit_digest",
    "decrypt_password",
    "derive_keys",
    "encrypt_password",
    "hash_password",
    "host_session",
    "kx_keypair",
    "mac",
    "mac_hex",
    "mac_ok",
    "new_signing_key",
    "seal",
    "sign",
    "signon_request_transcript",
    "signon_response_transcript",
    "terminal_session",
    "unseal",
    "verify",
    "verify_key_of",
    "verify_password",
)

KEY_BYTES: Final = 32
"""Length of every symmetric key, kx key, Ed25519 seed and Ed25519 public key."""
MAC_BYTES: Final = 8
"""Length of the binary MAC of field 64/128 (16 hex characters in the decoded message)."""
SIGNATURE_BYTES: Final = 64
"""Length of a detached Ed25519 signature."""

_PERSON_MAC: Final = b"acq1-mac"
_PERSON_ENC: Final = b"acq1-enc"
_PERSON_ACCT: Final = b"acq1-acct"
_PERSON_AUDIT: Final = b"acq1-audit"
_SIGNON: Final = b"ACQ1-SIGNON"
_SIGNON_RESP: Final = b"ACQ1-SIGNON-RESP"
_NONCE_BYTES: Final = nacl.secret.SecretBox.NONCE_SIZE
_BOX_OVERHEAD: Final = _NONCE_BYTES + nacl.secret.SecretBox.MACBYTES
# Caches are keyed by key material; a host has a bounded number of live sessions, but a
# runaway cache must never grow without limit, so it is simply emptied when full.
_CACHE_MAX: Final = 8192
_O_NOFOLLOW: Final = getattr(os, "O_NOFOLLOW", 0)


class CryptoError(ValueError):
    """A key, signature, ciphertext or key file that cannot be used.

    A ``ValueError`` so that callers that treat bad peer input as a format problem catch it.
    """


# --- session keys ----------------------------------------------------------------------------


def derive_keys(k: bytes) -> tuple[bytes, bytes]:
    """``(mac_key, enc_key)`` of one direction's 32-byte crypto_kx session key ``k``.

    ``BLAKE2b(b"", key=k, person=b"acq1-mac" / b"acq1-enc", digest_size=32)``.
    """
    _need_len(k, KEY_BYTES, "session key")
    mac_key = hashlib.blake2b(key=k, person=_PERSON_MAC, digest_size=32).digest()
    enc_key = hashlib.blake2b(key=k, person=_PERSON_ENC, digest_size=32).digest()
    return mac_key, enc_key


@dataclass(frozen=True, slots=True)
class SessionKeys:
    """The four keys one side of a session uses.

    ``rx_*`` authenticate/decrypt what this side receives, ``tx_*`` what it sends. On the host
    rx is terminal-to-host and tx host-to-terminal; a terminal holds the mirror image. Key
    bytes are left out of ``repr`` so that a logged object never shows them.
    """

    rx_mac: bytes = field(repr=False)
    rx_enc: bytes = field(repr=False)
    tx_mac: bytes = field(repr=False)
    tx_enc: bytes = field(repr=False)

    @classmethod
    def from_kx(cls, rx: bytes, tx: bytes) -> SessionKeys:
        """Derive the MAC and encryption keys of both directions from crypto_kx's rx and tx."""
        rx_mac, rx_enc = derive_keys(rx)
        tx_mac, tx_enc = derive_keys(tx)
        return cls(rx_mac=rx_mac, rx_enc=rx_enc, tx_mac=tx_mac, tx_enc=tx_enc)


def kx_keypair() -> tuple[bytes, bytes]:
    """A fresh ephemeral crypto_kx key pair ``(public_key, secret_key)``, 32 bytes each."""
    public, secret = _sodium.crypto_kx_keypair()
    return public, secret


def host_session(host_pk: bytes, host_sk: bytes, terminal_pk: bytes) -> tuple[bytes, bytes]:
    """The host's ``(rx, tx)`` session keys (crypto_kx server side).

    Raises :class:`CryptoError` for a public key of the wrong length or one that crypto_kx
    rejects (for example a low-order point such as all zeros).
    """
    _need_len(terminal_pk, KEY_BYTES, "terminal kx public key")
    try:
        rx, tx = _sodium.crypto_kx_server_session_keys(host_pk, host_sk, terminal_pk)
    except (nacl.exceptions.CryptoError, TypeError, ValueError) as exc:
        raise CryptoError(f"key exchange failed: {exc}") from None
    return rx, tx


def terminal_session(terminal_pk: bytes, terminal_sk: bytes, host_pk: bytes) -> tuple[bytes, bytes]:
    """A terminal's ``(rx, tx)`` session keys (crypto_kx client side).

    Its tx equals the host's rx and its rx the host's tx. Raises :class:`CryptoError` for an
    unusable host public key.
    """
    _need_len(host_pk, KEY_BYTES, "host kx public key")
    try:
        rx, tx = _sodium.crypto_kx_client_session_keys(terminal_pk, terminal_sk, host_pk)
    except (nacl.exceptions.CryptoError, TypeError, ValueError) as exc:
        raise CryptoError(f"key exchange failed: {exc}") from None
    return rx, tx


# --- MAC (hot path) --------------------------------------------------------------------------

# A keyed BLAKE2b state costs one compression of the key block to set up; copying a prepared
# state skips it (about 0.6 us instead of 1.1 us per MAC on a typical message).
_mac_states: dict[bytes, hashlib.blake2b] = {}


def _mac_state(mac_key: bytes) -> hashlib.blake2b:
    state = _mac_states.get(mac_key)
    if state is None:
        _need_len(mac_key, KEY_BYTES, "MAC key")
        if len(_mac_states) >= _CACHE_MAX:
            _mac_states.clear()
        state = _mac_states[mac_key] = hashlib.blake2b(key=mac_key, digest_size=MAC_BYTES)
    return state


def mac(mac_key: bytes, data: bytes) -> bytes:
    """The 8-byte MAC of ``data``: keyed BLAKE2b (digest_size 8) with ``mac_key``.

    ``data`` is every message byte before the MAC field (PROTOCOL.md 4.3).
    """
    h = _mac_state(mac_key).copy()
    h.update(data)
    return h.digest()


def mac_hex(mac_key: bytes, data: bytes) -> str:
    """:func:`mac` as 16 upper-case hex characters, the form the codec carries field 64 in."""
    h = _mac_state(mac_key).copy()
    h.update(data)
    return h.hexdigest().upper()


def mac_ok(mac_key: bytes, data: bytes, tag: bytes | str) -> bool:
    """True if ``tag`` is the MAC of ``data``; compared in constant time.

    ``tag`` is either the 8 raw bytes or their hex text (either case) as the codec gives it.
    Anything else (wrong length, non-ASCII text) is simply False.
    """
    h = _mac_state(mac_key).copy()
    h.update(data)
    if isinstance(tag, str):
        if not tag.isascii():
            return False
        return hmac.compare_digest(h.hexdigest().upper(), tag.upper())
    return hmac.compare_digest(h.digest(), tag)


# --- sign-on transcripts and Ed25519 ---------------------------------------------------------


def signon_request_transcript(tid: str, stan: str, field7: str, kx_terminal: bytes) -> bytes:
    """What a terminal signs in its 0800 sign-on:
    ``b"ACQ1-SIGNON" + tid + stan + field7 + kx_terminal_raw32`` (text as ASCII).

    The parts are joined without separators, so each must have its field's fixed width (41:
    8, 11: 6, 7: 10), or one terminal's transcript could be another's: :class:`CryptoError`.
    """
    _need_len(kx_terminal, KEY_BYTES, "terminal kx public key")
    return (
        _SIGNON
        + _ascii(tid, "tid", 8)
        + _ascii(stan, "stan", 6)
        + _ascii(field7, "field 7", 10)
        + (kx_terminal)
    )


def signon_response_transcript(tid: str, stan: str, kx_host: bytes, kx_terminal: bytes) -> bytes:
    """What the host signs in its 0810:
    ``b"ACQ1-SIGNON-RESP" + tid + stan + kx_host_raw32 + kx_terminal_raw32`` (tid and stan
    of fixed width, as in :func:`signon_request_transcript`)."""
    _need_len(kx_host, KEY_BYTES, "host kx public key")
    _need_len(kx_terminal, KEY_BYTES, "terminal kx public key")
    return _SIGNON_RESP + _ascii(tid, "tid", 8) + _ascii(stan, "stan", 6) + kx_host + kx_terminal


def new_signing_key() -> bytes:
    """A fresh 32-byte Ed25519 seed (the private identity key as stored)."""
    return nacl.utils.random(KEY_BYTES)


# Expanding a seed into libsodium's 64-byte secret key costs about as much as a signature.
_secret_keys: dict[bytes, bytes] = {}


def _secret_key(seed: bytes) -> bytes:
    sk = _secret_keys.get(seed)
    if sk is None:
        _need_len(seed, KEY_BYTES, "Ed25519 seed")
        if len(_secret_keys) >= _CACHE_MAX:
            _secret_keys.clear()
        _pk, sk = _sodium.crypto_sign_seed_keypair(seed)
        _secret_keys[seed] = sk
    return sk


def verify_key_of(seed: bytes) -> bytes:
    """The 32-byte Ed25519 public key of ``seed``."""
    return _secret_key(seed)[KEY_BYTES:]


def sign(seed: bytes, message: bytes) -> bytes:
    """The 64-byte detached Ed25519 signature of ``message`` by ``seed``."""
    signed: bytes = _sodium.crypto_sign(message, _secret_key(seed))
    return signed[:SIGNATURE_BYTES]


def verify(verify_key: bytes, message: bytes, signature: bytes) -> bool:
    """True if ``signature`` is ``verify_key``'s valid signature of ``message``.

    Never raises: a key or signature of the wrong type or length is simply False.
    """
    if not (
        isinstance(verify_key, bytes)
        and isinstance(signature, bytes)
        and isinstance(message, bytes)
        and len(verify_key) == KEY_BYTES
        and len(signature) == SIGNATURE_BYTES
    ):
        return False
    try:
        _sodium.crypto_sign_open(signature + message, verify_key)
    except (nacl.exceptions.CryptoError, TypeError, ValueError):
        return False
    return True


# --- SecretBox and the encrypted operator password ----------------------------------------


def seal(key: bytes, plaintext: bytes) -> bytes:
    """SecretBox ``plaintext`` under the 32-byte ``key``: random 24-byte nonce, then ciphertext."""
    _need_len(key, KEY_BYTES, "SecretBox key")
    nonce = nacl.utils.random(_NONCE_BYTES)
    return nonce + _sodium.crypto_secretbox_easy(plaintext, nonce, key)


def unseal(key: bytes, sealed: bytes) -> bytes:
    """Open what :func:`seal` made. :class:`CryptoError` if it is too short, was made under
    another key, or was changed."""
    _need_len(key, KEY_BYTES, "SecretBox key")
    if len(sealed) < _BOX_OVERHEAD:
        raise CryptoError("sealed data too short")
    try:
        plain: bytes = _sodium.crypto_secretbox_open_easy(
            sealed[_NONCE_BYTES:], sealed[:_NONCE_BYTES], key
        )
    except (nacl.exceptions.CryptoError, TypeError, ValueError):
        raise CryptoError("sealed data failed authentication") from None
    return plain


def encrypt_password(enc_key: bytes, password: str) -> str:
    """Field 48 PW: upper-case hex of ``seal(enc_key, password UTF-8)`` (PROTOCOL.md 4.3)."""
    return seal(enc_key, password.encode("utf-8")).hex().upper()


def decrypt_password(enc_key: bytes, hex_text: str) -> str:
    """The password inside a field 48 PW value (hex in either case).

    :class:`CryptoError` for bad hex, a wrong key or tampering, or a plaintext that is not UTF-8.
    """
    try:
        sealed = bytes.fromhex(hex_text)
    except (ValueError, TypeError):
        raise CryptoError("PW is not hex") from None
    try:
        return unseal(enc_key, sealed).decode("utf-8")
    except UnicodeDecodeError:
        raise CryptoError("PW plaintext is not UTF-8") from None


# --- operator passwords at rest --------------------------------------------------------------


def hash_password(password: str, *, fast: bool = False) -> bytes:
    """An argon2id string (``b"$argon2id$..."``) for storing an operator password.

    Interactive limits (about 0.1 s and 64 MiB: run it off the event loop); ``fast=True`` uses
    the minimum limits, for tests and the demo only.
    """
    if fast:
        ops, mem = _argon2id.OPSLIMIT_MIN, _argon2id.MEMLIMIT_MIN
    else:
        ops, mem = _argon2id.OPSLIMIT_INTERACTIVE, _argon2id.MEMLIMIT_INTERACTIVE
    hashed: bytes = _argon2id.str(password.encode("utf-8"), opslimit=ops, memlimit=mem)
    return hashed


def verify_password(hashed: bytes, password: str) -> bool:
    """True if ``password`` matches the stored argon2 string ``hashed``; False if not.

    A stored value that is not an argon2 string at all raises :class:`CryptoError`: that is a
    corrupt record (our fault, answer 96), not a wrong password to count towards a lock-out.
    """
    if not isinstance(hashed, bytes) or not hashed.startswith(b"$argon2"):
        raise CryptoError("stored password hash is not an argon2 string")
    try:
        return bool(_argon2id.verify(hashed, password.encode("utf-8")))
    except nacl.exceptions.CryptoError:
        return False


# --- settlement accounts and card numbers ----------------------------------------------------


def account_hash(data_key: bytes, account: str) -> bytes:
    """32-byte keyed BLAKE2b (person ``acq1-acct``) of an account number's digits.

    Equal accounts give equal hashes under one data key, so "same as the current account" can
    be checked without keeping the number in clear. :class:`CryptoError` if ``account`` is not
    ASCII digits.
    """
    _need_len(data_key, KEY_BYTES, "data key")
    if not (account.isascii() and account.isdigit()):
        raise CryptoError("account number must be ASCII digits")
    return hashlib.blake2b(
        account.encode("ascii"), key=data_key, person=_PERSON_ACCT, digest_size=32
    ).digest()


def audit_digest(data_key: bytes, prev_digest: bytes, content: bytes) -> bytes:
    """32-byte keyed BLAKE2b (person ``acq1-audit``) of the previous audit entry's digest and
    an entry's content: the link of the audit log's hash chain. Keyed with the host data key,
    so whoever can edit the database but not read the key file cannot forge a chain."""
    _need_len(data_key, KEY_BYTES, "data key")
    state = hashlib.blake2b(key=data_key, person=_PERSON_AUDIT, digest_size=32)
    state.update(prev_digest)
    state.update(content)
    return state.digest()


# --- host keys at rest -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HostKeys:
    """The host's long-term secrets: its Ed25519 identity seed (sign-on responses, bank
    advices) and the data key for :func:`account_hash`. Kept in a 0600 JSON file."""

    signing_seed: bytes = field(repr=False)
    data_key: bytes = field(repr=False)

    def __post_init__(self) -> None:
        _need_len(self.signing_seed, KEY_BYTES, "signing seed")
        _need_len(self.data_key, KEY_BYTES, "data key")

    @property
    def verify_key(self) -> bytes:
        """The host's Ed25519 public key, given to terminals and banks."""
        return verify_key_of(self.signing_seed)

    @classmethod
    def generate(cls) -> HostKeys:
        """Fresh random keys."""
        return cls(signing_seed=new_signing_key(), data_key=nacl.utils.random(KEY_BYTES))

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the keys as JSON to a new file created with mode 0600.

        Raises :class:`FileExistsError` if ``path`` exists: keys are never overwritten.
        """
        text = json.dumps(
            {"signing_seed": self.signing_seed.hex(), "data_key": self.data_key.hex()}
        )
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW, 0o600)
        try:
            # The umask can only take bits away, but be explicit about the final mode.
            os.fchmod(fd, 0o600)
            os.write(fd, text.encode("ascii") + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> HostKeys:
        """Read keys written by :meth:`save`.

        :class:`CryptoError` if the file is accessible to group or others (mode & 0o077), is not
        a regular file, or its content is malformed. ``FileNotFoundError`` if it is missing.
        """
        fd = os.open(path, os.O_RDONLY | _O_NOFOLLOW)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise CryptoError(f"{os.fspath(path)!s}: host key file is not a regular file")
            if st.st_mode & 0o077:
                raise CryptoError(
                    f"{os.fspath(path)!s}: host key file is accessible to group or others "
                    f"(mode {stat.S_IMODE(st.st_mode):04o}); chmod 600 it"
                )
            raw = b""
            while chunk := os.read(fd, 65536):
                raw += chunk
        finally:
            os.close(fd)
        try:
            doc = json.loads(raw)
            seed = bytes.fromhex(doc["signing_seed"])
            data_key = bytes.fromhex(doc["data_key"])
            return cls(signing_seed=seed, data_key=data_key)
        except (ValueError, TypeError, KeyError) as exc:
            # CryptoError is a ValueError: a bad length from __post_init__ lands here too.
            raise CryptoError(f"{os.fspath(path)!s}: malformed host key file") from exc


# --- helpers ---------------------------------------------------------------------------------


def _need_len(value: bytes, length: int, what: str) -> None:
    if not isinstance(value, bytes) or len(value) != length:
        raise CryptoError(f"{what} must be {length} bytes")


def _ascii(text: str, what: str, width: int) -> bytes:
    try:
        raw = text.encode("ascii")
    except UnicodeEncodeError:
        raise CryptoError(f"{what} must be ASCII") from None
    if len(raw) != width:
        raise CryptoError(f"{what} must be {width} characters")
    return raw
