"""The Zarr memorybank on object storage (``s3://``, any fsspec URL).

Modules: `store` (`RemoteZarrMemoryBank`: the bank over objects, its reads and whole-object writes),
`objstore` (`ObjectFiles`: the objects, listing, ranged GETs, conditional puts), `reader` (ranged row reader),
`writes` (creating a store from whole objects), `cache` (`ShardCache`: the local LRU cache of fetched
chunks), `local_s3` (a local S3 server for tests and benches; needs moto).
"""
from stores.remote.cache import ShardCache
from stores.remote.objstore import ObjectFiles, is_remote, parse_storage_options
from stores.remote.store import RemoteZarrMemoryBank

__all__ = ["RemoteZarrMemoryBank", "ObjectFiles", "ShardCache", "is_remote", "parse_storage_options"]
