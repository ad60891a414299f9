"""Where every benchmark's results go: `bench/results/NAME.json` and the `NAME.md` beside it."""

from __future__ import annotations

import json
import math
import shutil
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"


def strict_json(value: Any) -> Any:
    """`value` with NaN and infinities as None: JSON has neither, and strict parsers refuse them."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [strict_json(v) for v in value]
    return value


def save(results: dict[str, Any], out: Path, write_markdown: Callable[[dict[str, Any], Path], None]) -> None:
    """Write the results as JSON and as Markdown, and print the Markdown."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(strict_json(results), indent=2) + "\n")
    write_markdown(results, out.with_suffix(".md"))
    print(out.with_suffix(".md").read_text())


@contextmanager
def scratch(root: Path) -> Iterator[Path]:
    """A run's scratch folder: removed when the run succeeds, kept for its logs when it fails."""
    try:
        yield root
    except BaseException:
        print(f"failed; the processes' logs are kept in {root / '*' / 'logs'}", file=sys.stderr)
        raise
    shutil.rmtree(root, ignore_errors=True)
