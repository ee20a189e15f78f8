"""The abstract memorybank interface (like ``zarr.abc``): `MemoryBank` holds the reader/writer API, on its plain
base `StoreBase` (state, abstract back-end primitives, key side); back ends (`stores.zarr_v3.store`,
`stores.hdf5_store`) implement the primitives, and
`stores.factory` picks one for a path. Nothing here imports a back end."""
from stores.abc.store import MemoryBank

__all__ = ["MemoryBank"]
