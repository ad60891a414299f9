"""Which model serves a request: a concrete name as asked, or for "auto" a code or chat model by the prompt."""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping

AUTO = "auto"

# A line that starts like a statement in a common language. Case-sensitive and shaped (`let x =`, not "let me"),
# so prose that happens to begin with one of these words does not count.
_CODE_LINE = re.compile(
    r"^[ \t]*(?:(?:async\s+)?def\s+\w+|class\s+\w+\s*[(:{]|import\s+[\w.]+|from\s+[\w.]+\s+import\s"
    r"|function\*?\s*\w*\s*\(|return\b|(?:const|let|var)\s+\w+\s*[=:]|(?:pub\s+)?fn\s+\w+|func\s+\w+\s*\("
    r"|#include\b|#define\b|SELECT\s+.+\s+FROM\b|CREATE\s+TABLE\b)",
    re.MULTILINE,
)
# Words people use when they ask about code. Whole words, so "decode" does not count as "code"; C++ and C#
# end in symbols, where \b would never match.
_CODE_WORDS = re.compile(
    r"\b(?:code|coding|python|javascript|typescript|java|rust|golang|kotlin|php|ruby|perl|bash|shell\s+script"
    r"|sql|regex|html|css|json|yaml|function|compile[rsd]?|compiling|bug|bugs|debug|debugging|traceback"
    r"|stack\s+trace|syntax\s+error|segfault|refactor|unit\s+tests?|algorithm)\b"
    r"|(?<!\w)c(?:\+\+|#)(?!\w)",
    re.IGNORECASE,
)
# Definitions and statements such as `foo(x):`, `foo(x);`, `x => y`, `a[i] = 1`.
_CODE_SHAPES = re.compile(r"\w\([^()\n]*\)\s*(?:[:{;]|->)|=>|\w::\w|\)\s*\{|\w\[\w*\]\s*=[^=]")


def looks_like_code(text: str) -> bool:
    """A cheap guess whether the prompt (or last user message) is about code."""
    if "```" in text or _CODE_LINE.search(text):
        return True
    # Braces with semicolons: C, Java, JavaScript and their kin, even without a keyword at a line start.
    if "{" in text and "}" in text and ";" in text:
        return True
    return bool(_CODE_WORDS.search(text) or _CODE_SHAPES.search(text))


def pick_model(requested: str, text: str, models: Mapping[str, Collection[str]]) -> str | None:
    """models: name -> tags. A concrete name is returned if served, else None. "auto": a model tagged "code" for code,
    one tagged "chat" otherwise; falling back to the other tag, then to the first model; None when there are no models.
    """
    if requested != AUTO:
        return requested if requested in models else None
    if not models:
        return None
    wanted = ("code", "chat") if looks_like_code(text) else ("chat", "code")
    for tag in wanted:
        for name, tags in models.items():
            if tag in tags:
                return name
    return next(iter(models))
