"""How much of the machine the node may use: sampling, policy and enforcement."""
