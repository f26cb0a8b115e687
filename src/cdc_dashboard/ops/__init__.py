"""Operator tools: `doctor` with its end-to-end `probe`, and the `dead-letters` commands."""
