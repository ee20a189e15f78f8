"""The objects of one store on object storage (``s3://bucket/path.zarr`` or any fsspec URL), through fsspec.

`ObjectFiles` is the only place that talks to the object store: whole-object reads (metadata, flag and key
chunks, key index files), concurrent ranged reads (``cat_ranges``: the inner chunks of the rows asked for,
adjacent ranges merged), one listing of the whole store (size and ETag of every object: which shards exist,
their sizes, and the identity of each object for the local cache), and whole-object writes / deletes, and
"put if absent" (`ObjectFiles.put_if_absent`: S3's conditional PUT, ``If-None-Match: *``) for creation.

Fork safety: the fsspec filesystem (s3fs holds an event loop on a thread) is created lazily, on first use
in a process, and created again when the process id changed (a forked DataLoader worker or dask task never
uses its parent's loop); pickling drops it. Credentials and endpoint come from ``storage_options`` (fsspec's
keyword arguments of the protocol's filesystem, e.g. ``{"endpoint_url": ..., "key": ..., "secret": ...}``)
and, for S3, from the usual environment variables (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``, ``AWS_PROFILE``) or fsspec's ``FSSPEC_S3_*``.
Every failure of the store's service becomes a `StoreError` that names the URL and what to check.
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import fsspec

from stores.errors import StoreError, StoreReadOnlyError
from stores.fsio import publish, remove_path, temp_sibling

LOCAL_PROTOCOLS = ("", "file", "local")
# pipe_file(mode="create") is an atomic exclusive create there: s3fs sends PutObject with ``If-None-Match: *``
# (AWS S3 since 2024-08, MinIO, moto), fsspec's memory:// opens "xb" under its lock.
CONDITIONAL_PROTOCOLS = ("s3", "s3a", "memory")
CONFLICT_RETRIES = 5                   # S3 answers 409 ConditionalRequestConflict to a put racing another: retry


class Entry(NamedTuple):
    """One listed object: its size in bytes and a tag that changes when it is replaced (ETag, else mtime)."""

    size: int
    tag: str


def protocol_of(path: str | os.PathLike) -> str:
    s = str(path)
    return s.split("://", 1)[0].lower() if "://" in s else ""


def is_remote(path: str | os.PathLike) -> bool:
    """True for a URL of an fsspec protocol other than the local file system (``s3://``, ``gs://``, ...)."""
    return protocol_of(path) not in LOCAL_PROTOCOLS


def parse_storage_options(text: str | None) -> dict[str, Any]:
    """``--storage_options`` (a JSON object, '' or None) -> dict; ValueError with an example otherwise."""
    if not text:
        return {}
    try:
        got = json.loads(text)
    except ValueError as e:
        got = e
    if not isinstance(got, dict):
        raise ValueError(f"--storage_options must be a JSON object, e.g. '{{\"endpoint_url\": "
                         f"\"http://127.0.0.1:9000\", \"key\": \"...\", \"secret\": \"...\"}}', got {text!r}")
    return got


def _s3_code(e: BaseException) -> str:
    """The S3 error code behind an s3fs exception (its botocore cause), '' when there is none."""
    for x in (e, e.__cause__):
        got = getattr(x, "response", None)
        if isinstance(got, dict):
            return str(got.get("Error", {}).get("Code", ""))
    return ""


def _entry(info: Mapping[str, Any]) -> Entry:
    tag = info.get("ETag") or info.get("etag") or info.get("md5Hash") or info.get("LastModified") \
        or info.get("mtime") or info.get("last_modified") or info.get("created") or ""
    return Entry(int(info.get("size") or 0), str(tag))


class ObjectFiles:
    """The objects under ``url`` (a store), addressed by store-relative names (``"light/c/3/0/0"``).

    ``counts`` tallies requests made by this process (``list``, ``get``, ``range`` (merged ranges),
    ``head``, ``put``, ``delete``) and ``bytes_in``: tests and benchmarks read it.
    """

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None = None) -> None:
        self.url = str(url).rstrip("/")
        self.protocol = protocol_of(self.url)
        self.storage_options = dict(storage_options or {})
        self.counts: dict[str, int] = {k: 0 for k in ("list", "get", "range", "head", "put", "delete", "bytes_in")}
        self._fs: Any = None
        self._pid = -1
        self._root = ""
        self.conditional = self.protocol in CONDITIONAL_PROTOCOLS or self.protocol in LOCAL_PROTOCOLS

    def __getstate__(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["_fs"], d["_pid"] = None, -1
        return d

    def _fs_class(self) -> type:
        try:
            return fsspec.get_filesystem_class(self.protocol)
        except ValueError as e:                # fsspec knows no such protocol
            raise ValueError(f"{self.url}: {e} (a store is a local path or an fsspec URL such as "
                             "s3://bucket/mb.zarr)") from None
        except ImportError as e:
            raise ImportError(f"{self.url}: {e}. Object-store support is an optional extra: "
                              "pip install 'e2r-kd[s3]'") from None

    @property
    def fs(self) -> Any:
        """This process's filesystem (created on first use, and again after a fork)."""
        if self._fs is None or self._pid != os.getpid():
            self._fs_class()                       # a clear ImportError when the protocol's package is missing
            with self._guard("connect"):
                self._fs = fsspec.filesystem(self.protocol, skip_instance_cache=True, **self.storage_options)
            self._pid = os.getpid()
        return self._fs

    def path(self, rel: str) -> str:
        """The filesystem path of the store object ``rel``."""
        if not self._root:
            self._root = self._fs_class()._strip_protocol(self.url).rstrip("/")
        return f"{self._root}/{rel}" if rel else self._root

    def name(self, rel: str) -> str:
        return f"{self.url}/{rel}"

    @contextlib.contextmanager
    def _guard(self, what: str, write: bool = False) -> Iterator[None]:
        """Turn the object store's errors into StoreErrors naming the URL and what to check."""
        try:
            yield
        except (StoreError, FileNotFoundError, ImportError):
            raise
        except PermissionError as e:
            cls = StoreReadOnlyError if write else StoreError
            raise cls(f"cannot {what} in {self.url}: access denied ({e}). Check the credentials "
                      "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_PROFILE, or --storage_options "
                      "'{\"key\": ..., \"secret\": ...}')" + ("; nothing was changed by this step" if write else "")
                      ) from None
        except TypeError as e:                 # s3fs builds its session lazily: a bad option shows up here
            raise StoreError(f"cannot {what} in {self.url}: the {self.protocol} filesystem does not take the storage "
                             f"options {sorted(self.storage_options)} ({e}); fix --storage_options") from None
        except Exception as e:  # noqa: BLE001 - connection / service errors of any fsspec back end
            raise StoreError(f"cannot {what} in {self.url}: {type(e).__name__}: {e}. Check that the object store "
                             "is reachable (AWS_ENDPOINT_URL or --storage_options '{\"endpoint_url\": ...}') and "
                             "the bucket exists") from None

    # ------------------------------------------------------------------ reads
    def listing(self) -> dict[str, Entry]:
        """``{relative name: Entry}`` of every object under the store (one recursive listing)."""
        self.counts["list"] += 1
        with self._guard("list the objects"):
            self.fs.invalidate_cache()             # a listing is always read now, never from fsspec's cache
            found = self.fs.find(self.path(""), detail=True)
        root = self.path("") + "/"
        return {name[len(root):]: _entry(info) for name, info in found.items()
                if name.startswith(root) and info.get("type", "file") == "file"}

    def get(self, rel: str) -> bytes | None:
        """The whole object ``rel``, None when it does not exist."""
        self.counts["get"] += 1
        try:
            with self._guard(f"read {rel}"):
                raw = self.fs.cat_file(self.path(rel))
        except FileNotFoundError:
            return None
        self.counts["bytes_in"] += len(raw)
        return raw

    def info(self, rel: str) -> Entry | None:
        """The object's Entry read now (one HEAD), None when it does not exist."""
        self.counts["head"] += 1
        try:
            with self._guard(f"look up {rel}"):
                self.fs.invalidate_cache(self.path(rel))
                return _entry(self.fs.info(self.path(rel)))
        except FileNotFoundError:
            return None

    def get_ranges(self, reqs: Sequence[tuple[str, int, int]]) -> list[bytes | None]:
        """The bytes ``[start, end)`` of each ``(rel, start, end)``, fetched concurrently (fsspec
        ``cat_ranges``; ranges that touch in the same object are merged into one request). None for a range
        of an object that does not exist; a range the object is too short for comes back short."""
        order = sorted(range(len(reqs)), key=lambda k: reqs[k])
        merged: list[list[Any]] = []            # [rel, start, end, [request indices]]
        for k in order:
            rel, a, b = reqs[k]
            if merged and merged[-1][0] == rel and merged[-1][1] <= a <= merged[-1][2]:
                merged[-1][2] = max(merged[-1][2], b)
                merged[-1][3].append(k)
            else:
                merged.append([rel, a, b, [k]])
        if not merged:
            return []
        self.counts["range"] += len(merged)
        with self._guard(f"read {len(reqs)} chunk range(s)"):
            blobs = self.fs.cat_ranges([self.path(m[0]) for m in merged], [m[1] for m in merged],
                                       [m[2] for m in merged], on_error="return")
        out: list[bytes | None] = [None] * len(reqs)
        for (rel, a, _, members), blob in zip(merged, blobs):
            if isinstance(blob, FileNotFoundError):
                continue
            if isinstance(blob, BaseException):
                with self._guard(f"read {rel}"):
                    raise blob
            self.counts["bytes_in"] += len(blob)
            view = memoryview(blob)
            for k in members:
                out[k] = bytes(view[reqs[k][1] - a:reqs[k][2] - a])
        return out

    # ------------------------------------------------------------------ writes
    def put(self, rel: str, data: bytes | bytearray | memoryview) -> None:
        """Write the whole object ``rel`` (one PUT: readers see the old or the new object, whole)."""
        self.counts["put"] += 1
        with self._guard(f"write {rel}", write=True):
            self.fs.pipe_file(self.path(rel), bytes(data))

    def put_if_absent(self, rel: str, data: bytes | bytearray | memoryview) -> bool:
        """Write the whole object ``rel`` only if no object of that name exists: True when this call wrote it,
        False when one existed (its bytes are left as they are).

        Atomic (of two racing writers exactly one gets True) where the filesystem has an exclusive create:
        S3 and S3-compatible services (s3fs ``pipe_file(mode="create")``: PutObject with ``If-None-Match: *``;
        412 PreconditionFailed -> False; a 409 ConditionalRequestConflict is retried), fsspec's memory://,
        and local files (a temporary sibling hard-linked to the name: ``link`` never replaces). Elsewhere
        (gcs, azure, http, ... : ``conditional`` is False) and on a service that answers the condition with
        501 NotImplemented, it is a lookup then a plain put: two writers racing between the two both write and
        the later one wins, as before conditional puts. A service that silently ignores ``If-None-Match``
        (some older S3-compatible servers) behaves the same way; nothing here can detect it."""
        data = bytes(data)
        if self.protocol in LOCAL_PROTOCOLS:
            return self._link_new(rel, data)
        if self.conditional:
            for attempt in range(CONFLICT_RETRIES):
                self.counts["put"] += 1
                with self._guard(f"write {rel}", write=True):
                    try:
                        self.fs.pipe_file(self.path(rel), data, mode="create")
                        return True
                    except FileExistsError:
                        return False
                    except OSError as e:
                        code = _s3_code(e)
                        if code == "ConditionalRequestConflict" and attempt + 1 < CONFLICT_RETRIES:
                            time.sleep(0.05 * 2 ** attempt)
                            continue
                        if code != "NotImplemented":
                            raise
                self.conditional = False                  # the service has no conditional PUT: the fallback
                break
        if self.info(rel) is not None:
            return False
        self.put(rel, data)
        return True

    def _link_new(self, rel: str, data: bytes) -> bool:
        """put_if_absent on the local file system: the bytes in a temporary sibling, linked to the name."""
        self.counts["put"] += 1
        path = self.path(rel)
        with self._guard(f"write {rel}", write=True):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = temp_sibling(path)
            try:
                with open(tmp, "xb") as f:
                    f.write(data)
                return publish(tmp, path)
            finally:
                remove_path(tmp)

    def delete(self, rels: Sequence[str]) -> None:
        """Delete the objects ``rels`` (absent ones are fine)."""
        if not rels:
            return
        self.counts["delete"] += 1
        with self._guard(f"delete {len(rels)} object(s)", write=True):
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm([self.path(r) for r in rels])

    def delete_tree(self) -> None:
        """Delete every object under the store's URL."""
        self.counts["delete"] += 1
        with self._guard("delete the store", write=True):
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm(self.path(""), recursive=True)
