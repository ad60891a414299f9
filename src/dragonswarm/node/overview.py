"""What this node says about itself: one dict, built in one place, for `GET /v1/node`, its
event stream (the node's page) and the gauges of `GET /metrics`."""

from __future__ import annotations

from typing import Any

from dragonswarm.node.lending import Lending
from dragonswarm.node.link import SwarmLink
from dragonswarm.node.service import NodeService


def overview(service: NodeService, link: SwarmLink | None, lending: Lending) -> dict[str, Any]:
    """The machine (governor), the owner's lending switch, the swarm link, what was served here, the models."""
    swarm = None
    if link is not None:
        swarm = {"orchestrator": link.url, "connected": link.connected, "refused": link.refused,
                 "fragments_running": link.running, "network": link.network_status()}  # fmt: skip
    return {"name": service.settings.name, "governor": service.governor.status(), "lending": lending.status(),
            "swarm": swarm, "served": service.metrics.totals(), **service.status()}  # fmt: skip
