"""Composition root: the fedgate CLI and the local launcher."""
