"""The node's local-first decision: run the owner's request here, or hand it to the orchestrator."""

from __future__ import annotations


def serve_locally(*, has_model: bool, busy: bool, owner_busy: bool, linked: bool) -> bool:
    """True: run the owner's request here. False: hand it to the orchestrator.

    Not linked to an orchestrator: always local (serve what we can; errors are reported locally).
    Linked: local only when the model is here, its runner is free (not busy) and the owner's other
    programs are not busy.
    """
    if not linked:
        return True
    return has_model and not busy and not owner_busy
