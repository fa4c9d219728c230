"""Imports every pass module so that each registers itself."""

from passes import cleanup, fuse_parallel_block, insert_collectives, pad_heads, quantize_int8, shard

__all__ = ["cleanup", "fuse_parallel_block", "insert_collectives", "pad_heads", "quantize_int8", "shard"]
