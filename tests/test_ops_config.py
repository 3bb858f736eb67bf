"""The [metrics] table: off by default, checked whole when the configuration is loaded (one
line naming the setting, exit 2 from ``acqhost serve``), a port for each worker; a metrics port
already taken is one line too. ([tls] files: tests/test_tls.py.)"""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from acqhost.config import Config, ConfigError, load_config
from acqhost.config_ops import MetricsConfig
from tests.test_crash import ROOT


def loaded(tmp_path: Path, text: str, **overrides: object) -> Config:
    path = tmp_path / "acqhost.toml"
    path.write_text(text)
    return load_config(path, overrides, environ={})


def test_metrics_are_off_unless_the_table_is_given(tmp_path: Path) -> None:
    assert Config().metrics is None
    assert loaded(tmp_path, "[host]\nport = 9000\n").metrics is None
    assert loaded(tmp_path, "[metrics]\nport = 9100\n").metrics == MetricsConfig(9100)
    cfg = loaded(tmp_path, '[metrics]\nport = 9100\nhost = "0.0.0.0"\n')
    assert cfg.metrics == MetricsConfig(9100, "0.0.0.0")


def test_each_worker_has_a_metrics_port_of_its_own() -> None:
    assert [MetricsConfig(9100).for_worker(i).port for i in range(3)] == [9100, 9101, 9102]
    assert MetricsConfig(0).for_worker(2).port == 0  # any free port, each its own


@pytest.mark.parametrize(
    ("text", "overrides", "message"),
    [
        ("[metrics]\n", {}, "[metrics] needs port"),
        ("[metrics]\nport = 70000\n", {}, "[metrics] port must be a whole number from 0 to 65535"),
        ('[metrics]\nport = "x"\n', {}, "[metrics] port must be a whole number"),
        ("[metrics]\nport = true\n", {}, "[metrics] port must be a whole number"),
        ('[metrics]\nport = 9100\nhost = ""\n', {}, "[metrics] host must be a non-empty"),
        ("[metrics]\nport = 9100\npath = 1\n", {}, "unknown setting [metrics] path; known"),
        ("metrics = 9100\n", {}, "metrics must be a table ([metrics])"),
        ("[metrics]\nport = 9000\n", {"port": 9000}, "takes the terminals' port 9000"),
        ("[metrics]\nport = 8999\n", {"port": 9000, "workers": 2}, "up to 9000"),
        ("[metrics]\nport = 65535\n", {"workers": 2}, "passes 65535"),
    ],
)
def test_bad_metrics_settings_are_one_line_naming_them(
    tmp_path: Path, text: str, overrides: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        loaded(tmp_path, text, **overrides)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)
    assert str(caught.value).startswith(str(tmp_path)) or "[metrics] port" in str(caught.value)


def test_the_same_port_on_another_address_is_allowed(tmp_path: Path) -> None:
    cfg = loaded(tmp_path, '[metrics]\nport = 9000\nhost = "127.0.0.2"\n', port=9000)
    assert cfg.metrics == MetricsConfig(9000, "127.0.0.2")


def serve(tmp_path: Path, config: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "acqhost.toml"
    path.write_text(config)
    return subprocess.run(
        [sys.executable, "-m", "acqhost", "serve", "--config", str(path),
         "--db", str(tmp_path / "a.db"), "--port", "0"],
        capture_output=True, text=True, timeout=30, cwd=ROOT,
    )  # fmt: skip


def test_acqhost_serve_with_a_bad_metrics_table_exits_2_with_one_line(tmp_path: Path) -> None:
    result = serve(tmp_path, "[metrics]\nport = -1\n")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"acqhost: {tmp_path / 'acqhost.toml'}: [metrics] port must be a whole number from 0 "
        "to 65535, not -1"
    ]


def test_a_metrics_port_in_use_exits_2_with_one_line(tmp_path: Path) -> None:
    from acqhost.cli import main

    assert main(["init", "--db", str(tmp_path / "a.db")]) == 0
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = serve(tmp_path, f"[metrics]\nport = {port}\n")
    assert result.returncode == 2, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert f"[metrics] cannot listen on 127.0.0.1:{port}" in last
