"""The audit trail: one record per inference request, written off the hot path."""
