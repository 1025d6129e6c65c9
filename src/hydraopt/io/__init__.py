"""Edges of the library: PEFT adapter dirs and bundles in and out."""
