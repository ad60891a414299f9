"""HTTP plumbing shared by the node's and the orchestrator's APIs (they never import each other)."""
