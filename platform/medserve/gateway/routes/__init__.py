"""One module per protocol the gateway speaks."""
