"""The gateway: the only door to a model. Authenticates, audits, meters, routes."""
