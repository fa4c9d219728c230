"""Imports every pass module so that each registers itself."""

from passes import (cleanup, collective_einsum, fuse_parallel_block, insert_collectives, pad_dims, pad_heads,
                    pipeline_stages, quantize_int8, shard)

__all__ = ["cleanup", "collective_einsum", "fuse_parallel_block", "insert_collectives", "pad_dims", "pad_heads",
           "pipeline_stages", "quantize_int8", "shard"]
