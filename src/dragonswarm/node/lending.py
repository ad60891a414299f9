"""The owner's switch for lending this machine to the swarm, kept in the node's home.

Paused, the node takes no new work for others: its heartbeats say so, the orchestrator
places nothing there, and a `run` that crosses the switch on the way is handed back for
another worker. Fragments already running for others finish normally, and the owner's
own requests (served here or handed to the swarm) are not affected. The switch survives
a restart: an owner who paused expects the machine to stay out until they say otherwise.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dragonswarm.secrets_file import write_private

log = logging.getLogger("dragonswarm.lending")


@dataclass
class Lending:
    path: Path  # where the switch is kept (`NodeSettings.lending_path`)
    paused: bool = False
    since: float | None = None  # wall clock of the last switch; None: never switched
    saved: bool = True  # False: the last switch could not be written, it holds until the node stops

    @classmethod
    def load(cls, path: Path) -> Lending:
        """The switch as the owner last set it; lending when they never did."""
        try:
            data = json.loads(path.read_text())
            paused, since = data["paused"], data.get("since")
            if not isinstance(paused, bool) or not isinstance(since, float | int | None):
                raise ValueError(f"not a switch: {data!r}")
            lending = cls(path, paused=paused, since=since)
        except FileNotFoundError:
            return cls(path)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            # The file exists only because the owner switched: when it cannot be read, stay out
            # of the swarm rather than lend against a wish we cannot read.
            log.warning("cannot read the lending switch in %s (%s): lending stays paused until the owner "
                        "switches it again", path, exc)  # fmt: skip
            return cls(path, paused=True)
        if lending.paused:
            log.info("lending to the swarm is paused (kept in %s): no work for others is taken", path)
        return lending

    def set(self, paused: bool) -> None:
        """Switch lending, keep the switch, and say so in the log when it changed."""
        if paused != self.paused:
            self.paused, self.since = paused, time.time()
            if paused:
                log.info("lending to the swarm paused by the owner: fragments running for others finish, "
                         "no new ones are taken")  # fmt: skip
            else:
                log.info("lending to the swarm resumed by the owner")
        try:
            # Written whole and renamed: a crash mid-write leaves the previous switch, never half of one.
            write_private(self.path, json.dumps({"paused": self.paused, "since": self.since}).encode())
            self.saved = True
        except OSError as exc:  # the switch still holds now: the owner's wish is not refused for a full disk
            self.saved = False
            log.error("cannot keep the lending switch in %s (%s): it holds until the node stops", self.path, exc)

    def status(self) -> dict[str, Any]:
        return {"paused": self.paused, "since": self.since, "saved": self.saved}
