"""Imports every pass module so that each registers itself."""

from passes import cleanup, collective_einsum, fuse_parallel_block, insert_collectives, pad_dims, pad_heads, quantize_int8, shard

__all__ = ["cleanup", "collective_einsum", "fuse_parallel_block", "insert_collectives", "pad_dims", "pad_heads", "quantize_int8", "shard"]
from passes import pipeline_stages  # noqa: E402  registers pipeline-stages
