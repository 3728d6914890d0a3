"""Filesystem primitives of the ground floor: atomic, umask-respecting writes."""
