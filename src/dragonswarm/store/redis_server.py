"""A Redis server of our own on this machine, for replicas on one machine (`dragon up --replicas`).

Loopback only, with a generated password, in a folder of its own under the data dir:
`redis.conf` and `password` (both 0600: the password is never on a command line, where
`ps` would show it to every user), `redis.log`, and the append-only file that keeps what
replicas share across restarts. Starting it again on the same folder reuses the password
and the data. Debian's `redis-server` runs it (`scripts/install.sh` installs it).
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from dragonswarm.errors import ConfigError
from dragonswarm.secrets_file import write_private

BINARY = "redis-server"
START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0
HOST = "127.0.0.1"


@dataclass
class LocalRedis:
    """A running `redis-server` that we started, and how to reach it."""

    process: subprocess.Popen[bytes]
    port: int
    password: str
    dir: Path

    @property
    def url(self) -> str:
        """redis://:PASSWORD@127.0.0.1:PORT/0. It holds the password: hand it to child processes in
        their environment (DRAGON_REDIS), never on a command line; log `store.redis.redacted(url)`."""
        return f"redis://:{self.password}@{HOST}:{self.port}/0"

    @property
    def log_path(self) -> Path:
        return self.dir / "redis.log"

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> int:
        """Stop it (SIGTERM: Redis writes its append-only file out and exits); killed if it takes
        longer than `timeout`. Returns its exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _quoted(path: Path) -> str:
    """A path as a double-quoted string of redis.conf."""
    return '"' + str(path).replace("\\", "\\\\").replace('"', '\\"') + '"'


def config_text(port: int, password: str, folder: Path, persist: bool) -> str:
    """The server's redis.conf (pure)."""
    lines = [
        f"bind {HOST}",
        "protected-mode yes",
        f"port {port}",
        f"requirepass {password}",
        f"dir {_quoted(folder)}",
        "daemonize no",
        'logfile ""',  # to standard output, which goes to redis.log
        'save ""',  # no RDB snapshots: the append-only file keeps the data
        # everysec: at most a second of writes lost if the machine (not the process) dies,
        # without an fsync per write.
        f"appendonly {'yes' if persist else 'no'}",
        "appendfsync everysec",
    ]
    return "\n".join(lines) + "\n"


def start_local_redis(folder: Path, port: int | None = None, *, persist: bool = True,
                      binary: str = BINARY, timeout: float = START_TIMEOUT_S) -> LocalRedis:  # fmt: skip
    """Start `redis-server` on loopback (`port`, else a free one) with its files in `folder`, and
    wait until it answers. With `persist`, an append-only file in `folder` keeps its data across
    restarts; without, it keeps nothing (tests). `ConfigError` if it cannot start."""
    executable = shutil.which(binary)
    if executable is None:
        raise ConfigError(f"{binary} not found: install Debian's redis-server (scripts/install.sh does, "
                          "with root or sudo)")  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)  # its data holds key hashes and node identities
    password_file = folder / "password"
    if password_file.exists():
        password = password_file.read_text().strip()
    else:
        password = secrets.token_urlsafe(32)  # URL-safe: it goes into redis:// URLs unquoted
        write_private(password_file, (password + "\n").encode())
    port = port or _free_port()
    config = folder / "redis.conf"
    write_private(config, config_text(port, password, folder, persist).encode())
    with (folder / "redis.log").open("ab") as log:
        # A session of its own: a Ctrl-C at the terminal must not stop Redis before the
        # orchestrators that write to it; whoever started it stops it, last.
        process = subprocess.Popen([executable, str(config)], stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    server = LocalRedis(process, port, password, folder)
    try:
        _wait_ready(server, timeout)
    except BaseException:
        server.stop()
        raise
    return server


def _wait_ready(server: LocalRedis, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    client = redis.Redis(host=HOST, port=server.port, password=server.password, socket_connect_timeout=1,
                         socket_timeout=1, retry=Retry(NoBackoff(), 0))  # fmt: skip
    try:
        while True:
            if server.process.poll() is not None:
                tail = server.log_path.read_text(errors="replace").strip().splitlines()[-3:]
                raise ConfigError(f"redis-server exited with {server.process.returncode}: {' / '.join(tail)}")
            try:
                # It answers LOADING while it reads a large append-only file back: not ready yet.
                if client.ping():
                    return
            except redis.RedisError:
                pass
            if time.monotonic() > deadline:
                raise ConfigError(f"redis-server did not answer on {HOST}:{server.port} within {timeout:.0f} s")
            time.sleep(0.05)
    finally:
        client.close()
