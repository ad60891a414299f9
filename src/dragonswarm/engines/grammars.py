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

from dragonswarm.protocol.runner import TOOL_CALL_CLOSE, TOOL_CALL_OPEN

SchemaToGbnf = Callable[[str], str]


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


def tool_call_grammar(tools: list[dict[str, Any]], name: str | None, to_gbnf: SchemaToGbnf,
                      many: bool = False) -> str:  # fmt: skip
    """`<tool_call>{"name": ..., "arguments": {...}}</tool_call>` and nothing else: each call
    names one of the tools (or `name`) with arguments matching its parameters. Exactly one
    unless `many`: a grammar that forces calls and allows more would let a model that never
    stops write calls until max_tokens. A model free to choose (tool_choice auto) gets `many`,
    applied only once it starts a call."""
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
    call = f'"{TOOL_CALL_OPEN}\\n" dragon-call "\\n{TOOL_CALL_CLOSE}"'
    more = f' ("\\n" {call})*' if many else ""
    return f"root ::= {call}{more}\n{body}"
