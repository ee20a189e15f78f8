"""The memorybank store: teacher outputs indexed by sample key, in Zarr v3 (default) or HDF5.

    from stores import open_memorybank, create_memorybank, StoreSchema, Provenance
    bank = open_memorybank("mb.zarr", mode="r")   # or "s3://bucket/mb.zarr" (storage_options=, cache_dir=)
    arrays, missing = bank.get_batch(keys, fields=("actions", "bev_vec"))
    ds = open_dataset("mb.zarr")          # an xarray.Dataset (key, t, ...) of the complete rows (needs xarray)

Package layout: `stores.abc` (the abstract `MemoryBank` on its plain base), the back ends `stores.zarr_v3`,
`stores.remote` (Zarr on object storage), `stores.hdf5_store`; `stores.factory` (picks one for a path),
`stores.keys` (the key grammar), `stores.errors` (`StoreError` and its subclasses), `stores.retrieval` (the
retrieval index inside a store, CLI ``python -m pipelines.retrieval_index``); the store CLI ``python -m stores``.
See docs/STORE.md for the layout, the writer protocol and the concurrent-writer alignment rule.
"""
from stores.abc import MemoryBank
from stores.abc.inspection import Inspection
from stores.dataset_view import open_dataset
from stores.errors import (NotAMemoryBankError, StoreCorruptError, StoreError, StoreMismatchError,
                           StoreReadOnlyError, StoreStaleError, StoreVersionError, UnsupportedLayout)
from stores.factory import (backend_for, create_memorybank, is_memorybank, memorybank_exists, open_memorybank,
                            remove_memorybank, stored_bytes)
from stores.layout import bev_feat_shard_rows, default_shard_rows
from stores.hdf5_store import HDF5MemoryBank
from stores.remote import RemoteZarrMemoryBank
from stores.schema import ALL_FIELDS, BEV_FEAT, DEPTH, DEPTH_NONE, LIGHT_FIELDS, Provenance, StoreSchema
from stores.zarr_v3 import ZarrMemoryBank

__all__ = ["MemoryBank", "ZarrMemoryBank", "HDF5MemoryBank", "RemoteZarrMemoryBank", "Inspection", "open_memorybank", "open_dataset", "create_memorybank", "memorybank_exists", "is_memorybank", "backend_for",
           "remove_memorybank", "stored_bytes",
           "StoreSchema", "Provenance", "StoreError", "StoreMismatchError", "NotAMemoryBankError",
           "StoreReadOnlyError", "UnsupportedLayout", "StoreCorruptError", "StoreVersionError", "StoreStaleError",
           "LIGHT_FIELDS",
           "BEV_FEAT", "DEPTH", "DEPTH_NONE", "ALL_FIELDS", "default_shard_rows", "bev_feat_shard_rows"]
