"""Grammars (llama.cpp's GBNF) that hold the output to a shape: JSON, JSON matching a
schema, or a tool call in the `<tool_call>` form that Qwen's and Hermes' templates teach.

Pure text work: the JSON-schema converter is passed in (llama.cpp's own, from the
runner), so these functions run and are tested without loading a model.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

SchemaToGbnf = Callable[[str], str]

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"

# Any JSON object, as llama.cpp's json.gbnf, with whitespace bounded so a model cannot
# pad the answer with blank lines until max_tokens.
JSON_OBJECT = r"""
root   ::= object
value  ::= object | array | string | number | ("true" | "false" | "null") ws
object ::= "{" ws ( string ":" ws value ("," ws string ":" ws value)* )? "}" ws
array  ::= "[" ws ( value ("," ws value)* )? "]" ws
string ::= "\"" ( [^"\\\x7F\x00-\x1F] | "\\" (["\\bfnrt] | "u" [0-9a-fA-F]{4}) )* "\"" ws
number ::= ("-"? ([0-9] | [1-9] [0-9]{0,15})) ("." [0-9]+)? ([eE] [-+]? [0-9] [1-9]{0,15})? ws
ws ::= | " " | "\n" [ \t]{0,20}
"""


def json_grammar(schema: dict[str, Any], to_gbnf: SchemaToGbnf) -> str:
    """Output that parses as JSON and matches `schema` ({"type": "object"}: any object)."""
    if schema in ({}, {"type": "object"}):
        return JSON_OBJECT
    return to_gbnf(json.dumps(schema))


def tool_call_grammar(tools: list[dict[str, Any]], name: str | None, to_gbnf: SchemaToGbnf) -> str:
    """Exactly one `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` and nothing else:
    the call names one of the tools (or `name`) with arguments matching its parameters.
    One, because a grammar that allowed more would let a model that never stops calling
    write calls until max_tokens; a model free to choose (tool_choice auto) may call several."""
    calls = []
    for tool in tools:
        function = tool["function"]
        if name is not None and function["name"] != name:
            continue
        calls.append({
            "type": "object",
            "properties": {"name": {"const": function["name"]},
                           "arguments": function.get("parameters") or {"type": "object"}},
            "required": ["name", "arguments"],
        })  # fmt: skip
    if not calls:
        raise ValueError(f"no tool named {name!r}")
    schema = calls[0] if len(calls) == 1 else {"oneOf": calls}
    # The converter names its start rule `root`; ours wraps it in the template's markers.
    body = re.sub(r"^root ::=", "dragon-call ::=", to_gbnf(json.dumps(schema)), count=1, flags=re.MULTILINE)
    return f'root ::= "{TOOL_CALL_OPEN}\\n" dragon-call "\\n{TOOL_CALL_CLOSE}"\n{body}'
