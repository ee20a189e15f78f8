"""The memorybank store: teacher outputs indexed by sample key, in Zarr v3 (default) or HDF5.

    from stores import MemoryBank, StoreSchema, Provenance
    bank = MemoryBank.open("mb.zarr", mode="r")
    arrays, missing = bank.get_batch(keys, fields=("actions", "bev_vec"))

See docs/STORE.md for the layout, the writer protocol and the concurrent-writer alignment rule.
"""
from stores.base import MemoryBank, bev_feat_shard_rows, default_shard_rows
from stores.schema import (ALL_FIELDS, BEV_FEAT, LIGHT_FIELDS, Provenance, StoreMismatchError,
                           StoreSchema)

__all__ = ["MemoryBank", "StoreSchema", "Provenance", "StoreMismatchError", "LIGHT_FIELDS", "BEV_FEAT",
           "ALL_FIELDS", "default_shard_rows", "bev_feat_shard_rows"]
