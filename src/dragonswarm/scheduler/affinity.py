"""Prompt-cache affinity: send a conversation's next turn to the worker whose KV cache
already holds its beginning.

A runner keeps the KV cache of the last prompt it evaluated, and the next prompt reuses
the longest prefix it shares with it. So the worker that served a conversation last
reads only the new turn, while any other worker reads the whole history again. Pure
bookkeeping, tested with plain values: the swarm records what each node evaluated last
and asks which node holds the longest prefix of a new request.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import orjson

from dragonswarm.protocol.runner import Generation

MAX_KEYS = 64  # prefixes remembered per request: enough for long chats, bounded for huge ones
TEXT_BLOCK = 256  # a completion prompt's prefixes are taken every this many characters


def prefix_keys(gen: Generation) -> list[bytes]:
    """Digests of the request's prompt prefixes, shortest first: for chat, the first k
    messages; for a completion, the prompt cut at block boundaries."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(orjson.dumps(gen.tools) if gen.tools else b"")  # tools are rendered before the messages
    keys = []
    if gen.messages is not None:
        for message in gen.messages:
            digest.update(orjson.dumps(message, option=orjson.OPT_SORT_KEYS))
            keys.append(digest.copy().digest())
    elif gen.prompt:
        # An IDE's next completion in the same file shares the code before the cursor; a
        # fill-in-the-middle prompt starts with it too, after its own first token.
        digest.update(b"fim" if gen.suffix is not None else b"")
        text = gen.prompt.encode()
        for end in range(TEXT_BLOCK, len(text) + 1, TEXT_BLOCK):
            digest.update(text[end - TEXT_BLOCK : end])
            keys.append(digest.copy().digest())
    return keys[-MAX_KEYS:]


class CacheAffinity:
    """Which node evaluated which prompt prefixes last, per model file."""

    def __init__(self) -> None:
        self._holder: dict[tuple[str, bytes], str] = {}  # (model key, prefix) -> node
        self._last: dict[tuple[str, str], list[bytes]] = {}  # (node, model key) -> its last prefixes

    def record(self, node: str, model: str, keys: list[bytes]) -> None:
        """`node` now holds these prefixes of `model` in its cache, and no others."""
        for key in self._last.pop((node, model), ()):
            if self._holder.get((model, key)) == node:
                del self._holder[(model, key)]
        if keys:
            self._last[(node, model)] = keys
            for key in keys:
                self._holder[(model, key)] = node

    def holders(self, model: str, keys: list[bytes]) -> Iterable[str]:
        """Nodes holding a prefix of the request, the longest prefix first."""
        for key in reversed(keys):
            node = self._holder.get((model, key))
            if node is not None:
                yield node

    def forget(self, node: str) -> None:
        """The node left: its cache is gone."""
        for node_model in [k for k in self._last if k[0] == node]:
            self.record(node, node_model[1], [])

    def __len__(self) -> int:
        return len(self._holder)
