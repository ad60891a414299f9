"""Pure scheduling decisions: placement, fair queueing, model choice, local-first serving."""
