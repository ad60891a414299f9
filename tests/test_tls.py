"""TLS with the swarm's own CA, the insecure escape hatch, the node's local API key, and logs."""

from __future__ import annotations

import ssl
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from tests.conftest import free_port, wait_until

from dragonswarm.tls import TlsFiles, certificate_names, client_context

Start = Callable[..., Any]


def dragon(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dragonswarm.cli", *args], capture_output=True, text=True,
                          timeout=60, env=env)  # fmt: skip


def test_certs_init(tmp_path: Path) -> None:
    r = dragon("certs", "init", "--home", str(tmp_path), "--name", "swarm.example", "--name", "10.0.0.7")
    assert r.returncode == 0, r.stderr
    files = TlsFiles(tmp_path / "tls")
    assert set(certificate_names(files.server_cert)) == {"swarm.example", "10.0.0.7"}
    for private in (files.ca_key, files.server_key):
        assert stat.S_IMODE(private.stat().st_mode) == 0o600
    ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    server = x509.load_pem_x509_certificate(files.server_cert.read_bytes())
    assert server.issuer == ca.subject
    public = ca.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey) and server.signature_hash_algorithm is not None
    public.verify(server.signature, server.tbs_certificate_bytes, ec.ECDSA(server.signature_hash_algorithm))
    before = files.ca_cert.read_bytes()
    again = dragon("certs", "init", "--home", str(tmp_path))
    assert again.returncode == 0 and "already" in again.stderr
    assert files.ca_cert.read_bytes() == before  # an existing CA is kept, never silently replaced


def test_tls_by_default_and_only_the_swarm_ca_is_trusted(swarm: Callable[..., Any], tmp_path: Path) -> None:
    orch = swarm(1)  # the node joined over wss, verifying with --ca
    assert orch.url.startswith("https://")
    with orch.client() as c:
        assert c.post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2}).status_code == 200
    # A client that does not trust the swarm's CA cannot connect.
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(orch.url + "/health")
    other = TlsFiles(tmp_path / "other")
    from dragonswarm.tls import init_ca

    init_ca(other, ["localhost", "127.0.0.1"])
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(orch.url + "/health", verify=client_context(other.ca_cert))
    # Plain HTTP to the TLS port is refused.
    with pytest.raises(httpx.TransportError):
        httpx.get(orch.url.replace("https", "http") + "/health", timeout=5)


def test_a_node_that_does_not_trust_the_orchestrator_does_not_join(
    start_orchestrator: Start, start_node: Start, tiny_model: Path, tmp_path: Path
) -> None:
    orch = start_orchestrator()
    from dragonswarm.tls import init_ca

    stranger = TlsFiles(tmp_path / "stranger")
    init_ca(stranger, ["localhost"])
    node = start_node("--name", "w1", "--model", f"tiny={tiny_model}", "--orchestrator", orch.url, "--ca",
                      str(stranger.ca_cert), "--key", orch.keys["node"])  # fmt: skip
    wait_until(lambda: "CERTIFICATE_VERIFY_FAILED" in node.log() or "certificate verify failed" in node.log(), 30,
               "the node to refuse the orchestrator's certificate")  # fmt: skip
    assert not node.status()["swarm"]["connected"]
    assert "w1" not in orch.nodes()


def test_insecure_only_when_asked(start_orchestrator: Start, start_node: Start, tiny_model: Path,
                                  tmp_path: Path) -> None:  # fmt: skip
    orch = start_orchestrator(tls=False)
    assert orch.url.startswith("http://")
    assert "plain HTTP" in wait_until(lambda: orch.log() if "plain HTTP" in orch.log() else "", 10, "the warning")
    refused = dragon("node", "--home", str(tmp_path), "--no-bundled-model", "--model", f"tiny={tiny_model}",
                     "--orchestrator", orch.url, "--key", orch.keys["node"])  # fmt: skip
    assert refused.returncode == 2 and "--insecure" in refused.stderr
    start_node("--name", "w1", "--model", f"tiny={tiny_model}", swarm=orch)  # with --insecure: joins
    orch.wait_live("w1")


def test_local_api_beyond_loopback_needs_a_key(start_node: Start, tiny_model: Path, tmp_path: Path) -> None:
    no_key = dragon("node", "--home", str(tmp_path), "--no-bundled-model", "--model", f"tiny={tiny_model}",
                    "--host", "0.0.0.0", "--api-port", str(free_port()))  # fmt: skip
    assert no_key.returncode == 2 and "--api-key" in no_key.stderr
    node = start_node("--model", f"tiny={tiny_model}", "--host", "0.0.0.0", "--api-key", "s3cret-local-key")
    body = {"model": "tiny", "prompt": "x", "max_tokens": 2}
    assert node.client.get("/health").status_code == 200
    denied = node.client.post("/v1/completions", json=body)
    assert denied.status_code == 401 and denied.json()["error"]["code"] == "invalid_api_key"
    assert node.client.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
    ok = node.client.post("/v1/completions", json=body, headers={"Authorization": "Bearer s3cret-local-key"})
    assert ok.status_code == 200


def test_logs_hold_no_prompts_answers_or_keys(swarm: Callable[..., Any], start_node: Start, tiny_model: Path) -> None:
    orch = swarm(1)
    local = start_node("--name", "local", "--model", f"tiny={tiny_model}", swarm=orch)
    orch.wait_live("local")
    marker = "SECRET-PROMPT-7f3a"
    with orch.client() as c:
        answer = c.post("/v1/completions", json={"model": "tiny", "prompt": marker, "max_tokens": 16,
                                                 "temperature": 0}).json()["choices"][0]["text"]  # fmt: skip
    local.client.post("/v1/chat/completions", json={"model": "tiny", "max_tokens": 4,
                                                    "messages": [{"role": "user", "content": marker}]})  # fmt: skip
    logs = orch.log() + local.log() + "".join(p.read_text(errors="replace") for p in orch.home.parent.glob("*.log"))
    assert marker not in logs
    assert answer.strip() and answer not in logs
    for key in orch.keys.values():
        assert key not in logs
    assert "dnc_" not in logs  # node credentials neither


def test_ssl_context_refuses_old_tls() -> None:
    assert client_context(None).minimum_version >= ssl.TLSVersion.TLSv1_2
