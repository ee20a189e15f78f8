"""The retrieval index inside a memorybank (``<store>/retrieval/<name>/``): for a camera sample without a paired
LiDAR key, the teacher's most similar situations by cosine similarity of caller-built vectors.

    from stores.retrieval import RetrievalIndex, build_index, append_index, verify_indexes

Its command line is ``python -m pipelines.retrieval_index build|query|verify`` (``e2r.workflow.retrieval_index``).

Modules: `index` (RetrievalIndex: exact / faiss search, exclusion; build, append, verify), `layout` (the
on-disk layout: checksummed chunked arrays, manifest, checks against the store), `faiss_index` (faiss back
ends and their measured parameters).
"""
from stores.retrieval.index import KINDS, RetrievalIndex, append_index, build_index, list_indexes, verify_indexes
from stores.retrieval.layout import load_inputs

__all__ = ["KINDS", "RetrievalIndex", "build_index", "append_index", "verify_indexes", "list_indexes", "load_inputs"]
