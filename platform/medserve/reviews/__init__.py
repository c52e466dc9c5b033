"""Clinician sign-off of AI results: every result is a draft until reviewed."""
