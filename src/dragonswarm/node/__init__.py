"""The node: serves its owner's requests on this machine, inside its share."""
