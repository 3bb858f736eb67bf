"""The operations tables of the configuration file: ``[metrics]`` and ``[tls]``.

``[metrics]`` turns on the HTTP endpoint for Prometheus and the health checks (off when the
table is absent); ``[tls]`` makes the terminals' listener speak TLS. Both are checked whole when
the configuration is loaded (:func:`acqhost.config.load_config`): a bad value, an unknown
setting, a certificate or key that cannot be read or do not belong together is a
``ValueError`` whose one line names the setting, which the loader turns into its
``ConfigError``.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ("OPS_TABLES", "MetricsConfig", "TlsConfig", "check_metrics", "ops_tables")

OPS_TABLES = ("metrics", "tls")


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    """The ``[metrics]`` table: where the HTTP endpoint for ``/metrics``, ``/healthz`` and
    ``/readyz`` listens. With ``workers = N``, worker ``i`` listens on ``port + i`` (each
    process exports its own figures); port 0 takes any free port (tests)."""

    port: int
    host: str = "127.0.0.1"

    def for_worker(self, index: int) -> MetricsConfig:
        """The table as worker ``index`` (from 0) uses it."""
        return MetricsConfig(self.port + index if self.port else 0, self.host)


@dataclass(frozen=True, slots=True)
class TlsConfig:
    """The ``[tls]`` table: the terminals' listener speaks TLS with this certificate chain and
    key (PEM files); with ``client_ca``, a terminal must present a certificate it signs."""

    cert: str
    key: str
    client_ca: str = ""

    def server_context(self) -> ssl.SSLContext:
        """The listener's TLS context; ValueError naming the file that cannot be used."""
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            context.load_cert_chain(self.cert, self.key)
        except (OSError, ssl.SSLError) as e:
            raise ValueError(f"[tls] cert and key: cannot load {self.cert} with "
                             f"{self.key}: {_why(e)}") from None  # fmt: skip
        if self.client_ca:
            try:
                context.load_verify_locations(cafile=self.client_ca)
            except (OSError, ssl.SSLError) as e:
                why = _why(e)
                raise ValueError(f"[tls] client_ca: cannot load {self.client_ca}: {why}") from None
            context.verify_mode = ssl.CERT_REQUIRED
        return context


def _why(error: OSError | ssl.SSLError) -> str:
    if isinstance(error, ssl.SSLError):
        return str(error.reason or error)
    return error.strerror or str(error)


def _port(value: object, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 65535:
        raise ValueError(f"{where} must be a whole number from 0 to 65535, not {value!r}")
    return value


def _text(value: object, where: str, what: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{where} must be {what}, not {value!r}")
    return value


def _settings(table: object, file: str, name: str, known: tuple[str, ...]) -> Mapping[str, object]:
    if not isinstance(table, Mapping):
        raise ValueError(f"{file}: {name} must be a table ([{name}]), not {table!r}")
    for setting in table:
        if setting not in known:
            raise ValueError(
                f"{file}: unknown setting [{name}] {setting}; known: {', '.join(known)}"
            )
    return table


def _metrics(table: object, file: str) -> MetricsConfig:
    values = _settings(table, file, "metrics", ("port", "host"))
    if "port" not in values:
        raise ValueError(f"{file}: [metrics] needs port (a whole number from 0 to 65535)")
    port = _port(values["port"], f"{file}: [metrics] port")
    host = _text(values.get("host", "127.0.0.1"), f"{file}: [metrics] host",
                 "a non-empty host name or address")  # fmt: skip
    return MetricsConfig(port, host)


def _tls(table: object, file: str) -> TlsConfig:
    values = _settings(table, file, "tls", ("cert", "key", "client_ca"))
    for required in ("cert", "key"):
        if required not in values:
            raise ValueError(f"{file}: [tls] needs {required} (a PEM file path)")
    paths = {name: _text(value, f"{file}: [tls] {name}", "a PEM file path")
             for name, value in values.items()}  # fmt: skip
    tls = TlsConfig(**paths)
    try:
        tls.server_context()  # the files are read now, not when the first terminal connects
    except ValueError as e:
        raise ValueError(f"{file}: {e}") from None
    return tls


def ops_tables(data: Mapping[str, object], file: str) -> dict[str, object]:
    """The ``metrics`` and ``tls`` settings of a configuration file's ``data`` (absent tables
    are left out: metrics off, no TLS); ValueError naming what cannot be used."""
    out: dict[str, object] = {}
    if "metrics" in data:
        out["metrics"] = _metrics(data["metrics"], file)
    if "tls" in data:
        out["tls"] = _tls(data["tls"], file)
    return out


def check_metrics(metrics: MetricsConfig | None, host: str, port: int, workers: int) -> None:
    """ValueError when the metrics ports (one a worker) are out of range or take the
    terminals' port."""
    if metrics is None or metrics.port == 0:
        return
    last = metrics.port + workers - 1
    if last > 65535:
        raise ValueError(f"[metrics] port {metrics.port} + {workers} workers passes 65535")
    wildcards = ("0.0.0.0", "::", "")
    shared = metrics.host == host or metrics.host in wildcards or host in wildcards
    if shared and metrics.port <= port <= last:
        raise ValueError(f"[metrics] port {metrics.port} (with {workers} workers up to {last}) "
                         f"takes the terminals' port {port}")  # fmt: skip
