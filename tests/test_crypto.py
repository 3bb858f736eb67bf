"""acqhost.domain.crypto: the ACQ1 cryptography (PROTOCOL.md 4), with real keys throughout."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import nacl.encoding
import nacl.hash
import nacl.secret
import nacl.signing
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from acqhost.domain import crypto
from acqhost.domain.cards import luhn_ok, mask_account, mask_pan
from acqhost.domain.crypto import (
    CryptoError,
    HostKeys,
    SessionKeys,
    account_hash,
    decrypt_password,
    derive_keys,
    encrypt_password,
    hash_password,
    host_session,
    kx_keypair,
    mac,
    mac_hex,
    mac_ok,
    new_signing_key,
    seal,
    sign,
    signon_request_transcript,
    signon_response_transcript,
    terminal_session,
    unseal,
    verify,
    verify_key_of,
    verify_password,
)

# --- sign-on key exchange --------------------------------------------------------------------


def _signed_on() -> tuple[SessionKeys, SessionKeys]:
    """A full sign-on: both sides' SessionKeys from a real crypto_kx exchange."""
    host_pk, host_sk = kx_keypair()
    term_pk, term_sk = kx_keypair()
    host = SessionKeys.from_kx(*host_session(host_pk, host_sk, term_pk))
    terminal = SessionKeys.from_kx(*terminal_session(term_pk, term_sk, host_pk))
    return host, terminal


def test_both_sides_of_a_signon_derive_matching_directional_keys() -> None:
    host, terminal = _signed_on()
    # Terminal-to-host traffic: the terminal's tx keys are the host's rx keys, and back.
    assert terminal.tx_mac == host.rx_mac
    assert terminal.tx_enc == host.rx_enc
    assert host.tx_mac == terminal.rx_mac
    assert host.tx_enc == terminal.rx_enc
    # The two directions and the two purposes are all different keys.
    assert len({host.rx_mac, host.rx_enc, host.tx_mac, host.tx_enc}) == 4
    assert all(len(k) == 32 for k in (host.rx_mac, host.rx_enc, host.tx_mac, host.tx_enc))


def test_kx_session_keys_are_the_libsodium_server_and_client_roles() -> None:
    host_pk, host_sk = kx_keypair()
    term_pk, term_sk = kx_keypair()
    host_rx, host_tx = host_session(host_pk, host_sk, term_pk)
    term_rx, term_tx = terminal_session(term_pk, term_sk, host_pk)
    assert (host_rx, host_tx) == (term_tx, term_rx)
    assert host_rx != host_tx


def test_each_signon_gives_fresh_session_keys() -> None:
    first, _ = _signed_on()
    second, _ = _signed_on()
    assert first.rx_mac != second.rx_mac


@pytest.mark.parametrize(
    "bad_pk", [bytes(32), b"\x01" + bytes(31), b"short", bytes(33)], ids=["zero", "1", "31", "33"]
)
def test_a_bad_terminal_public_key_raises_crypto_error(bad_pk: bytes) -> None:
    host_pk, host_sk = kx_keypair()
    with pytest.raises(CryptoError):
        host_session(host_pk, host_sk, bad_pk)


def test_a_bad_host_public_key_raises_crypto_error() -> None:
    term_pk, term_sk = kx_keypair()
    with pytest.raises(CryptoError):
        terminal_session(term_pk, term_sk, bytes(32))
    with pytest.raises(CryptoError):
        terminal_session(term_pk, term_sk, b"x" * 16)


def test_crypto_error_is_a_value_error() -> None:
    assert issubclass(CryptoError, ValueError)


def test_session_keys_are_frozen_and_hidden_from_repr() -> None:
    host, _ = _signed_on()
    with pytest.raises(AttributeError):
        host.rx_mac = b"x" * 32  # type: ignore[misc]
    assert host.rx_mac.hex() not in repr(host)
    assert not hasattr(host, "__dict__")  # slots


# --- key derivation agrees with pynacl -------------------------------------------------------


@pytest.mark.parametrize("person", [b"acq1-mac", b"acq1-enc"])
def test_derived_keys_equal_pynacl_blake2b(person: bytes) -> None:
    k = os.urandom(32)
    expected = nacl.hash.blake2b(
        b"", key=k, person=person, digest_size=32, encoder=nacl.encoding.RawEncoder
    )
    mac_key, enc_key = derive_keys(k)
    assert (mac_key if person == b"acq1-mac" else enc_key) == expected


def test_derive_keys_needs_a_32_byte_key() -> None:
    with pytest.raises(CryptoError):
        derive_keys(b"x" * 31)


def test_account_hash_equals_pynacl_blake2b() -> None:
    data_key = os.urandom(32)
    expected = nacl.hash.blake2b(
        b"6222021234567890123",
        key=data_key,
        person=b"acq1-acct",
        digest_size=32,
        encoder=nacl.encoding.RawEncoder,
    )
    assert account_hash(data_key, "6222021234567890123") == expected


def test_account_hash_is_keyed_and_rejects_non_digits() -> None:
    k1, k2 = os.urandom(32), os.urandom(32)
    assert account_hash(k1, "622202123456") == account_hash(k1, "622202123456")
    assert account_hash(k1, "622202123456") != account_hash(k1, "622202123457")
    assert account_hash(k1, "622202123456") != account_hash(k2, "622202123456")
    for bad in ("", "6222 0212", "62220\uff12123456"):  # \uff12: a full-width digit
        with pytest.raises(CryptoError):
            account_hash(k1, bad)


# --- MAC -------------------------------------------------------------------------------------


def test_mac_is_keyed_blake2b_of_8_bytes_as_pynacl_computes_it() -> None:
    key = os.urandom(32)
    data = b"0200" + os.urandom(8) + b"000000000000001000"
    expected = nacl.hash.blake2b(data, key=key, digest_size=8, encoder=nacl.encoding.RawEncoder)
    assert mac(key, data) == expected
    assert mac_hex(key, data) == expected.hex().upper()
    assert len(mac_hex(key, data)) == 16


def test_mac_over_message_bytes_verifies_across_the_session() -> None:
    host, terminal = _signed_on()
    request = b"0200\x72\x00\x00\x00\x00\x00\x00\x01" + b"000000000000001000"
    tag = mac(terminal.tx_mac, request)
    assert mac_ok(host.rx_mac, request, tag)
    assert mac_ok(host.rx_mac, request, tag.hex().upper())
    assert mac_ok(host.rx_mac, request, tag.hex())  # hex in either case
    # The other direction's key does not verify it.
    assert not mac_ok(host.tx_mac, request, tag)


def test_mac_detects_tampering_with_any_byte() -> None:
    key = os.urandom(32)
    data = b"0200" + bytes(range(60))
    tag = mac(key, data)
    for i in range(len(data)):
        tampered = data[:i] + bytes([data[i] ^ 0x01]) + data[i + 1 :]
        assert not mac_ok(key, tampered, tag)
    assert not mac_ok(key, data + b"\x00", tag)
    assert not mac_ok(key, data[:-1], tag)
    assert not mac_ok(key, data, tag[:-1] + bytes([tag[-1] ^ 0x80]))


@pytest.mark.parametrize(
    "bad_tag", [b"", b"\x00" * 7, b"\x00" * 9, "", "ZZZZZZZZZZZZZZZZ", "é" * 16]
)
def test_mac_ok_is_false_for_malformed_tags(bad_tag: bytes | str) -> None:
    assert not mac_ok(os.urandom(32), b"data", bad_tag)


def test_mac_with_many_keys_stays_correct() -> None:
    # More distinct keys than the prepared-state cache holds, each MAC still right.
    data = b"payload"
    keys = [i.to_bytes(32, "big") for i in range(crypto._CACHE_MAX + 10)]
    tags = [mac(k, data) for k in keys]
    for k, t in zip(keys[:20] + keys[-20:], tags[:20] + tags[-20:], strict=True):
        assert t == nacl.hash.blake2b(data, key=k, digest_size=8, encoder=nacl.encoding.RawEncoder)
    assert len(crypto._mac_states) <= crypto._CACHE_MAX


def test_mac_rejects_a_key_of_the_wrong_length() -> None:
    with pytest.raises(CryptoError):
        mac(b"short", b"data")


@settings(max_examples=50, deadline=None)
@given(data=st.binary(max_size=600))
def test_mac_agrees_with_pynacl_for_any_message(data: bytes) -> None:
    key = b"K" * 32
    expected = nacl.hash.blake2b(data, key=key, digest_size=8, encoder=nacl.encoding.RawEncoder)
    assert mac(key, data) == expected
    assert mac_ok(key, data, expected)


# --- sign-on transcripts and signatures ------------------------------------------------------


def test_signon_transcripts_have_the_protocol_layout() -> None:
    kx_t = bytes(range(32))
    kx_h = bytes(range(32, 64))
    req = signon_request_transcript("12345678", "000123", "0101120000", kx_t)
    assert req == b"ACQ1-SIGNON" + b"12345678" + b"000123" + b"0101120000" + kx_t
    resp = signon_response_transcript("12345678", "000123", kx_h, kx_t)
    assert resp == b"ACQ1-SIGNON-RESP" + b"12345678" + b"000123" + kx_h + kx_t


def test_signon_transcripts_reject_bad_inputs() -> None:
    with pytest.raises(CryptoError):
        signon_request_transcript("12345678", "000123", "0101120000", b"x" * 31)
    with pytest.raises(CryptoError):
        signon_request_transcript("终端", "000123", "0101120000", bytes(32))
    with pytest.raises(CryptoError):
        signon_response_transcript("12345678", "000123", bytes(32), b"")


def test_signon_signatures_verify_both_ways_and_bind_the_transcript() -> None:
    terminal_seed, host_seed = new_signing_key(), new_signing_key()
    kx_t, _ = kx_keypair()
    kx_h, _ = kx_keypair()
    req = signon_request_transcript("12345678", "000123", "0101120000", kx_t)
    sig = sign(terminal_seed, req)
    assert len(sig) == 64
    assert verify(verify_key_of(terminal_seed), req, sig)
    # A swapped kx key (a man in the middle) or another STAN breaks it.
    assert not verify(
        verify_key_of(terminal_seed),
        signon_request_transcript("12345678", "000123", "0101120000", kx_h),
        sig,
    )
    assert not verify(
        verify_key_of(terminal_seed),
        signon_request_transcript("12345678", "000124", "0101120000", kx_t),
        sig,
    )
    resp = signon_response_transcript("12345678", "000123", kx_h, kx_t)
    assert verify(verify_key_of(host_seed), resp, sign(host_seed, resp))
    assert not verify(verify_key_of(terminal_seed), resp, sign(host_seed, resp))


def test_signatures_are_standard_ed25519() -> None:
    seed = new_signing_key()
    message = b"0320" + b"000000000001" + b"RF016ABCDEFGHIJKLMNOP"
    reference = nacl.signing.SigningKey(seed)
    assert verify_key_of(seed) == bytes(reference.verify_key)
    assert sign(seed, message) == reference.sign(message).signature
    reference.verify_key.verify(message, sign(seed, message))


@pytest.mark.parametrize(
    ("key", "sig"),
    [
        (b"", b"\x00" * 64),
        (b"\x00" * 31, b"\x00" * 64),
        (None, b"\x00" * 64),
        (b"\x00" * 32, b""),
        (b"\x00" * 32, b"\x00" * 63),
        (b"\x00" * 32, "00" * 64),
        (b"\x00" * 32, b"\x00" * 64),
    ],
)
def test_verify_never_raises_on_bad_input(key: object, sig: object) -> None:
    assert verify(key, b"message", sig) is False  # type: ignore[arg-type]


def test_verify_rejects_a_flipped_signature_bit() -> None:
    seed = new_signing_key()
    sig = bytearray(sign(seed, b"m"))
    sig[10] ^= 0x04
    assert not verify(verify_key_of(seed), b"m", bytes(sig))


def test_new_signing_keys_are_random_32_byte_seeds() -> None:
    assert len(new_signing_key()) == 32
    assert new_signing_key() != new_signing_key()
    with pytest.raises(CryptoError):
        sign(b"short", b"m")


# --- SecretBox and the PW element ------------------------------------------------------------


def test_seal_unseal_round_trip_with_a_fresh_nonce_each_time() -> None:
    key = os.urandom(32)
    a, b = seal(key, b"secret"), seal(key, b"secret")
    assert a != b
    assert unseal(key, a) == unseal(key, b) == b"secret"
    assert len(a) == 24 + 16 + len(b"secret")


def test_seal_is_standard_secretbox_with_the_nonce_first() -> None:
    key = os.urandom(32)
    sealed = seal(key, b"plain")
    assert nacl.secret.SecretBox(key).decrypt(sealed) == b"plain"
    theirs = nacl.secret.SecretBox(key).encrypt(b"theirs")
    assert unseal(key, bytes(theirs)) == b"theirs"


def test_unseal_detects_tampering_wrong_key_and_truncation() -> None:
    key = os.urandom(32)
    sealed = seal(key, b"operator password")
    for i in (0, 23, 24, 39, len(sealed) - 1):
        tampered = sealed[:i] + bytes([sealed[i] ^ 0x01]) + sealed[i + 1 :]
        with pytest.raises(CryptoError):
            unseal(key, tampered)
    with pytest.raises(CryptoError):
        unseal(os.urandom(32), sealed)
    for short in (b"", sealed[:39]):
        with pytest.raises(CryptoError):
            unseal(key, short)
    with pytest.raises(CryptoError):
        seal(b"short key", b"x")


def test_operator_password_travels_encrypted_under_the_terminal_tx_key() -> None:
    host, terminal = _signed_on()
    pw = encrypt_password(terminal.tx_enc, "s3cret-密码")
    assert "s3cret" not in pw
    assert all(c in "0123456789ABCDEF" for c in pw)
    assert decrypt_password(host.rx_enc, pw) == "s3cret-密码"
    assert decrypt_password(host.rx_enc, pw.lower()) == "s3cret-密码"
    with pytest.raises(CryptoError):
        decrypt_password(host.tx_enc, pw)  # the other direction's key


@pytest.mark.parametrize("bad", ["", "XYZ", "0", "00" * 10])
def test_decrypt_password_rejects_bad_hex_and_short_input(bad: str) -> None:
    with pytest.raises(CryptoError):
        decrypt_password(os.urandom(32), bad)


def test_decrypt_password_rejects_tampering_and_non_utf8() -> None:
    key = os.urandom(32)
    pw = bytearray(bytes.fromhex(encrypt_password(key, "pw")))
    pw[-1] ^= 1
    with pytest.raises(CryptoError):
        decrypt_password(key, pw.hex())
    with pytest.raises(CryptoError):
        decrypt_password(key, seal(key, b"\xff\xfe").hex())


# --- argon2id --------------------------------------------------------------------------------


def test_password_hash_verifies_only_the_right_password() -> None:
    hashed = hash_password("correct horse", fast=True)
    assert hashed.startswith(b"$argon2id$")
    assert verify_password(hashed, "correct horse")
    assert not verify_password(hashed, "correct horsf")
    assert not verify_password(hashed, "")
    assert hash_password("correct horse", fast=True) != hashed  # salted


def test_password_hash_handles_unicode() -> None:
    hashed = hash_password("操作员密码", fast=True)
    assert verify_password(hashed, "操作员密码")
    assert not verify_password(hashed, "操作员密")


def test_a_corrupt_stored_hash_is_an_error_not_a_wrong_password() -> None:
    with pytest.raises(CryptoError):
        verify_password(b"not a hash", "pw")
    with pytest.raises(CryptoError):
        verify_password("$argon2id$...", "pw")  # type: ignore[arg-type]


def test_interactive_hash_uses_the_interactive_limits() -> None:
    hashed = hash_password("pw")
    assert b"m=65536,t=2" in hashed
    assert verify_password(hashed, "pw")


# --- Luhn and masks --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "digits", ["79927398713", "4111111111111111", "6222021234567890128", "0", "18"]
)
def test_luhn_accepts_valid_numbers(digits: str) -> None:
    assert luhn_ok(digits)


@pytest.mark.parametrize(
    "digits",
    ["79927398710", "4111111111111112", "", "4111-1111-1111-1111", "41111111111111\uff111", "abc"],
)
def test_luhn_rejects_invalid_or_non_digit_input(digits: str) -> None:
    assert not luhn_ok(digits)


@given(st.text(alphabet="0123456789", min_size=1, max_size=25))
def test_luhn_agrees_with_the_textbook_algorithm(digits: str) -> None:
    total = 0
    for i, c in enumerate(reversed(digits)):
        d = int(c)
        if i % 2:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    assert luhn_ok(digits) == (total % 10 == 0)


@given(st.text(alphabet="0123456789", min_size=13, max_size=19))
def test_luhn_catches_every_single_digit_error(digits: str) -> None:
    if luhn_ok(digits):
        for i in range(len(digits)):
            changed = digits[:i] + str((int(digits[i]) + 1) % 10) + digits[i + 1 :]
            assert not luhn_ok(changed)


def test_mask_pan_keeps_first_six_and_last_four() -> None:
    assert mask_pan("6222021234567890123") == "622202*********0123"
    assert mask_pan("4111111111111111") == "411111******1111"
    assert mask_pan("4111111111111") == "411111***1111"
    assert mask_pan("123456789012") == "********9012"
    assert mask_pan("1234") == "****"
    assert mask_pan("") == ""


def test_mask_account_keeps_first_four_and_last_four() -> None:
    assert mask_account("6222021234561234") == "6222********1234"
    assert mask_account("622202123456") == "6222****3456"
    assert mask_account("6222021234567890123") == "6222***********0123"
    assert mask_account("12345678901") == "*******8901"
    assert mask_account("123") == "***"


# --- host keys at rest -----------------------------------------------------------------------


def test_host_keys_save_creates_a_0600_file_and_load_round_trips(tmp_path: Path) -> None:
    keys = HostKeys.generate()
    path = tmp_path / "host.keys"
    old = os.umask(0)  # even with a permissive umask the file is 0600
    try:
        keys.save(path)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    doc = json.loads(path.read_text())
    assert doc == {"signing_seed": keys.signing_seed.hex(), "data_key": keys.data_key.hex()}
    loaded = HostKeys.load(path)
    assert loaded == keys
    assert loaded.verify_key == verify_key_of(keys.signing_seed)
    assert keys.signing_seed.hex() not in repr(keys)


def test_host_keys_never_overwrite_an_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "host.keys"
    first = HostKeys.generate()
    first.save(path)
    with pytest.raises(FileExistsError):
        HostKeys.generate().save(path)
    assert HostKeys.load(path) == first


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_host_keys_load_refuses_a_file_readable_by_others(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "host.keys"
    HostKeys.generate().save(path)
    path.chmod(mode)
    with pytest.raises(CryptoError, match="group or others"):
        HostKeys.load(path)


@pytest.mark.parametrize(
    "content",
    [
        "",
        "not json",
        "[]",
        '{"signing_seed": "00"}',
        '{"signing_seed": "zz", "data_key": "zz"}',
        json.dumps({"signing_seed": "00" * 31, "data_key": "00" * 32}),
        json.dumps({"signing_seed": "00" * 32, "data_key": 5}),
    ],
)
def test_host_keys_load_refuses_malformed_content(tmp_path: Path, content: str) -> None:
    path = tmp_path / "host.keys"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(content)
    with pytest.raises(CryptoError):
        HostKeys.load(path)


def test_host_keys_reject_wrong_lengths() -> None:
    with pytest.raises(CryptoError):
        HostKeys(signing_seed=b"x" * 31, data_key=b"y" * 32)


def test_host_keys_load_of_a_missing_file_is_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        HostKeys.load(tmp_path / "absent")
