"""Assemble: decide when a study is complete (association release, quiet timer, count evidence)."""
