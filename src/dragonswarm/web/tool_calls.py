"""Tool calls out of what a model wrote: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`,
the form Qwen's and Hermes' chat templates teach their models.

Small models often drop the markers and answer with the bare object; an answer that is
nothing but `{"name": ..., "arguments": ...}` (fenced or not) naming one of the offered
tools counts as a call too, as it does in llama.cpp's server.

Pure and incremental: a stream's text passes through until a call may have started; from
there it is held, and parsed into OpenAI `tool_calls` when the choice ends.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Collection
from typing import Any

from dragonswarm.protocol.runner import TOOL_CALL_CLOSE as CLOSE
from dragonswarm.protocol.runner import TOOL_CALL_OPEN as OPEN


def parse_tool_calls(text: str, names: Collection[str]) -> tuple[str | None, list[dict[str, Any]]]:
    """(content, calls) for a model offered the tools `names`. Text that is not a well-formed
    call stays content, so nothing the model wrote is lost; content is None when the model
    only called tools."""
    head, sep, rest = text.partition(OPEN)
    if not sep:
        body = _unfence(text)
        bare = _call(body) if '"arguments"' in body else None
        if bare is not None and _name(bare) in names:
            return None, [bare]
        return text, []
    calls = []
    for block in (OPEN + rest).split(OPEN)[1:]:
        body, _, after = block.partition(CLOSE)  # a last call the model left unclosed still counts
        call = _call(body)
        if call is None or after.strip():
            return text, []  # not a clean sequence of calls: hand it back as it was written
        calls.append(call)
    content = head.strip()
    return content or None, calls


def _unfence(text: str) -> str:
    body = text.strip()
    if body.startswith("```"):
        body = body.removeprefix("```json").removeprefix("```").removesuffix("```").strip()
    return body if body.startswith("{") else ""


def _name(call: dict[str, Any]) -> str:
    return str(call["function"]["name"])


def _call(body: str) -> dict[str, Any] | None:
    try:
        data = json.loads(body, strict=False)  # a raw control character in a string is still meant as text
    except ValueError:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        return None
    arguments = data.get("arguments", {})
    if isinstance(arguments, str):  # some models write the arguments as JSON text already
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": data["name"], "arguments": json.dumps(arguments, ensure_ascii=False)}}  # fmt: skip


class ToolCallStream:
    """Streamed text in, content safe to send now out; the calls come at `finish()`."""

    def __init__(self, names: Collection[str]) -> None:
        self.names = names
        self._held = ""
        self._in_call = False
        self._started = False  # some content went out: a bare call is no longer possible

    def feed(self, text: str) -> str:
        if self._in_call:
            self._held += text
            return ""
        buf = self._held + text
        if not self._started:
            lead = buf.lstrip()
            if not lead or "```".startswith(lead) or lead.startswith(("{", "```")):  # maybe a bare call: hold it
                self._held = buf
                self._in_call = lead.startswith(("{", "```"))
                return ""
            self._started = True
        at = buf.find(OPEN)
        if at >= 0:
            self._in_call = True
            self._held = buf[at:]
            return buf[:at]
        keep = next((k for k in range(min(len(OPEN) - 1, len(buf)), 0, -1) if buf.endswith(OPEN[:k])), 0)
        self._held = buf[len(buf) - keep :]
        return buf[: len(buf) - keep]

    def finish(self) -> tuple[str, list[dict[str, Any]]]:
        """(text still to send as content, calls)."""
        held, self._held = self._held, ""
        if not self._in_call:
            return held, []
        content, calls = parse_tool_calls(held, self.names)
        return ("" if calls else content or ""), calls
