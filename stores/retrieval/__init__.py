"""The retrieval index inside a memorybank (``<store>/retrieval/<name>/``): for a camera sample without a paired
LiDAR key, the teacher's most similar situations by cosine similarity of caller-built vectors.

    from stores.retrieval import RetrievalIndex, build_index, append_index, verify_indexes
    python -m stores.retrieval build|query|verify STORE ...     # its one command line (stores.retrieval.__main__)

Modules: `index` (RetrievalIndex: exact / faiss search, exclusion; build, append, verify), `layout` (the
on-disk layout: checksummed chunked arrays, manifest, checks against the store), `faiss_index` (faiss back
ends and their measured parameters).
"""
from stores.retrieval.index import KINDS, RetrievalIndex, append_index, build_index, list_indexes, verify_indexes

__all__ = ["KINDS", "RetrievalIndex", "build_index", "append_index", "verify_indexes", "list_indexes"]
