"""Zarr storage: image groups, chunk I/O and caches, and result stores."""
