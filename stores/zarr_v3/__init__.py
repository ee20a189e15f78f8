"""The Zarr v3 back end of the memorybank (the default): a directory of checksummed, sharded arrays.

Modules: `store` (`ZarrMemoryBank`: the back end, its checked reads, fsync, data presence), `checks` (what
it checks on open and write: file presence, bad chunks, completion flags vs data), `row_reader`
(`RowChunkReader`: the hot-path row reader, crc32c before decode), `shard_codec` (whole shards encoded in
bulk, byte-identical to zarr-python, crash-safe), `flat_chunks` (keys / completion chunks without
zarr-python).
"""
from stores.zarr_v3.row_reader import RowChunkReader
from stores.zarr_v3.store import ZarrMemoryBank

__all__ = ["ZarrMemoryBank", "RowChunkReader"]
