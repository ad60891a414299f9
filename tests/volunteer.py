"""Run `dragon node` as a volunteer would: as a user who is not root.

Most volunteers are not root, but CI and containers run the suite as root. There the
`volunteer` fixture makes a system user, a venv of the system Python that this user can
run (built once and reused while pyproject.toml's dependencies stay the same) and, per
session, a fresh copy of the source on PYTHONPATH. When the tests already run as a
normal user, that user is the volunteer and nothing is switched.

The node is started through `setpriv`, which changes user and then execs: the process
the test holds IS the node, so SIGINT reaches it. (`runuser -u` forks and waits instead,
and ignores SIGINT: killing it would orphan the node.)
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil
import pytest

if TYPE_CHECKING:  # conftest imports this module, so its names are imported late at run time
    from tests.conftest import NodeProcess

PROJECT = Path(__file__).resolve().parents[1]
SYSTEM_PYTHON = Path("/usr/bin/python3")
USER = "dragon-volunteer"
SHARED_ROOT = Path("/var/tmp/dragonswarm-volunteer")
PIP_TAIL = 4000  # characters of pip's output kept in a failure message
STALE_SESSION_S = 24 * 3600


@dataclass(frozen=True)
class Volunteer:
    """Who runs the node and with what: a user, a python it can run, folders it can read."""

    user: str | None  # None: the test process is not root and is the volunteer itself
    uid: int
    gid: int
    python: Path
    root_dir: Path  # world-traversable; holds the venv and one folder per session
    home: Path  # this session's HOME for the user, owned by the user
    source: Path  # on PYTHONPATH: holds the `dragonswarm` package under test
    _shared: dict[Path, Path] = field(default_factory=dict, compare=False, repr=False)

    def prefix(self) -> list[str]:
        """The command prefix that runs a program as the volunteer."""
        if self.user is None:
            return []
        return ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--init-groups", "--"]

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """A clean environment, as a volunteer's shell would have: none of the test process's."""
        name = self.user or pwd.getpwuid(self.uid).pw_name
        return {
            "HOME": str(self.home), "USER": name, "LOGNAME": name, "LANG": "C.UTF-8",
            "PATH": f"{self.python.parent}:/usr/local/bin:/usr/bin:/bin",
            "PYTHONPATH": str(self.source),
        } | (extra or {})  # fmt: skip

    def make_dir(self, prefix: str) -> Path:
        """A fresh folder in the user's home, owned by the user, mode 0700 like a real home."""
        path = Path(tempfile.mkdtemp(prefix=prefix, dir=self.home))
        os.chown(path, self.uid, self.gid)
        return path

    def share(self, path: Path) -> Path:
        """`path` where the user can read it: a hard link or a copy in the user's home."""
        path = path.resolve()
        if path in self._shared:
            return self._shared[path]
        models = self.home / "models"
        if not models.exists():
            models.mkdir()
            os.chown(models, self.uid, self.gid)
        target = models / f"{len(self._shared)}-{path.name}"
        try:
            if not path.stat().st_mode & stat.S_IROTH:
                raise PermissionError  # a link would share the inode, and its mode
            os.link(path, target)
        except OSError:  # another file system, or not readable by others
            shutil.copyfile(path, target)
            os.chown(target, self.uid, self.gid)
            target.chmod(0o644)
        self._shared[path] = target
        return target


def _say(config: pytest.Config, message: str) -> None:
    """Show a line even while pytest captures output: a first venv build takes a while."""
    capman = config.pluginmanager.getplugin("capturemanager")
    reporter = config.pluginmanager.getplugin("terminalreporter")
    if capman is None or reporter is None:
        print(f"volunteer: {message}", file=sys.stderr)
        return
    with capman.global_and_fixture_disabled():
        reporter.write_line(f"volunteer: {message}")


def _traversable(path: Path) -> None:
    """Fail unless every folder from / down to `path` lets other users through."""
    for folder in (path, *path.parents):
        if not folder.stat().st_mode & stat.S_IXOTH:
            pytest.fail(f"{folder} is not traversable by other users, so the volunteer cannot reach {path}",
                        pytrace=False)  # fmt: skip


def _shared_root(root_dir: Path, uid: int) -> Path:
    """`root_dir`, made if missing; refused if someone else could plant files in it."""
    root_dir.mkdir(mode=0o755, exist_ok=True)
    st = root_dir.lstat()
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != uid or st.st_mode & 0o022:
        pytest.fail(f"{root_dir} must be a folder owned by uid {uid} that only its owner can write "
                    f"(it is {stat.filemode(st.st_mode)}, uid {st.st_uid})", pytrace=False)  # fmt: skip
    root_dir.chmod(0o755)
    _traversable(root_dir)
    return root_dir


def _session(root_dir: Path) -> Path:
    """A fresh folder for this session; those a killed session left behind a day ago are removed."""
    for old in root_dir.glob("session-*"):
        if time.time() - old.stat().st_mtime > STALE_SESSION_S:
            shutil.rmtree(old, ignore_errors=True)  # another session's; failing to clean it is no reason to fail
    session = Path(tempfile.mkdtemp(prefix="session-", dir=root_dir))
    session.chmod(0o755)
    return session


def _user() -> pwd.struct_passwd:
    """The volunteer's system user, made on first use. Called under the build lock."""
    try:
        return pwd.getpwnam(USER)
    except KeyError:
        pass
    # No login shell and no home: each session gives it a HOME of its own.
    result = subprocess.run(["useradd", "--system", "--user-group", "--no-create-home", "--home-dir", "/nonexistent",
                             "--shell", "/usr/sbin/nologin", USER], capture_output=True, text=True)  # fmt: skip
    if result.returncode != 0:
        pytest.fail(f"useradd {USER} failed ({result.returncode}): {result.stderr.strip()}", pytrace=False)
    return pwd.getpwnam(USER)


def _run(args: list[str], what: str) -> None:
    """Run a build step as root; fail with the tail of its output."""
    # The test process's own interpreter settings must not leak into the system Python.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PIP_USER")}
    result = subprocess.run(args, capture_output=True, text=True, env=env, umask=0o022)
    if result.returncode != 0:
        tail = (result.stdout + result.stderr)[-PIP_TAIL:]
        pytest.fail(f"building the volunteer's venv failed at {what} (exit {result.returncode}):\n{tail}",
                    pytrace=False)  # fmt: skip


def _recipe() -> tuple[dict[str, Any], Path]:
    """What the volunteer's venv is built from, and the folder name (under the shared root) it is keyed by."""
    deps = tomllib.loads((PROJECT / "pyproject.toml").read_text())["project"]["dependencies"]
    version = subprocess.run([SYSTEM_PYTHON, "-c", "import sys; print(sys.version)"], capture_output=True, text=True,
                             check=True).stdout.strip()  # fmt: skip
    recipe = {"python": str(SYSTEM_PYTHON), "version": version, "dependencies": sorted(deps)}
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]
    return recipe, Path(f"venv-{key}")


def built_venv(root_dir: Path = SHARED_ROOT) -> Path | None:
    """The python of the volunteer's venv when it is built for today's dependencies, else None.

    Builds nothing: the entry point for callers outside pytest (bench/volunteer_bench.py).
    """
    recipe, name = _recipe()
    stamp = root_dir / name / "dragonswarm-volunteer.json"
    if stamp.exists() and json.loads(stamp.read_text()) == recipe:
        return root_dir / name / "bin" / "python"
    return None


def _venv(config: pytest.Config, root_dir: Path) -> Path:
    """A venv of the system Python with the project's dependencies; reused while they stay the same.

    Built as root so that root's pip cache serves the llama.cpp wheel (compiling it takes
    minutes). Called under the build lock.
    """
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        pytest.fail(f"{SYSTEM_PYTHON} is missing: install python3 and python3-venv", pytrace=False)
    built = built_venv(root_dir)
    if built is not None:
        return built
    recipe, name = _recipe()
    deps = recipe["dependencies"]
    venv = root_dir / name
    stamp = venv / "dragonswarm-volunteer.json"
    if venv.exists():  # a build that died half-way
        shutil.rmtree(venv)
    started = time.monotonic()
    _say(config, f"building {venv} with {len(deps)} dependencies (once per dependency set)...")
    _run([str(SYSTEM_PYTHON), "-m", "venv", str(venv)], "python3 -m venv (is python3-venv installed?)")
    _run([str(venv / "bin" / "python"), "-m", "pip", "install", "--progress-bar", "off", "--disable-pip-version-check",
          *deps], "pip install")  # fmt: skip
    stamp.write_text(json.dumps(recipe, sort_keys=True))
    stamp.chmod(0o644)
    _say(config, f"built {venv.name} in {time.monotonic() - started:.1f} s")
    return venv / "bin" / "python"


def _copy_source(session: Path, python: Path) -> Path:
    """A fresh, world-readable copy of the package under test, compiled so imports stay quick."""
    source = session / "src"
    shutil.copytree(PROJECT / "src" / "dragonswarm", source / "dragonswarm",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))  # fmt: skip
    _run([str(python), "-m", "compileall", "-q", str(source)], "compileall of the source copy")
    for folder, _dirs, files in os.walk(source):
        os.chmod(folder, 0o755)  # a clone made under umask 077 would hide these from the user
        for name in files:
            os.chmod(os.path.join(folder, name), 0o644)
    return source


@pytest.fixture(scope="session")
def volunteer(pytestconfig: pytest.Config) -> Iterator[Volunteer]:
    """A non-root user who can run this session's `dragon node`."""
    if os.geteuid() != 0:
        root_dir = _shared_root(Path(f"{SHARED_ROOT}-{os.getuid()}"), os.getuid())
        session = _session(root_dir)
        home = session / "home"
        home.mkdir(mode=0o700)
        yield Volunteer(None, os.getuid(), os.getgid(), Path(sys.executable), root_dir, home, PROJECT / "src")
        shutil.rmtree(session)
        return
    missing = [tool for tool in ("setpriv", "useradd") if shutil.which(tool) is None]
    if missing:
        pytest.fail(f"running a node as a volunteer needs {', '.join(missing)} (util-linux, passwd)", pytrace=False)
    root_dir = _shared_root(SHARED_ROOT, 0)
    with (root_dir / "build.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another session may be building the same venv
        user = _user()
        python = _venv(pytestconfig, root_dir)
    with volunteer_session(user, python, root_dir) as made:
        yield made


@contextlib.contextmanager
def volunteer_session(user: pwd.struct_passwd, python: Path, root_dir: Path = SHARED_ROOT) -> Iterator[Volunteer]:
    """As root: `user` with `python` (a built venv), a fresh session folder holding their HOME and a
    copy of the source under test; removed afterwards. The fixture's second half, and the entry
    point for callers outside pytest (with `built_venv`)."""
    session = _session(root_dir)
    home = session / "home"
    home.mkdir(mode=0o700)
    os.chown(home, user.pw_uid, user.pw_gid)
    source = _copy_source(session, python)
    try:
        yield Volunteer(user.pw_name, user.pw_uid, user.pw_gid, python, root_dir, home, source)
    finally:
        shutil.rmtree(session)


def _enter(cgroup: Path) -> Callable[[], None]:
    """For `preexec_fn`: the child joins `cgroup` (a v2 group) before it execs, as root still."""

    def enter() -> None:
        (cgroup / "cgroup.procs").write_text("0")  # 0: the writing process itself

    return enter


@pytest.fixture
def delegated_scope(volunteer: Volunteer) -> Iterator[Path]:
    """A cgroup-v2 scope delegated to the volunteer, made as systemd makes one for
    `systemd-run --user --scope -p Delegate=yes`: the cpu controller enabled in every group
    above it, and the scope's folder with its cgroup.procs, cgroup.subtree_control and
    cgroup.threads owned by the user. Needs root and the cpu controller on cgroup v2."""
    root = Path("/sys/fs/cgroup")
    if os.geteuid() != 0 or volunteer.user is None:
        pytest.skip("delegating a cgroup scope to a volunteer needs root")
    controllers = (root / "cgroup.controllers").read_text().split() if (root / "cgroup.controllers").exists() else []
    if "cpu" not in controllers:
        pytest.skip("the cpu controller is not on a cgroup v2 hierarchy here (on cgroup v1 only root may set "
                    "quotas); scripts/test-in-vm runs this test in a virtual machine with cgroup v2")  # fmt: skip
    slice_ = root / f"dragon-test-{os.getpid()}.slice"
    scope = slice_ / "volunteer.scope"
    try:
        (root / "cgroup.subtree_control").write_text("+cpu")
        slice_.mkdir()
        (slice_ / "cgroup.subtree_control").write_text("+cpu")
        scope.mkdir()
    except OSError as exc:  # a container's read-only or non-root cgroup mount
        with contextlib.suppress(OSError):
            slice_.rmdir()
        pytest.skip(f"cannot make a cgroup scope here: {exc}")
    for path in (scope, scope / "cgroup.procs", scope / "cgroup.subtree_control", scope / "cgroup.threads"):
        os.chown(path, volunteer.uid, volunteer.gid)
    yield scope
    # Whatever the node left behind: only processes this test started can be in the scope.
    groups = sorted([scope, *(p for p in scope.rglob("*") if p.is_dir())], key=lambda p: -len(p.parts))
    for group in groups:
        for pid in (group / "cgroup.procs").read_text().split():
            with contextlib.suppress(psutil.NoSuchProcess):
                psutil.Process(int(pid)).kill()
    for group in [*groups, slice_]:
        wait_for_empty = time.monotonic() + 10  # a killed process leaves its group a moment later
        while group.exists() and time.monotonic() < wait_for_empty:
            with contextlib.suppress(OSError):
                group.rmdir()
            time.sleep(0.05)


@pytest.fixture
def start_volunteer_node(volunteer: Volunteer, tmp_path: Path) -> Iterator[Callable[..., NodeProcess]]:
    """Start `dragon node` as the volunteer with one model and the given flags; stopped at teardown.

    The returned node's `proc.pid` is the node itself (setpriv execs, it does not fork).
    """
    from tests.conftest import NodeProcess, _healthy, free_port, wait_until

    nodes: list[NodeProcess] = []

    def start(*flags: str, model: Path, name: str = "tiny", env: dict[str, str] | None = None,
              wait: bool = True, cgroup: Path | None = None) -> NodeProcess:  # fmt: skip
        port = free_port()
        home = volunteer.make_dir(f"node-{len(nodes)}-")
        log_path = tmp_path / f"volunteer-node-{len(nodes)}.log"
        served = f"{name}={volunteer.share(model)}"
        args = [*volunteer.prefix(), str(volunteer.python), "-m", "dragonswarm.cli", "node", "--home", str(home),
                "--api-port", str(port), "--no-bundled-model", "--model", served, *flags]  # fmt: skip
        with log_path.open("wb") as log:
            # cwd: the test's own may be unreadable to the user, and would shadow the source on sys.path
            proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=volunteer.env(env),
                                    cwd=volunteer.home, preexec_fn=_enter(cgroup) if cgroup else None)  # fmt: skip
        node = NodeProcess(proc, port, home, log_path)
        nodes.append(node)
        if wait:
            wait_until(lambda: _healthy(node), 60, "the volunteer's node to answer /health")
            uid = psutil.Process(proc.pid).uids().real
            assert uid == volunteer.uid, f"node pid {proc.pid} runs as uid {uid}, not the volunteer's {volunteer.uid}"
        return node

    yield start
    for node in nodes:
        try:
            children = psutil.Process(node.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            children = []
        node.stop()
        for child in children:  # runners the node failed to stop would outlive the session folder
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()
                child.wait(10)
