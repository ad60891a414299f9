"""The node's own machine: which config it reads, and which names and sites its loopback API answers."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from tests.conftest import NodeProcess, free_port

from dragonswarm.errors import ConfigError
from dragonswarm.settings import NodeSettings, OrchestratorSettings, config_table
from dragonswarm.web.hosts import HostPolicy, host_name

# --- config.toml: one table per program, from the home in force -----------------------------

NODE_FIELDS = set(NodeSettings.model_fields)


def test_each_program_reads_only_its_own_table() -> None:
    text = "[node]\ninsecure = true\nlocal_share = 0.5\n\n[orchestrator]\nport = 9000\n"
    assert config_table(text, "node", NODE_FIELDS, "c") == {"insecure": True, "local_share": 0.5}
    assert config_table(text, "orchestrator", set(OrchestratorSettings.model_fields), "c") == {"port": 9000}
    assert config_table("", "node", NODE_FIELDS, "c") == {}


@pytest.mark.parametrize(("text", "said"), [
    ("insecure = true\n", "insecure must be under a table"),  # the old flat file: both programs read it
    ("[nodes]\nshare = 0.2\n", "unknown table(s) nodes"),
    ("[node]\nshare = 0.2\nlocal_shar = 0.5\n", "unknown setting(s) in [node]: local_shar"),
    ("[node\n", "c.toml:"),
])  # fmt: skip
def test_a_config_file_it_cannot_follow_is_an_error(text: str, said: str) -> None:
    with pytest.raises(ConfigError, match=said.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        config_table(text, "node", NODE_FIELDS, "c.toml")


def test_settings_come_from_the_home_given_not_the_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    default, given = tmp_path / "default", tmp_path / "given"
    for home, share in ((default, 0.3), (given, 0.6)):
        home.mkdir()
        (home / "config.toml").write_text(f"[node]\nlocal_share = {share}\n[orchestrator]\ninsecure = true\n")
    (given / "config.toml").write_text("[node]\nlocal_share = 0.6\ninsecure = true\n")
    monkeypatch.setenv("DRAGON_HOME", str(default))
    assert NodeSettings().local_share == 0.3
    assert NodeSettings(home=given).local_share == 0.6
    # The node's `insecure` does not reach the orchestrator on the same home.
    assert OrchestratorSettings(home=given).insecure is False
    assert OrchestratorSettings(home=default).insecure is True


def test_the_cli_refuses_a_flat_config_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_text("insecure = true\n")
    done = subprocess.run([sys.executable, "-m", "dragonswarm.cli", "orchestrator", "--home", str(tmp_path),
                           "--port", str(free_port())], capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "must be under a table" in lines[0] and "Traceback" not in done.stderr, done.stderr


def test_a_node_started_with_home_uses_that_homes_config(start_node: Callable[..., NodeProcess], tiny_model: Path,
                                                         tmp_path: Path) -> None:  # fmt: skip
    home = tmp_path / "owner-home"
    home.mkdir()
    (home / "config.toml").write_text("[node]\nlocal_share = 0.4\nname = 'from-config'\n")
    node = start_node("--model", f"tiny={tiny_model}", home=home)
    status = node.status()
    assert status["name"] == "from-config"
    assert status["governor"]["local_share"] == 0.4


# --- Host and Origin: no DNS rebinding, no cross-site use ------------------------------------


def test_host_names_are_read_as_browsers_send_them() -> None:
    assert host_name("LocalHost:8701") == "localhost"
    assert host_name("[::1]:8701") == "::1"
    assert host_name("::1") == "::1"
    assert host_name("example.com.") == "example.com"


def test_a_loopback_node_answers_loopback_names_and_configured_ones_only() -> None:
    policy = HostPolicy.for_bind("127.0.0.1", ["mybox.lan"])
    for ok in ("127.0.0.1:8701", "localhost:8701", "[::1]:8701", "127.0.0.2", "MyBox.lan:8701"):
        assert policy.allows_host(ok), ok
    for bad in ("attacker.example:8701", "192.168.1.20:8701", "localhost.attacker.example", ""):
        assert not policy.allows_host(bad), bad
    assert policy.allows_origin("http://localhost:3000")
    for bad in ("http://attacker.example", "null", "file://", "chrome-extension://abc"):
        assert not policy.allows_origin(bad), bad


def test_a_node_bound_beyond_loopback_answers_its_addresses_but_no_unknown_name() -> None:
    policy = HostPolicy.for_bind("0.0.0.0")
    assert policy.allows_host("192.168.1.20:8701") and policy.allows_host("[fe80::1]:8701")
    assert not policy.allows_host("attacker.example:8701")
    named = HostPolicy.for_bind("mybox.lan")
    assert named.allows_host("mybox.lan:8701") and not named.allows_host("other.lan")


def test_the_node_refuses_a_rebound_name_and_a_foreign_page(start_node: Callable[..., NodeProcess],
                                                            tiny_model: Path) -> None:  # fmt: skip
    node = start_node("--model", f"tiny={tiny_model}", "--allowed-host", "mybox.lan")
    body = {"model": "tiny", "prompt": "x", "max_tokens": 2}
    url = f"http://127.0.0.1:{node.port}"
    with httpx.Client(base_url=url, timeout=60) as client:
        assert client.post("/v1/completions", json=body).status_code == 200
        # DNS rebinding: the page's own name, now resolving to 127.0.0.1.
        r = client.post("/v1/completions", json=body, headers={"Host": f"attacker.example:{node.port}"})
        assert r.status_code == 403 and r.json()["error"]["code"] == "host_not_allowed", r.text
        r = client.get("/v1/node", headers={"Host": "attacker.example"})
        assert r.status_code == 403, "the owner's machine status must not be readable either"
        r = client.post("/v1/completions", json=body, headers={"Origin": "https://attacker.example"})
        assert r.status_code == 403 and r.json()["error"]["code"] == "origin_not_allowed", r.text
        assert client.post("/v1/completions", json=body, headers={"Host": f"mybox.lan:{node.port}"}).status_code == 200
        same_site = client.post("/v1/completions", json=body, headers={"Origin": f"http://localhost:{node.port}"})
        assert same_site.status_code == 200, same_site.text
