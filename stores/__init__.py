"""The memorybank store: teacher outputs indexed by sample key, in Zarr v3 (default) or HDF5.

    from stores import open_memorybank, create_memorybank, StoreSchema, Provenance
    bank = open_memorybank("mb.zarr", mode="r")   # or "s3://bucket/mb.zarr" (storage_options=, cache_dir=)
    arrays, missing = bank.get_batch(keys, fields=("actions", "bev_vec"))
    ds = open_dataset("mb.zarr")          # an xarray.Dataset (key, t, ...) of the complete rows (needs xarray)

Package layout: `stores.abc` (the abstract `MemoryBank`), `stores.zarr_v3.store` / `stores.hdf5_store` (back
ends), `stores.factory` (picks one for a path), `stores.errors` (`StoreError` and its subclasses).
See docs/STORE.md for the layout, the writer protocol and the concurrent-writer alignment rule.
"""
from stores.abc import MemoryBank
from stores.dataset_view import open_dataset
from stores.errors import (NotAMemoryBankError, StoreCorruptError, StoreError, StoreMismatchError,
                           StoreReadOnlyError, StoreVersionError, UnsupportedLayout)
from stores.factory import (backend_for, create_memorybank, memorybank_exists, open_memorybank, remove_memorybank,
                            stored_bytes)
from stores.layout import bev_feat_shard_rows, default_shard_rows
from stores.schema import ALL_FIELDS, BEV_FEAT, LIGHT_FIELDS, Provenance, StoreSchema

__all__ = ["MemoryBank", "open_memorybank", "open_dataset", "create_memorybank", "memorybank_exists", "backend_for",
           "remove_memorybank", "stored_bytes",
           "StoreSchema", "Provenance", "StoreError", "StoreMismatchError", "NotAMemoryBankError",
           "StoreReadOnlyError", "UnsupportedLayout", "StoreCorruptError", "StoreVersionError", "LIGHT_FIELDS",
           "BEV_FEAT", "ALL_FIELDS", "default_shard_rows", "bev_feat_shard_rows"]
