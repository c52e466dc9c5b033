"""The `medserve` command line."""
