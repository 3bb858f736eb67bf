"""TLS for terminal connections ([tls]) on loopback, with certificates made by trustme: the
host on asyncio and uvloop (the loop's TLS, started per connection) and on trio (anyio's
TLSStream) serves TLS terminals, drops a client that does not speak TLS without disturbing the
others, asks for client certificates with ``client_ca``; acqhost-terminal and acqhost-load
connect with ``--tls-ca``."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest
import trustme

from acqhost.config import load_config
from acqhost.config_ops import TlsConfig
from simulators.processes import free_port, wait_listening
from simulators.terminal import TerminalError, tls_client_context
from simulators.terminal import main as terminal_main
from tests.hostkit import HostSetup, make_host, running
from tests.loadkit import make_store, run_load
from tests.test_crash import ROOT

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["asyncio", "uvloop", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> Any:
    if request.param == "uvloop":  # TLS on asyncio is the loop's own: uvloop's differs
        return ("asyncio", {"use_uvloop": True})
    return request.param


@dataclasses.dataclass
class Pki:
    ca: str  # the CA that signs the host's certificate (PEM)
    cert: str
    key: str
    client_ca: str  # the CA that signs terminals' certificates
    client_cert: str
    client_key: str


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    host_ca, terminal_ca = trustme.CA(), trustme.CA()
    server = host_ca.issue_cert("127.0.0.1", "localhost")
    client = terminal_ca.issue_cert("TERM0001")
    paths = {name: str(tmp_path / f"{name}.pem") for name in
             ("ca", "cert", "key", "client_ca", "client_cert", "client_key")}  # fmt: skip
    host_ca.cert_pem.write_to_path(paths["ca"])
    server.cert_chain_pems[0].write_to_path(paths["cert"])
    server.private_key_pem.write_to_path(paths["key"])
    terminal_ca.cert_pem.write_to_path(paths["client_ca"])
    client.cert_chain_pems[0].write_to_path(paths["client_cert"])
    client.private_key_pem.write_to_path(paths["client_key"])
    return Pki(**paths)


def tls_host(tmp_path: Path, pki: Pki, *, client_ca: str = "") -> HostSetup:
    setup = make_host(tmp_path)
    tls = TlsConfig(pki.cert, pki.key, client_ca)
    setup.config = dataclasses.replace(setup.config, tls=tls)
    return setup


async def test_terminals_sign_on_and_sell_over_tls(tmp_path: Path, pki: Pki) -> None:
    setup = tls_host(tmp_path, pki)
    async with running(setup) as server:
        assert server.tls is not None
        client = setup.client(tls=tls_client_context(pki.ca))
        async with client:
            assert (await client.sign_on()).rc == "00"
            sale = await client.sale(100)
            assert sale.rc == "00"
        store = server.core.state.store
        assert [s.rrn for s in store.sales("TERM0001")] == [sale.response["37"]]


async def test_a_client_without_tls_is_dropped_and_tls_clients_are_still_served(
    tmp_path: Path, pki: Pki
) -> None:
    setup = tls_host(tmp_path, pki)
    async with running(setup):
        plain = setup.client()
        await plain.connect()
        with pytest.raises((TerminalError, anyio.BrokenResourceError, OSError)):
            plain.timeout = 5
            await plain.sign_on()
        await plain.close()
        untrusting = setup.client(tls=tls_client_context(pki.client_ca))  # not the host's CA
        with pytest.raises(OSError):  # ssl.SSLCertVerificationError
            await untrusting.connect()
        client = setup.client(tls=tls_client_context(pki.ca))
        async with client:
            assert (await client.sign_on()).rc == "00"


async def test_client_ca_requires_a_client_certificate_it_signed(tmp_path: Path, pki: Pki) -> None:
    setup = tls_host(tmp_path, pki, client_ca=pki.client_ca)
    async with running(setup):
        anonymous = setup.client(tls=tls_client_context(pki.ca), timeout=5)
        with pytest.raises((TerminalError, anyio.BrokenResourceError, OSError)):
            await anonymous.connect()  # TLS 1.3: the refusal may come with the first read
            await anonymous.sign_on()
        await anonymous.close()
        context = tls_client_context(pki.ca, pki.client_cert, pki.client_key)
        async with setup.client(tls=context) as client:
            assert (await client.sign_on()).rc == "00"
            assert (await client.sale(100)).rc == "00"


def test_tls_files_that_cannot_be_used_are_one_line_config_errors(tmp_path: Path, pki: Pki) -> None:
    config = tmp_path / "acqhost.toml"
    cases = {
        f'[tls]\ncert = "{pki.cert}"\n': "[tls] needs key",
        f'[tls]\ncert = "{tmp_path}/none.pem"\nkey = "{pki.key}"\n': "No such file",
        f'[tls]\ncert = "{pki.ca}"\nkey = "{pki.key}"\n': "cannot load",  # key of another cert
        f'[tls]\ncert = "{pki.cert}"\nkey = "{pki.key}"\nclient_ca = "{pki.key}"\n': "client_ca",
        f'[tls]\ncert = "{pki.cert}"\nkey = "{pki.key}"\nca = "x"\n': "unknown setting [tls] ca",
    }
    for text, message in cases.items():
        config.write_text(text)
        result = subprocess.run(
            [sys.executable, "-m", "acqhost", "serve", "--config", str(config),
             "--db", str(tmp_path / "a.db")],
            capture_output=True, text=True, timeout=30, cwd=ROOT,
        )  # fmt: skip
        assert result.returncode == 2, (text, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert message in result.stderr, (text, result.stderr)
    config.write_text(f'[tls]\ncert = "{pki.cert}"\nkey = "{pki.key}"\n')
    assert load_config(config, {}, environ={}).tls == TlsConfig(pki.cert, pki.key)


def test_acqhost_terminal_and_acqhost_load_connect_with_tls_ca(tmp_path: Path, pki: Pki) -> None:
    db, keys_dir = make_store(tmp_path, 2)
    port = free_port()
    config = tmp_path / "acqhost.toml"
    config.write_text(f'[tls]\ncert = "{pki.cert}"\nkey = "{pki.key}"\n')
    log = tmp_path / "host.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "acqhost", "serve", "--config", str(config), "--db", db,
         "--port", str(port)],
        stdout=log.open("wb"), stderr=subprocess.STDOUT, cwd=ROOT,
    )  # fmt: skip
    try:
        wait_listening(port, proc)
        key_file = str(sorted(keys_dir.glob("*.json"))[0])
        data = json.loads(Path(key_file).read_text())
        data["port"] = port
        Path(key_file).write_text(json.dumps(data))
        assert terminal_main(["--key-file", key_file, "--tls-ca", pki.ca, "sale", "100"]) == 0
        assert terminal_main(["--key-file", key_file, "echo"]) == 2  # plain TCP: no answer
        status, report = run_load(["run", "--port", str(port), "--keys-dir", str(keys_dir),
                                   "--quiet", "--tls-ca", pki.ca, "--count", "40"])  # fmt: skip
        assert status == 0, report
        assert report["answered"] == 40 and set(report["by_rc"]) == {"00"}
        status, _ = run_load(["run", "--port", str(port), "--keys-dir", str(keys_dir),
                              "--quiet", "--tls-ca", str(tmp_path / "none.pem")])  # fmt: skip
        assert status == 2
    finally:
        proc.terminate()
        assert proc.wait(15) == 0, log.read_text()
