"""Orchestrator replicas on one real Redis (`--redis`): keys, limits and usage are shared; a Redis
that cannot be used stops an orchestrator with one line. Requests do not cross replicas yet:
each replica serves its callers on the nodes connected to it."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from tests.conftest import NodeProcess, OrchestratorProcess, free_port, wait_until

BODY = {"model": "tiny", "prompt": "x", "max_tokens": 2}


def post(orch: OrchestratorProcess, key: str) -> httpx.Response:
    return httpx.post(orch.api + "/completions", headers={"Authorization": f"Bearer {key}"}, json=BODY, timeout=60,
                      verify=orch.verify)  # fmt: skip


def dragon(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dragonswarm.cli", *args], capture_output=True, text=True,
                          timeout=60, env={**os.environ, **(env or {})})  # fmt: skip


def test_rate_limits_and_keys_hold_across_replicas(start_orchestrator: Callable[..., OrchestratorProcess],
                                                   start_node: Callable[..., NodeProcess], tiny_model: Path,
                                                   redis_url: str) -> None:  # fmt: skip
    a = start_orchestrator("--rate-rpm", "3", redis=redis_url)
    b = start_orchestrator("--rate-rpm", "3", redis=redis_url)
    start_node("--name", "wa", "--model", f"tiny={tiny_model}", swarm=a)
    start_node("--name", "wb", "--model", f"tiny={tiny_model}", swarm=b)  # joins with a key made for a: one store
    a.wait_live("wa")
    b.wait_live("wb")

    # A key made with the CLI straight in Redis, while both run: valid on both at once.
    made = dragon("keys", "create", "--role", "user", "--name", "shared", env={"DRAGON_REDIS": redis_url})
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip()

    # Three a minute for the key, whichever replica admits them: alternating, the fourth is refused.
    assert [post(orch, key).status_code for orch in (a, b, a)] == [200, 200, 200]
    refused = post(b, key)
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    assert post(a, key).status_code == 429
    assert post(b, b.keys["user"]).status_code == 200  # other keys keep their own windows

    # Usage is counted in one place, whichever replica served it.
    def shared_usage() -> int:
        with b.client("admin") as c:
            rows = {row["name"]: row for row in c.get("/v1/usage").json()["data"]}
        return int(rows["shared"]["requests"])

    wait_until(lambda: shared_usage() == 3, 30, "the three requests to be counted")
    listed = dragon("keys", "list", "--redis", redis_url)
    assert listed.returncode == 0 and "shared" in listed.stdout and key not in listed.stdout

    password = urlsplit(redis_url).password
    assert password
    for orch in (a, b):
        assert password not in orch.log()  # the startup line names the Redis, masked
    assert "state in redis://:***@127.0.0.1:" in a.log()


def test_a_redis_that_cannot_be_used_stops_the_orchestrator_in_one_line(tmp_path: Path, redis_url: str) -> None:
    password = urlsplit(redis_url).password
    assert password
    wrong = redis_url.replace(password, "not-the-password")
    (tmp_path / "config.toml").write_text(f'[orchestrator]\nredis = "redis://:s3cret@127.0.0.1:{free_port()}/0"\n')
    cases = [  # (flags, environment, what the error says)
        (["--redis", "http://:s3cret@127.0.0.1:1/0"], {}, "invalid Redis URL"),
        ([], {"DRAGON_REDIS": wrong}, "username-password"),
        ([], {}, "onnect"),  # config.toml's, nothing listens there
    ]
    for flags, env, why in cases:
        result = dragon("orchestrator", "--home", str(tmp_path), "--insecure", "--port", str(free_port()), *flags,
                        env=env)  # fmt: skip
        output = result.stdout + result.stderr
        assert result.returncode == 2, output
        errors = [line for line in output.splitlines() if line.startswith("dragon: error:")]
        assert len(errors) == 1 and why in errors[0] and "Traceback" not in output, output
        assert "s3cret" not in output and "not-the-password" not in output and password not in output
    keys = dragon("keys", "list", "--home", str(tmp_path))  # config.toml's Redis is the orchestrator's: keys too
    assert keys.returncode == 2 and keys.stderr.startswith("dragon: error: cannot use Redis at redis://:***@")


def test_the_redis_url_comes_from_a_flag_the_environment_or_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                                   ) -> None:  # fmt: skip
    from dragonswarm.settings import OrchestratorSettings

    def url(**given: str) -> str | None:
        redis = OrchestratorSettings(home=tmp_path, **given).redis  # type: ignore[arg-type]
        return None if redis is None else redis.get_secret_value()

    for name in ("DRAGON_REDIS", "DRAGON_ORCHESTRATOR_REDIS", "REDIS"):
        monkeypatch.delenv(name, raising=False)
    assert url() is None
    (tmp_path / "config.toml").write_text('[orchestrator]\nredis = "redis://from-config"\n')
    assert url() == "redis://from-config"
    monkeypatch.setenv("REDIS", "redis://not-ours")  # only DRAGON_ names are read
    assert url() == "redis://from-config"
    monkeypatch.setenv("DRAGON_REDIS", "redis://from-env")
    assert url() == "redis://from-env"
    assert url(redis="redis://from-flag") == "redis://from-flag"
    monkeypatch.setenv("DRAGON_REDIS", "")  # set empty: no Redis, whatever config.toml says
    assert url() is None
    assert "from-config" not in repr(OrchestratorSettings(home=tmp_path, redis="redis://:pw@from-config"))  # type: ignore[arg-type]
