"""Reproductions of the source talks' experiments."""
