"""The clinician's review console: server-rendered pages the gateway serves under /console."""
