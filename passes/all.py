"""Imports every pass module so that each registers itself."""

from passes import cleanup, insert_collectives, pad_heads, shard

__all__ = ["cleanup", "insert_collectives", "pad_heads", "shard"]
