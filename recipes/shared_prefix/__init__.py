"""Shared-structure prefix tuning recipe (see README.md)."""
