"""A test PKI made with the `openssl` command line: a CA, a server and a client certificate it signs,
and a second, untrusted CA with a client certificate of its own.

The server certificate names 127.0.0.1 and localhost (subjectAltName), so a client that checks the
host name against it (Python's ssl, dcmtk) accepts it on loopback. Keys are RSA 2048 (what dcmtk's
default BCP 195 profile and Python's ssl both negotiate, with ECDHE and AES-GCM).
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from harness.dcmtk import StoreSCP, dcmtk_env
from harness.system import StartError, free_port, log_tail, system_tool


@dataclass(frozen=True)
class TestPki:
    """PEM files of a throw-away PKI (keys unencrypted)."""

    __test__ = False  # not a pytest test class

    folder: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    untrusted_ca_cert: Path
    untrusted_client_cert: Path
    untrusted_client_key: Path


def _openssl(*args: str | Path, cwd: Path) -> None:
    res = subprocess.run([system_tool("openssl"), *map(str, args)], cwd=cwd, capture_output=True, text=True,
                         timeout=60)
    if res.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(map(str, args[:2]))} failed: {res.stderr[-1500:]}")


def _ca(folder: Path, name: str) -> tuple[Path, Path]:
    key, cert = folder / f"{name}.key", folder / f"{name}.pem"
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-sha256", "-days", "2", "-subj", f"/CN={name}",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
             "-keyout", key, "-out", cert, cwd=folder)
    return cert, key


def _leaf(folder: Path, name: str, ca_cert: Path, ca_key: Path, extensions: str) -> tuple[Path, Path]:
    key, csr, cert, ext = (folder / f"{name}.key", folder / f"{name}.csr", folder / f"{name}.pem",
                           folder / f"{name}.ext")
    ext.write_text(extensions + "\n", encoding="ascii")
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-sha256", "-subj", f"/CN={name}", "-keyout", key, "-out", csr,
             cwd=folder)
    _openssl("x509", "-req", "-in", csr, "-CA", ca_cert, "-CAkey", ca_key, "-CAcreateserial", "-sha256",
             "-days", "2", "-extfile", ext, "-out", cert, cwd=folder)
    return cert, key


def make_test_pki(folder: Path) -> TestPki:
    """Create the PKI under `folder` (created); ToolMissing when openssl is not installed."""
    folder.mkdir(parents=True, exist_ok=True)
    ca_cert, ca_key = _ca(folder, "dxgate-test-ca")
    server_cert, server_key = _leaf(
        folder, "server", ca_cert, ca_key,
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth,clientAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost")
    client_ext = ("basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
                  "extendedKeyUsage=clientAuth")
    client_cert, client_key = _leaf(folder, "client", ca_cert, ca_key, client_ext)
    other_cert, other_key = _ca(folder, "untrusted-ca")
    bad_cert, bad_key = _leaf(folder, "untrusted-client", other_cert, other_key, client_ext)
    return TestPki(folder, ca_cert, ca_key, server_cert, server_key, client_cert, client_key,
                   other_cert, bad_cert, bad_key)


def tls_args(key: Path, cert: Path, ca: Path | None) -> list[str]:
    """dcmtk's TLS options: present `cert` (with `key`), trust `ca` (`+cf`)."""
    return ["+tls", str(key), str(cert), *(["+cf", str(ca)] if ca is not None else [])]


def run_tls_echoscu(port: int, called_ae: str, key: Path, cert: Path, ca: Path | None,
                    calling_ae: str = "ECHOSCU", timeout_s: float = 5.0) -> subprocess.CompletedProcess[str]:
    """C-ECHO over TLS with dcmtk echoscu (it verifies the server against `ca`); never raises."""
    t = str(max(1, int(timeout_s)))
    return subprocess.run([system_tool("echoscu"), "-to", t, "-ta", t, "-td", t, *tls_args(key, cert, ca),
                           "-aet", calling_ae, "-aec", called_ae, "127.0.0.1", str(port)],
                          capture_output=True, text=True, env=dcmtk_env(), timeout=timeout_s + 10)


def start_tls_storescp(out_dir: Path, pki: TestPki, ae_title: str = "STORESCP",
                       extra: Sequence[str] = (), timeout_s: float = 20.0) -> StoreSCP:
    """dcmtk storescp over TLS only (server certificate, clients verified against the test CA), ready."""
    out_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log_path = out_dir.parent / f"storescp-tls-{port}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([system_tool("storescp"), "--aetitle", ae_title, "+xa", "-od", str(out_dir),
                                 "-ta", "5", "-td", "5", *tls_args(pki.server_key, pki.server_cert, pki.ca_cert),
                                 *extra, str(port)], stdout=log, stderr=subprocess.STDOUT, env=dcmtk_env())
    scp = StoreSCP(port=port, ae_title=ae_title, out_dir=out_dir, process=proc)
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise StartError(f"storescp +tls exited: {log_tail(log_path, 2000)}")
        if run_tls_echoscu(port, ae_title, pki.client_key, pki.client_cert, pki.ca_cert, timeout_s=2).returncode == 0:
            return scp
        if time.monotonic() > deadline:
            scp.stop()
            raise StartError(f"storescp +tls not answering C-ECHO in {timeout_s}s: {log_tail(log_path, 2000)}")
        time.sleep(0.1)
