"""The control plane: specs + registry -> one Ray Serve config -> a target."""
