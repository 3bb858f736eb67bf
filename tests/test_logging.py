"""acqhost.log: JSON lines, and card data / secrets never in clear."""

from __future__ import annotations

import ast
import contextvars
import io
import json
import logging
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import structlog
from hypothesis import given
from hypothesis import strategies as st

import acqhost.log
from acqhost.domain.crypto import encrypt_password
from acqhost.log import (
    configure_logging,
    get_logger,
    mask_sensitive,
    mask_text,
    message_logger,
)
from acqhost.log.line import IsoTimestamps

PAN = "6222021234567890128"  # Luhn-valid, 19 digits
PAN16 = "4111111111111111"
TRACK2 = f"{PAN}=25122011234567800"
ACCOUNT = "6217001234567890"  # settlement account (not Luhn-valid: masked 4/4)
PASSWORD = "s3cret-operator-pw"
PW_HEX = encrypt_password(b"k" * 32, PASSWORD)
FIELD48 = (
    f"OP00201PW{len(PW_HEX):03d}{PW_HEX}NM006ZhangSBK012102100099996"
    f"AC{len(ACCOUNT):03d}{ACCOUNT}EF01420250101120000"
)


@pytest.fixture
def output() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    configure_logging("debug", stream=stream)
    yield stream
    configure_logging("info", stream=io.StringIO())


def _lines(stream: io.StringIO) -> list[dict[str, Any]]:
    text = stream.getvalue()
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


def _secrets_absent(text: str) -> None:
    for secret in (PAN, PAN16, ACCOUNT, PASSWORD, PW_HEX, "25122011234567800", "1234567890"):
        assert secret not in text, secret


# --- output format ---------------------------------------------------------------------------


def test_a_sale_event_is_one_readable_json_line(output: io.StringIO) -> None:
    log = get_logger("acqhost.pipeline")
    log.info(
        "sale",
        tid="12345678",
        mti="0210",
        stan="000123",
        rc="00",
        latency_ms=1.25,
        amount="000000001000",
    )
    [line] = _lines(output)
    assert line["event"] == "sale"
    assert line["tid"] == "12345678"
    assert line["mti"] == "0210"
    assert line["stan"] == "000123"
    assert line["rc"] == "00"
    assert line["amount"] == "000000001000"
    assert line["latency_ms"] == 1.25
    assert line["level"] == "info"
    assert line["logger"] == "acqhost.pipeline"
    stamp = datetime.fromisoformat(line["timestamp"].replace("Z", "+00:00"))
    assert stamp.utcoffset() is not None
    assert stamp.utcoffset().total_seconds() == 0  # type: ignore[union-attr]


def test_every_event_is_exactly_one_line(output: io.StringIO) -> None:
    log = get_logger()
    log.info("first", note="multi\nline\ntext")
    log.warning("second", holder="张三丰")
    try:
        raise RuntimeError("boom\nwith lines")
    except RuntimeError:
        log.exception("third")
    lines = _lines(output)
    assert [line["event"] for line in lines] == ["first", "second", "third"]
    assert lines[0]["note"] == "multi\nline\ntext"
    assert lines[1]["holder"] == "张三丰"
    assert lines[1]["level"] == "warning"
    assert "RuntimeError: boom" in lines[2]["exception"]
    assert lines[2]["level"] == "error"


def test_level_filters_events() -> None:
    stream = io.StringIO()
    configure_logging("warning", stream=stream)
    log = get_logger("x")
    log.debug("no")
    log.info("no")
    log.warning("yes")
    log.error("yes too")
    assert [line["event"] for line in _lines(stream)] == ["yes", "yes too"]


def test_unknown_level_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown log level"):
        configure_logging("loud", stream=io.StringIO())


def test_a_logger_made_before_configuration_follows_the_newest_one() -> None:
    log = get_logger("early")
    first, second = io.StringIO(), io.StringIO()
    configure_logging(stream=first)
    log.info("one")
    configure_logging(stream=second)
    log.info("two")
    assert [line["event"] for line in _lines(first)] == ["one"]
    assert [line["event"] for line in _lines(second)] == ["two"]


def test_bound_context_is_masked_too(output: io.StringIO) -> None:
    log = get_logger("x").bind(tid="12345678", pan=PAN)
    log.info("bound")
    structlog.contextvars.bind_contextvars(track2=TRACK2)
    try:
        get_logger("x").info("ctx")
    finally:
        structlog.contextvars.clear_contextvars()
    _secrets_absent(output.getvalue())
    lines = _lines(output)
    assert lines[0]["pan"] == "622202*********0128"
    assert lines[0]["tid"] == "12345678"
    assert lines[1]["track2"] == "***"


def test_stdlib_logging_goes_through_the_same_masking(output: io.StringIO) -> None:
    logging.getLogger("some.library").warning("card %s track %s", PAN, TRACK2)
    [line] = _lines(output)
    assert line["logger"] == "some.library"
    assert line["level"] == "warning"
    assert "622202*********0128" in line["event"]
    _secrets_absent(output.getvalue())


# --- masking through the whole chain ---------------------------------------------------------


def test_card_data_accounts_and_passwords_never_appear_in_clear(output: io.StringIO) -> None:
    log = get_logger("acqhost.pipeline")
    log.info(
        f"sale for card {PAN}",
        tid="12345678",
        stan="000123",
        amount="000000001000",
        pan=PAN,
        track2=TRACK2,
        account=ACCOUNT,
        password=PASSWORD,
        field48=FIELD48,
        raw_track=f"35={TRACK2}",
        message={"t": "0200", "2": PAN16, "35": TRACK2, "4": "000000001000", "48": FIELD48},
        nested=[{"card": PAN}, (f"acct {ACCOUNT}",), b"bytes " + PAN16.encode()],
        settlement_account=ACCOUNT,
        host_signing_seed="00" * 32,
    )
    text = output.getvalue()
    _secrets_absent(text)
    [line] = _lines(output)
    assert line["event"] == "sale for card 622202*********0128"
    assert line["tid"] == "12345678"
    assert line["stan"] == "000123"
    assert line["amount"] == "000000001000"
    assert line["pan"] == "622202*********0128"
    assert line["track2"] == "***"
    assert line["raw_track"] == "35=622202*********0128=*****"
    assert line["account"] == "6217********7890"
    assert line["settlement_account"] == "6217********7890"
    assert line["password"] == "***"
    assert line["host_signing_seed"] == "***"
    assert line["message"]["t"] == "0200"
    assert line["message"]["2"] == "411111******1111"
    assert line["message"]["35"] == "***"
    assert line["message"]["4"] == "000000001000"
    # Field 48: PW value gone, AC masked 4/4, the bank code and EF still readable.
    f48 = line["field48"]
    assert "PW" + f"{len(PW_HEX):03d}***" in f48
    assert f"AC{len(ACCOUNT):03d}6217********7890" in f48
    assert "BK012102100099996" in f48
    assert "EF01420250101120000" in f48
    assert "NM006ZhangS" in f48
    assert line["nested"][0] == {"card": "622202*********0128"}
    assert line["nested"][1] == ["acct 6217********7890"]
    assert line["nested"][2] == "bytes 411111******1111"


def test_exception_text_is_masked(output: io.StringIO) -> None:
    try:
        raise ValueError(f"cannot parse track 2 {TRACK2}")
    except ValueError:
        get_logger().exception("decode failed")
    _secrets_absent(output.getvalue())


def test_masking_does_not_change_the_callers_objects(output: io.StringIO) -> None:
    message = {"2": PAN, "48": FIELD48, "list": [PAN]}
    snapshot = json.dumps(message)
    get_logger().info("decoded", message=message)
    assert json.dumps(message) == snapshot
    _secrets_absent(output.getvalue())


# --- the processor and the text rules --------------------------------------------------------


def _mask(**event: Any) -> dict[str, Any]:
    return dict(mask_sensitive(None, "info", dict(event)))


def test_ordinary_numbers_stay_readable() -> None:
    event = {
        "event": "sale approved",
        "tid": "12345678",
        "mid": "898310048160001",
        "mti": "0200",
        "stan": "000123",
        "rc": "00",
        "amount": "000000001000",
        "rrn": "000000000042",
        "bank_code": "102100099996",
        "effective_from": "20250101120000",
        "7": "0101120000",
        "count": 12,
        "latency_ms": 0.75,
        "port": 8583,
        "ok": True,
        "nothing": None,
    }
    assert _mask(**event) == event


def test_a_twelve_digit_number_under_an_unknown_key_is_masked() -> None:
    assert _mask(ref="123456789012") == {"ref": "1234****9012"}
    # ...but not a shorter one, nor a 12-digit amount under its own key.
    assert _mask(ref="12345678901") == {"ref": "12345678901"}
    assert _mask(amount="123456789012") == {"amount": "123456789012"}


def test_a_safe_key_does_not_let_a_longer_value_through() -> None:
    assert _mask(amount=PAN) == {"amount": "622202*********0128"}
    assert _mask(stan=f"x{PAN}") == {"stan": "x622202*********0128"}
    assert _mask(tid=int(PAN)) == {"tid": "622202*********0128"}


def test_secret_keys_are_matched_case_insensitively_and_by_suffix() -> None:
    masked = _mask(
        PASSWORD="a", Pw="b", data_key="c", terminal_signing_key="d", mac_key="e", PIN="1234"
    )
    assert set(masked.values()) == {"***"}
    assert _mask(password=None, pw="") == {"password": None, "pw": ""}


def test_keys_that_hold_card_numbers_are_masked() -> None:
    assert _mask(**{PAN: 1}) == {"622202*********0128": 1}
    assert _mask(by_card={PAN: 2}) == {"by_card": {"622202*********0128": 2}}


def test_large_integers_and_floats_are_masked() -> None:
    assert _mask(value=int(PAN)) == {"value": "622202*********0128"}
    assert _mask(value=123) == {"value": 123}
    assert "1234567890" not in json.dumps(_mask(value=1234567890123456.0))


def test_other_objects_are_masked_through_repr() -> None:
    class Card:
        def __repr__(self) -> str:
            return f"Card({PAN})"

    assert _mask(card_obj=Card()) == {"card_obj": "Card(622202*********0128)"}


def test_deeply_nested_values_do_not_recurse_forever() -> None:
    loop: list[Any] = []
    loop.append(loop)
    assert "nested too deep" in json.dumps(_mask(loop=loop))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (PAN, "622202*********0128"),
        (f"pan={PAN16}.", "pan=411111******1111."),
        (TRACK2, "622202*********0128=*****"),
        (f"{PAN}D2512201", "622202*********0128D*****"),
        (f"{PAN}=", "622202*********0128="),
        ("123456789012", "1234****9012"),
        ("1234567890123456789012345", "1234*****************2345"),
        ("PW005abcde rest", "PW005*** rest"),
        (f"AC016{ACCOUNT}", "AC0166217********7890"),
        ("BK012102100099996", "BK012102100099996"),
        ("AM012000000001000CT003100", "AM012000000001000CT003100"),
        ("stan 000123 amount 000000001000", "stan 000123 amount 0000****1000"),
        ("", ""),
        ("plain words ACTIVE PWR", "plain words ACTIVE PWR"),
    ],
)
def test_mask_text_rules(text: str, expected: str) -> None:
    assert mask_text(text) == expected


def test_fake_tlv_headers_do_not_hide_a_pan() -> None:
    # An "AC"/"BK" header whose value is not what the element holds does not exempt the digits.
    assert mask_text(f"AC{PAN}") == "AC622202*********0128"
    assert PAN[3:] not in mask_text(f"BK012{PAN}")
    assert mask_text(f"PW003abc{PAN}") == "PW003***622202*********0128"
    assert mask_text("PW0031231234567890123456") == "PW003***"


@given(
    prefix=st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZ=D :;,", max_size=8),
    suffix=st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZ=D :;,", max_size=8),
    pan=st.from_regex(r"[1-9][0-9]{12,18}", fullmatch=True),
)
def test_no_more_than_ten_digits_of_a_card_number_survive(
    prefix: str, suffix: str, pan: str
) -> None:
    # Card numbers never start with 0; the exempt TLV shapes (BK012..., EF014...) all do.
    masked = mask_text(prefix + pan + suffix)
    assert sum(c.isdigit() for c in masked) <= 10
    assert pan not in masked


# --- the per-message event's own writer ------------------------------------------------------

_STAMP = re.compile(r'"timestamp": "([^"]*)"')
# One for the whole module, so that what it remembers between events is tested too.
_MESSAGES = message_logger("acqhost.message")


def _both(
    stream: io.StringIO,
    route: Any = "sale",
    tid: Any = "TERM0001",
    mti: Any = "0200",
    stan: Any = "000123",
    rc: Any = "00",
    reason: Any = None,
    latency_ms: Any = 1.25,
    **extra: Any,
) -> tuple[str, str]:
    """The line MessageLogger writes and the line structlog writes for the same event."""
    start = len(stream.getvalue())
    _MESSAGES.message(route, tid, mti, stan, rc, reason, latency_ms, dict(extra))
    middle = len(stream.getvalue())
    get_logger("acqhost.message").info(
        "message", route=route, tid=tid, mti=mti, stan=stan, rc=rc, reason=reason,
        latency_ms=latency_ms, **extra,
    )  # fmt: skip
    text = stream.getvalue()
    return text[start:middle], text[middle:]


def _same_line(fast: str, slow: str) -> dict[str, Any]:
    """Both lines are one JSON object each, equal byte for byte apart from the time; returns
    the parsed line."""
    assert fast.endswith("\n") and fast.count("\n") == 1
    assert _STAMP.sub('"timestamp": "T"', fast) == _STAMP.sub('"timestamp": "T"', slow)
    parsed_fast, parsed_slow = json.loads(fast), json.loads(slow)
    assert list(parsed_fast) == list(parsed_slow)  # same keys, same order
    del parsed_fast["timestamp"], parsed_slow["timestamp"]
    assert parsed_fast == parsed_slow
    return dict(json.loads(fast))


def _timestamp_shape(stamp: str) -> None:
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{6})?Z", stamp), stamp


@pytest.mark.parametrize(
    "event",
    [
        {},
        {"amount": 12345},
        {"amount": 12345, "test": True},
        {"amount": 999_999_999_999},  # above the fast path's range: same line via the chain
        {"rrn": "000000000042"},
        {"rc": "94", "reason": "DUPLICATE", "amount": 1},
        {"route": "undecodable", "tid": None, "stan": None, "rc": "30", "reason": "FORMAT"},
        {"route": "unknown", "mti": "0100", "rc": "12", "reason": "NO_ROUTE"},
        {"tid": "张三丰", "reason": 'quote " and \\ and \n'},
        {"latency_ms": 0.0, "note": None, "ok": False},
        {"rc": 1, "reason": 1.0},  # equal to True as dict keys, but not the same JSON
        {"rc": True, "reason": True},
    ],
)
def test_the_message_line_is_the_structlog_line(output: io.StringIO, event: dict[str, Any]) -> None:
    fast, slow = _both(output, **event)
    line = _same_line(fast, slow)
    assert line["event"] == "message"
    assert line["logger"] == "acqhost.message"
    assert line["level"] == "info"
    _timestamp_shape(line["timestamp"])
    _timestamp_shape(_STAMP.findall(slow)[0])


def test_ordinary_sales_take_the_fast_path() -> None:
    configure_logging("info", stream=io.StringIO())
    log = message_logger("acqhost.message")
    assert log.render("sale", "TERM0001", "0200", "000123", "00", None, 0.5, {"amount": 10})
    assert log.render("reversal", "TERM0001", "0400", "000124", "00", None, 0.5,
                     {"rrn": "000000000042"})  # fmt: skip
    assert log.render("sale", "TERM0001", "0200", "000125", "05", "OVER_LIMIT", 0.5, {})
    # Card data, or an unknown key, leaves it to the chain.
    assert log.render("sale", "TERM0001", "0200", "000126", "00", PAN, 0.5, {}) is None
    assert log.render("sale", "TERM0001", "0200", "000127", "00", None, 0.5, {"pan": PAN}) is None


def test_card_data_in_the_message_event_is_masked(output: io.StringIO) -> None:
    fast, slow = _both(
        output,
        tid=PAN16,
        reason=f"card {PAN} track {TRACK2}",
        stan=PAN,
        pan=PAN,
        track2=TRACK2,
        account=ACCOUNT,
        password=PASSWORD,
        field48=FIELD48,
        note=f"acct {ACCOUNT}",
        **{PAN: "as a key"},
    )
    _secrets_absent(fast)
    line = _same_line(fast, slow)
    assert line["reason"] == "card 622202*********0128 track 622202*********0128=*****"
    assert line["tid"] == "411111******1111"
    assert line["stan"] == "622202*********0128"
    assert line["pan"] == "622202*********0128"
    assert line["track2"] == line["password"] == "***"
    assert line["account"] == "6217********7890"
    assert line["622202*********0128"] == "as a key"


_ANY_TEXT = st.one_of(
    st.none(),
    st.text(max_size=30),
    st.from_regex(r"[0-9]{1,20}", fullmatch=True),
    st.sampled_from([PAN, PAN16, TRACK2, ACCOUNT, FIELD48, "PW003abc", "AC0161234", "00"]),
)
_ANY_FIELD = st.one_of(_ANY_TEXT, st.integers(), st.booleans(), st.floats())
_EXTRA_KEYS = st.sampled_from(
    ["amount", "test", "rrn", "note", "pan", "password", "account", "2", "35", PAN, "x" * 20]
)
_EXTRA_VALUES = st.one_of(
    _ANY_TEXT,
    st.integers(),
    st.floats(),
    st.booleans(),
    st.lists(st.integers(), max_size=2),
)


@given(
    route=_ANY_FIELD,
    tid=_ANY_FIELD,
    mti=_ANY_FIELD,
    stan=_ANY_FIELD,
    rc=_ANY_FIELD,
    reason=_ANY_FIELD,
    latency_ms=st.one_of(st.floats(), st.integers()),
    extra=st.dictionaries(_EXTRA_KEYS, _EXTRA_VALUES, max_size=4),
)
def test_any_message_event_is_written_as_structlog_writes_it(
    route: Any, tid: Any, mti: Any, stan: Any, rc: Any, reason: Any, latency_ms: Any,
    extra: dict[str, Any],
) -> None:  # fmt: skip
    stream = io.StringIO()
    configure_logging("info", stream=stream)
    fast, slow = _both(stream, route, tid, mti, stan, rc, reason, latency_ms, **extra)
    _same_line(fast, slow)
    for secret in (PAN, PAN16, ACCOUNT, PASSWORD, PW_HEX, "25122011234567800"):
        assert secret not in fast  # (random digits may hold shorter pieces of them)


def test_the_message_event_follows_the_configured_level_and_stream() -> None:
    quiet, loud = io.StringIO(), io.StringIO()
    log = message_logger("acqhost.message")
    configure_logging("warning", stream=quiet)
    log.message("sale", "TERM0001", "0200", "000123", "00", None, 1.0, {})
    configure_logging("info", stream=loud)
    log.message("sale", "TERM0001", "0200", "000124", "00", None, 1.0, {})
    assert quiet.getvalue() == ""
    assert [line["stan"] for line in _lines(loud)] == ["000124"]


def test_the_message_event_is_seen_by_capture_logs_and_carries_bound_context(
    output: io.StringIO,
) -> None:
    log = message_logger("acqhost.message")
    with structlog.testing.capture_logs() as captured:
        log.message("sale", "TERM0001", "0200", "000123", "00", None, 1.0, {"amount": 5})
    assert captured == [{"route": "sale", "tid": "TERM0001", "mti": "0200", "stan": "000123",
                         "rc": "00", "reason": None, "latency_ms": 1.0, "amount": 5,
                         "event": "message", "log_level": "info"}]  # fmt: skip
    assert output.getvalue() == ""
    structlog.contextvars.bind_contextvars(peer="127.0.0.1:4000", card=PAN)
    try:
        fast, slow = _both(output)
    finally:
        structlog.contextvars.clear_contextvars()
    line = _same_line(fast, slow)
    assert line["peer"] == "127.0.0.1:4000"
    assert line["card"] == "622202*********0128"
    fast, slow = _both(output)  # cleared again: back to the event's own keys
    assert "peer" not in _same_line(fast, slow)


class _CountingStream(io.StringIO):
    """Counts flushes: structlog's writer flushes every line it writes, the direct path of
    MessageLogger does not."""

    def __init__(self) -> None:
        super().__init__()
        self.flushes = 0

    def flush(self) -> None:
        self.flushes += 1
        super().flush()


def _message(stream: _CountingStream, **extra: Any) -> tuple[bool, dict[str, Any]]:
    """Log one message event; whether it was written directly, and the line."""
    flushes, start = stream.flushes, len(stream.getvalue())
    _MESSAGES.message("sale", "TERM0001", "0200", "000123", "00", None, 1.0, extra)
    return stream.flushes == flushes, json.loads(stream.getvalue()[start:])


@pytest.fixture
def counted() -> Iterator[_CountingStream]:
    stream = _CountingStream()
    configure_logging("info", stream=stream)
    yield stream
    configure_logging("info", stream=io.StringIO())


def test_bound_context_is_written_where_it_is_bound_and_only_there(
    counted: _CountingStream,
) -> None:
    def bound_here() -> tuple[bool, dict[str, Any]]:
        structlog.contextvars.bind_contextvars(peer="127.0.0.1:4000")
        return _message(counted)

    direct, line = contextvars.Context().run(bound_here)
    assert not direct
    assert line["peer"] == "127.0.0.1:4000"
    for _ in range(2):  # (the second time, in a context the logger has seen)
        direct, line = contextvars.Context().run(_message, counted)
        assert direct
        assert "peer" not in line


def test_context_bound_then_cleared_is_written_directly_until_bound_again(
    counted: _CountingStream,
) -> None:
    context = contextvars.Context()
    context.run(structlog.contextvars.bind_contextvars, peer="127.0.0.1:4000", card=PAN)
    context.run(structlog.contextvars.clear_contextvars)
    for _ in range(2):
        direct, line = context.run(_message, counted)
        assert direct
        assert "peer" not in line
    context.run(structlog.contextvars.bind_contextvars, card=PAN)
    direct, line = context.run(_message, counted)
    assert not direct
    assert line["card"] == "622202*********0128"
    assert "peer" not in line
    _secrets_absent(counted.getvalue())


def test_a_bound_value_that_equals_anything_is_still_written(counted: _CountingStream) -> None:
    context = contextvars.Context()
    context.run(structlog.contextvars.bind_contextvars, peer="127.0.0.1:4000")
    context.run(structlog.contextvars.clear_contextvars)
    context.run(_message, counted)
    context.run(structlog.contextvars.bind_contextvars, peer=mock.ANY)  # == Ellipsis, too
    direct, line = context.run(_message, counted)
    assert not direct
    assert line["peer"] == "<ANY>"


class _Incomparable:
    """A value another library might keep in a context variable: == raises."""

    def __eq__(self, other: object) -> bool:
        raise TypeError("not comparable")

    __hash__ = None  # type: ignore[assignment]


_OTHER_LIBRARY: contextvars.ContextVar[_Incomparable] = contextvars.ContextVar("other_library")


def test_other_context_variables_do_not_get_in_the_way(counted: _CountingStream) -> None:
    def each_with_its_own_value() -> list[bool]:
        written = []
        for _ in range(3):
            _OTHER_LIBRARY.set(_Incomparable())
            direct, line = _message(counted)
            assert "other_library" not in line
            written.append(direct)
        return written

    assert contextvars.Context().run(each_with_its_own_value) == [True, True, True]


@pytest.mark.parametrize(
    "ns",
    [0, 1_700_000_000_000_000_000, 1_700_000_000_000_001_999, 1_700_000_000_999_999_999,
     4_102_444_799_123_456_789],
)  # fmt: skip
def test_the_message_timestamp_is_structlogs_iso_format(ns: int) -> None:
    stamps = IsoTimestamps()
    second, micros = divmod(ns // 1000, 1_000_000)
    expected = datetime.fromtimestamp(second, UTC).replace(microsecond=micros)
    assert stamps.at(ns) == expected.isoformat().replace("+00:00", "Z")
    # The same second again: its text is remembered, the fraction is not.
    assert stamps.at(ns + 1000) == (expected + timedelta(microseconds=1)).isoformat().replace(
        "+00:00", "Z"
    )


def test_message_extras_may_not_repeat_the_events_keys(output: io.StringIO) -> None:
    log = message_logger("acqhost.message")
    for key in ("tid", "event"):
        with pytest.raises(TypeError):
            log.message("sale", "TERM0001", "0200", "000123", "00", None, 1.0, {key: "x"})


# --- the package's own shape -----------------------------------------------------------------

# Logging sits below everything that logs: it may use the card rules and the errors, no more.
_MAY_IMPORT = ("acqhost.log", "acqhost.domain.cards", "acqhost.errors")


def _log_modules() -> list[tuple[str, ast.Module]]:
    package = Path(acqhost.log.__file__).parent
    return [(path.name, ast.parse(path.read_text())) for path in sorted(package.glob("*.py"))]


def test_the_log_package_imports_only_the_card_rules_and_the_errors() -> None:
    modules = _log_modules()
    assert {name for name, _ in modules} >= {"__init__.py", "masking.py", "setup.py", "line.py"}
    for name, tree in modules:
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                imported = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                # A relative import counts from acqhost.log (level 1) upwards.
                base = ["acqhost", "log"][: 3 - node.level] if node.level else []
                imported = [".".join([*base, *([node.module] if node.module else [])])]
            else:
                continue
            for module in imported:
                if module == "acqhost" or module.startswith("acqhost."):
                    assert any(
                        module == allowed or module.startswith(allowed + ".")
                        for allowed in _MAY_IMPORT
                    ), f"{name} imports {module}"


def test_the_log_package_uses_no_other_modules_private_names() -> None:
    for name, tree in _log_modules():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                private = [alias.name for alias in node.names if _private(alias.name)]
                assert not private, f"{name} imports {private} from {node.module}"
            elif isinstance(node, ast.Attribute) and _private(node.attr):
                # Only an object's own attributes: self._x.
                assert isinstance(node.value, ast.Name) and node.value.id == "self", (
                    f"{name}:{node.lineno} reads .{node.attr}"
                )
            elif (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id in ("getattr", "hasattr", "setattr")
                and len(node.args) > 1
                and isinstance(node.args[1], ast.Constant)
            ):
                attr = str(node.args[1].value)
                assert not _private(attr), f"{name}:{node.lineno} reads {attr} by name"


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def test_each_log_module_stays_small() -> None:
    package = Path(acqhost.log.__file__).parent
    for path in package.glob("*.py"):
        assert len(path.read_text().splitlines()) <= 500, path.name
