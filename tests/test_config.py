"""The configuration: defaults < TOML file < environment < flags, and every setting checked
where it is given, a bad one named in one line with its source, its value and what is allowed."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import tomllib
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest

from acqhost.cli import main as cli
from acqhost.config import (
    FRAME_SIZES,
    LOG_LEVELS,
    Config,
    ConfigError,
    RebindPolicy,
    load_config,
)
from acqhost.log import configure_logging
from acqhost.wire import specs
from acqhost.wire.framing import FRAMINGS, FrameDecoder

ROOT = Path(__file__).resolve().parents[1]


def toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "acqhost.toml"
    path.write_text(text, encoding="utf-8")
    return path


def refused(path: Path | None, overrides: dict[str, Any] | None = None, **env: str) -> str:
    """The one-line message of the ConfigError that loading this configuration raises."""
    with pytest.raises(ConfigError) as exc:
        load_config(path, overrides, environ=env)
    message = str(exc.value)
    assert "\n" not in message
    return message


# -- precedence and defaults ---------------------------------------------------------------------


def test_config_precedence_file_then_environment_then_flags(tmp_path: Path) -> None:
    path = toml(tmp_path, '[host]\nport = 9001\nframing = "len4"\nread_timeout = 5\n'
                          '[rebind]\nreview = "auto"\ncooling_off = 60\n')  # fmt: skip
    cfg = load_config(path, {}, environ={})
    assert (cfg.port, cfg.framing, cfg.read_timeout) == (9001, "len4", 5.0)
    assert cfg.rebind == RebindPolicy(review="auto", cooling_off=60.0)
    cfg = load_config(path, {}, environ={"ACQHOST_PORT": "9002"})
    assert cfg.port == 9002
    cfg = load_config(path, {"port": 9003, "framing": None}, environ={"ACQHOST_PORT": "9002"})
    assert (cfg.port, cfg.framing) == (9003, "len4")


def test_no_file_and_no_environment_give_the_defaults() -> None:
    assert load_config(None, {}, environ={}) == Config()
    assert Config().validate() == Config()


# A valid value other than the default for every [host] setting, as the environment gives it
# (capture, which needs one worker, in tests/test_capture.py).
OTHER = {
    "host": "0.0.0.0", "port": "9000", "framing": "len4", "spec": "cup-pos", "max_frame": "2048",
    "read_timeout": "2.5", "max_connections": "10", "backend": "trio", "workers": "2",
    "db": "other.db", "keys": "other.keys", "log_level": "WARNING", "test_limit": "0",
    "default_sale_limit": "5000", "write_batch": "64", "signon_skew": "60",
    "frame_timeout": "4", "first_frame_timeout": "1.5", "max_connections_per_source": "3",
    "log_rate": "5",
}  # fmt: skip


def test_every_host_setting_is_taken_from_the_environment() -> None:
    tables = {"rebind", "banks", "metrics", "tls"}  # [metrics] and [tls]: tests/test_ops_config.py
    assert set(OTHER) == {f.name for f in fields(Config)} - tables - {"capture"}
    env = {f"ACQHOST_{name.upper()}": value for name, value in OTHER.items()}
    cfg = load_config(None, {}, environ=env)
    for name, value in OTHER.items():
        assert str(getattr(cfg, name)) in (value, value.lower(), f"{value}.0"), name
    assert cfg.log_level == "warning"  # any case, kept in lower case


def test_other_acqhost_variables_are_not_settings() -> None:
    assert load_config(None, {}, environ={"ACQHOST_TEST_PG": "postgresql:///x"}) == Config()


def test_a_number_may_be_given_as_text_in_the_file(tmp_path: Path) -> None:
    cfg = load_config(toml(tmp_path, "[host]\nport = '9000'\nread_timeout = 3\n"), environ={})
    assert (cfg.port, cfg.read_timeout) == (9000, 3.0)


def test_key_file_defaults_beside_sqlite_and_in_the_working_directory_for_urls() -> None:
    assert str(load_config(None, {"db": "x/acq.db"}, environ={}).key_path) == "x/acq.db.keys"
    assert str(load_config(None, {"db": "postgresql:///a"}, environ={}).key_path) == "acqhost.keys"


# -- every setting's bad values, from the file ---------------------------------------------------

WHOLE_PORT = "a whole number from 0 to 65535"
SECONDS = "a number of seconds above 0"
HOST_CASES = [
    ("host", '""', "a non-empty host name or address"),
    ("host", "1", "a non-empty host name or address"),
    ("port", "70000", WHOLE_PORT),
    ("port", "-1", WHOLE_PORT),
    ("port", "'x'", WHOLE_PORT),
    ("port", "80.5", WHOLE_PORT),
    ("port", "true", WHOLE_PORT),
    ("framing", "'tcp'", "one of len2, len4 or len2-tpdu"),
    ("spec", "'iso93'", f"one of {', '.join(specs.available()[:-1])} or {specs.available()[-1]}"),
    ("max_frame", "0", "a whole number from 1 to 65535"),
    ("max_frame", "70000", "a whole number from 1 to 65535"),
    ("read_timeout", "0", SECONDS),
    ("read_timeout", "-1.5", SECONDS),
    ("read_timeout", "nan", SECONDS),
    ("read_timeout", "inf", SECONDS),
    ("read_timeout", "'soon'", SECONDS),
    ("max_connections", "0", "a whole number of at least 1"),
    ("frame_timeout", "0", SECONDS),
    ("first_frame_timeout", "inf", SECONDS),
    ("max_connections_per_source", "0", "a whole number of at least 1"),
    ("log_rate", "0.5", "a number of records a second, 0 (no limit) or at least 1"),
    ("log_rate", "-1", "a number of records a second, 0 (no limit) or at least 1"),
    ("backend", "'gevent'", "one of asyncio or trio"),
    ("workers", "0", "a whole number of at least 1"),
    ("workers", "1.0", "a whole number of at least 1"),
    ("db", "''", "a non-empty SQLite path or database URL"),
    ("keys", "5", "a file path (empty for the default)"),
    ("log_level", "'verbose'", "one of debug, info, warning, warn, error or critical"),
    ("test_limit", "-1", "a whole number from 0 to 999999999999"),
    ("test_limit", "1000000000000", "a whole number from 0 to 999999999999"),
    ("default_sale_limit", "0", "a whole number from 1 to 999999999999"),
    ("write_batch", "0", "a whole number of at least 1"),
    ("write_batch", "[1]", "a whole number of at least 1"),
    ("signon_skew", "0", "a whole number from 1 to 86400"),
    ("signon_skew", "86401", "a whole number from 1 to 86400"),
    ("signon_skew", "2.5", "a whole number from 1 to 86400"),
    ("signon_skew", "'soon'", "a whole number from 1 to 86400"),
]


@pytest.mark.parametrize(("name", "literal", "allowed"), HOST_CASES)
def test_a_bad_host_setting_in_the_file_names_the_setting_its_value_and_what_is_allowed(
    tmp_path: Path, name: str, literal: str, allowed: str
) -> None:
    path = toml(tmp_path, f"[host]\n{name} = {literal}\n")
    value = tomllib.loads(f"v = {literal}")["v"]
    assert refused(path) == f"{path}: [host] {name} must be {allowed}, not {value!r}"


REBIND_CASES = [
    ("review", "'sometimes'", "one of manual or auto"),
    ("review", "1", "one of manual or auto"),
    ("cooling_off", "-1", "a number of seconds, 0 or more"),
    ("min_interval", "'soon'", "a number of seconds, 0 or more"),
    ("operator_max_failures", "0", "a whole number of at least 1"),
    ("operator_max_failures", "2.5", "a whole number of at least 1"),
]


@pytest.mark.parametrize(("name", "literal", "allowed"), REBIND_CASES)
def test_a_bad_rebind_setting_in_the_file_is_named_with_its_table(
    tmp_path: Path, name: str, literal: str, allowed: str
) -> None:
    path = toml(tmp_path, f"[rebind]\n{name} = {literal}\n")
    value = tomllib.loads(f"v = {literal}")["v"]
    assert refused(path) == f"{path}: [rebind] {name} must be {allowed}, not {value!r}"


def test_a_policy_made_in_code_is_checked_too() -> None:
    with pytest.raises(ConfigError, match=r"^\[rebind\] review must be one of manual or auto"):
        Config(rebind=RebindPolicy(review="never")).validate()
    with pytest.raises(ConfigError, match=r"^port must be a whole number from 0 to 65535, not -1"):
        Config(port=-1).validate()


# -- unknown settings and tables, unreadable files -----------------------------------------------


TABLES_SAID = "[host], [rebind], [[banks]], [metrics] and [tls]"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[host]\nportt = 1\n", "unknown setting [host] portt; known: host, port, framing, "),
        ("[rebind]\nreveiw = 'auto'\n", "unknown setting [rebind] reveiw; known: review, "),
        ("[bank]\nhost = 'x'\n", f"unknown table [bank] (settings go in {TABLES_SAID})"),
        ("port = 9000\n", f"unknown setting port (settings go in {TABLES_SAID})"),
        ("host = 'x'\n", "host must be a table ([host]), not 'x'"),
        ("rebind = 1\n", "rebind must be a table ([rebind]), not 1"),
        ("[host.tls]\ncert = 'x'\n", "unknown setting [host] tls; known: "),
        ("[host\n", ""),
    ],
)
def test_unknown_settings_and_tables_are_refused(tmp_path: Path, text: str, message: str) -> None:
    path = toml(tmp_path, text)
    assert refused(path).startswith(f"{path}: {message}")


def test_a_missing_or_unreadable_file_is_refused(tmp_path: Path) -> None:
    assert refused(tmp_path / "none.toml") == f"config file not found: {tmp_path / 'none.toml'}"
    assert refused(tmp_path).startswith(f"cannot read config file {tmp_path}: ")
    path = tmp_path / "latin1.toml"
    path.write_bytes(b"[host]\nhost = '\xe9'\n")
    assert refused(path).startswith(f"{path}: not UTF-8 text")


# -- the environment and the flags ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("variable", "value", "allowed"),
    [
        ("ACQHOST_PORT", "99999", WHOLE_PORT),
        ("ACQHOST_PORT", "", WHOLE_PORT),
        ("ACQHOST_LOG_LEVEL", "loud", "one of debug, info, warning, warn, error or critical"),
        ("ACQHOST_SPEC", "acq93", "one of "),
        ("ACQHOST_READ_TIMEOUT", "0", SECONDS),
        ("ACQHOST_WORKERS", "two", "a whole number of at least 1"),
        ("ACQHOST_DB", " ", "a non-empty SQLite path or database URL"),
        ("ACQHOST_SIGNON_SKEW", "-5", "a whole number from 1 to 86400"),
    ],
)
def test_a_bad_environment_variable_is_named(variable: str, value: str, allowed: str) -> None:
    message = refused(None, {}, **{variable: value})
    assert message.startswith(f"environment variable {variable} must be {allowed}")
    assert message.endswith(f", not {value!r}")


def test_the_environment_is_checked_even_when_a_flag_overrides_it() -> None:
    message = refused(None, {"port": 9000}, ACQHOST_PORT="x")
    assert message.startswith("environment variable ACQHOST_PORT must be")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"port": 70000}, f"option --port must be {WHOLE_PORT}, not 70000"),
        ({"read_timeout": -1.0}, f"option --read-timeout must be {SECONDS}, not -1.0"),
        ({"max_connections": 0}, "option --max-connections must be a whole number of at least 1"),
        ({"framing": "len3"}, "option --framing must be one of len2, len4 or len2-tpdu"),
        ({"backend": "curio"}, "option --backend must be one of asyncio or trio, not 'curio'"),
        ({"log_level": "LOUD"}, "option --log-level must be one of debug, "),
        ({"db": ""}, "option --db must be a non-empty SQLite path or database URL, not ''"),
        ({"signon_skew": 0}, "option --signon-skew must be a whole number from 1 to 86400, not 0"),
    ],
)
def test_a_bad_flag_is_named_as_typed(overrides: dict[str, Any], message: str) -> None:
    assert refused(None, overrides).startswith(message)


def test_the_largest_frame_must_fit_the_framing_wherever_each_came_from(tmp_path: Path) -> None:
    path = toml(tmp_path, "[host]\nframing = 'len4'\n")
    assert refused(path, {"max_frame": 10000}) == (
        "option --max-frame must be a whole number from 1 to 9999 with framing len4 "
        f"({path}: [host] framing), not 10000"
    )
    assert refused(None, {"max_frame": 5}, ACQHOST_FRAMING="len2-tpdu") == (
        "option --max-frame must be a whole number from 6 to 65535 with framing len2-tpdu "
        "(environment variable ACQHOST_FRAMING), not 5"
    )
    assert load_config(path, {"max_frame": 9999}, environ={}).max_frame == 9999


# -- the rules agree with what they protect ------------------------------------------------------


def test_the_log_levels_are_the_ones_logging_accepts(json_logs: io.StringIO) -> None:
    for level in LOG_LEVELS:
        configure_logging(level.upper(), json_logs)
    with pytest.raises(ValueError):
        configure_logging("verbose", json_logs)


def test_the_frame_sizes_are_the_ones_the_framings_can_express() -> None:
    assert set(FRAME_SIZES) == set(FRAMINGS)
    for framing, (low, high) in FRAME_SIZES.items():
        FrameDecoder(framing, low)
        FrameDecoder(framing, high)
        for size in (low - 1, high + 1):
            with pytest.raises(ValueError):
                FrameDecoder(framing, size)


# -- the command line ----------------------------------------------------------------------------


def test_the_cli_prints_a_bad_setting_in_one_line_and_exits_2(tmp_path: Path) -> None:
    path = toml(tmp_path, "[host]\nlog_level = 'loud'\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACQHOST_")}
    result = subprocess.run(
        [sys.executable, "-m", "acqhost", "terminal", "list", "--config", str(path),
         "--db", str(tmp_path / "acqhost.db")],
        cwd=ROOT, capture_output=True, text=True, env=env,
    )  # fmt: skip
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == (
        f"acqhost: {path}: [host] log_level must be one of debug, info, warning, warn, error "
        "or critical, not 'loud'\n"
    )
    env["ACQHOST_PORT"] = "65536"
    result = subprocess.run(
        [sys.executable, "-m", "acqhost", "serve", "--db", str(tmp_path / "acqhost.db")],
        cwd=ROOT, capture_output=True, text=True, env=env,
    )  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert re.fullmatch(
        r"acqhost: environment variable ACQHOST_PORT must be a whole number from 0 to 65535, "
        r"not '65536'\n",
        result.stderr,
    )


def test_a_bad_flag_is_a_user_error_in_process(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli(["serve", "--db", str(tmp_path / "x.db"), "--workers", "0"]) == 2
    err = capsys.readouterr().err
    assert err == "acqhost: option --workers must be a whole number of at least 1, not 0\n"


# -- [[banks]] -----------------------------------------------------------------------------------

BANK = '[[banks]]\nname = "icbc"\nport = 9100\nbank_codes = ["102100099996"]\n'


def test_banks_are_read_with_their_defaults_and_take_advices_by_bank_code_or_terminal(
    tmp_path: Path,
) -> None:
    ccb = (
        '[[banks]]\nname = "ccb"\nhost = "localhost"\nport = 9101\nterminals = ["TERM0001"]\n'
        'final_codes = ["14", "25"]\nmax_age = 600\n[banks.tls]\nca_file = "ca.pem"\n'
        'cert_file = "host.pem"\nkey_file = "host.key"\n'
    )
    path = toml(tmp_path, BANK + ccb)
    icbc, ccb = load_config(path, {}, environ={}).banks
    assert (icbc.name, icbc.host, icbc.port, icbc.framing, icbc.spec) == (
        "icbc", "127.0.0.1", 9100, "len2", "acq87")  # fmt: skip
    assert not icbc.tls and icbc.final_codes == () and icbc.retry_initial < icbc.retry_max
    assert icbc.takes("TERM0009", "102100099996") and not icbc.takes("TERM0001", "103100000026")
    assert ccb.tls and (ccb.tls_ca_file, ccb.tls_cert_file, ccb.tls_key_file) == (
        "ca.pem", "host.pem", "host.key")  # fmt: skip
    assert ccb.takes("TERM0001", "103100000026") and ccb.final_codes == ("14", "25")
    assert ccb.max_age == 600.0
    assert load_config(None, {}, environ={}).banks == ()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[[banks]]\nname = "x"\nbank_codes = ["102100099996"]\n', "#1 needs port"),
        ('[[banks]]\nport = 9100\nbank_codes = ["102100099996"]\n', "#1 needs name"),
        ('[[banks]]\nname = "x"\nport = 9100\n', "#1 takes no advice"),
        (BANK + 'colour = "red"\n', "unknown setting [[banks]] #1 colour"),
        (BANK.replace('"102100099996"', '"1021"'), "bank_codes must be a list of 12-digit"),
        (BANK + 'terminals = "TERM0001"\n', "terminals must be a list of terminal ids"),
        (BANK + 'final_codes = ["00"]\n', "final_codes must be a list of 2-character"),
        (BANK.replace("9100", "70000"), "port must be a whole number from 1 to 65535"),
        (BANK + 'framing = "len3"\n', "framing must be one of"),
        (BANK + "retry_initial = 90\n", "retry_initial must not exceed retry_max"),
        (BANK + "max_age = 0\n", "max_age must be a number of seconds above 0"),
        (BANK + '[banks.tls]\ncert_file = "c.pem"\n', "tls needs ca_file"),
        (BANK + '[banks.tls]\nca_file = "ca.pem"\ncert_file = "c.pem"\n', "go together"),
        (BANK + BANK.replace("9100", "9200"), "name 'icbc' is given to two banks"),
        (BANK + BANK.replace('"icbc"', '"abc"'), "'102100099996' is taken by 'icbc' and 'abc'"),
        ('[banks]\nname = "x"\n', "banks must be an array of tables"),
    ],
)
def test_a_bad_bank_is_one_line_naming_it(tmp_path: Path, text: str, message: str) -> None:
    assert message in refused(toml(tmp_path, text))
