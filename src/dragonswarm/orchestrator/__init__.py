"""The orchestrator: keys, the registry of live nodes, the fair queue, fragments and failover."""
