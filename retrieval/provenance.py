"""What a derived artefact was made from: digests recorded at write time, compared at reuse.

A folder is trusted by what made it, never by its name. Each writer records digests of
its inputs; each reader compares them before it reuses the artefact:

- an encoder is known by ``weights_sha256`` (the sha256 of its ``model.safetensors``:
  safetensors writes the same bytes for the same tensors, so equal weights give equal
  digests wherever the folder lies);
- embeddings record the encoder's identity and each source shard's manifest sha256,
  and carry a ``digest`` of their own rows (``embeddings_digest``);
- an index records the digest of the embeddings it holds and each index shard's size
  and sha256.

Small functions over paths and arrays, in FAISS contrib's style; no state.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Iterable, Mapping

import numpy as np

__all__ = ["file_sha256", "bytes_sha256", "file_record", "encoder_identity", "same_encoder",
           "describe_encoder", "combine_digests", "array_digest", "rows_digest",
           "embeddings_digest"]

_CHUNK = 1 << 22


def bytes_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a local file, read in 4 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def file_record(path: str | os.PathLike) -> dict[str, Any]:
    """``{"size", "mtime_ns", "sha256"}`` of a local file: size and mtime make the check
    at reuse cheap (a file whose size and mtime are unchanged is not read again), the
    sha256 settles it when they differ (a copied folder: new mtimes, same bytes)."""
    st = os.stat(path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": file_sha256(path)}


def encoder_identity(path: str | os.PathLike) -> dict[str, str]:
    """``{"path": absolute folder, "weights_sha256": ...}`` of a saved encoder (folder or its
    ``model.safetensors``). The digest is what identifies it; the path is for messages."""
    p = os.path.abspath(os.fspath(path))
    folder = p if os.path.isdir(p) else os.path.dirname(p)
    weights = os.path.join(folder, "model.safetensors")
    return {"path": folder, "weights_sha256": file_sha256(weights)}


def _digest_of(encoder: Mapping[str, Any] | str | None) -> str | None:
    if isinstance(encoder, Mapping):
        return encoder.get("weights_sha256") or None
    return None


def same_encoder(a: Mapping[str, Any] | str | None, b: Mapping[str, Any] | str | None
                 ) -> bool | None:
    """True/False when both identities carry a weights digest, None when either does not
    (an in-memory or foreign model: nothing to compare)."""
    da, db = _digest_of(a), _digest_of(b)
    if da is None or db is None:
        return None
    return da == db


def describe_encoder(encoder: Mapping[str, Any] | str | None) -> str:
    """``path (weights sha256 1a2b3c4d…)`` for one-line messages."""
    if isinstance(encoder, Mapping):
        digest = encoder.get("weights_sha256")
        where = encoder.get("path") or "an unnamed encoder"
        return f"{where} (weights {digest[:12]})" if digest else str(where)
    return str(encoder) if encoder else "an unrecorded encoder"


def combine_digests(parts: Iterable[str], **fields: Any) -> str:
    """One sha256 over an ordered list of digests plus named fields (JSON, sorted keys)."""
    body = json.dumps({"parts": list(parts), **fields}, sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()


def array_digest(array: np.ndarray) -> str:
    """sha256 of an array's dtype, shape and C-order bytes, read in chunks of about 4 MiB
    (a memory-mapped array is never copied whole)."""
    a = np.asarray(array)
    h = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode())
    if a.ndim == 0:
        h.update(a.tobytes())
        return h.hexdigest()
    step = max(1, _CHUNK // max(1, a.itemsize * (a[0].size if len(a) else 1)))
    for s in range(0, len(a), step):
        h.update(np.ascontiguousarray(a[s:s + step]).tobytes())
    return h.hexdigest()


def rows_digest(emb: Any) -> str:
    """The digest of a set of embeddings computed over its rows, shard by shard (whatever
    its ``embeddings.json`` records): equal rows give equal digests."""
    parts = [array_digest(np.asarray(a)) for a in emb.arrays]
    return combine_digests(parts, dim=int(emb.dim))


def embeddings_digest(emb: Any) -> str:
    """The digest of a set of embeddings (``retrieval.Embeddings``): the one its
    ``embeddings.json`` records, else computed over its rows shard by shard (folders written
    before digests were recorded, in-memory arrays). ``Embeddings.open`` checks the recorded
    digest against the ``.npy`` files first (``file_record``) and computes it from the rows
    when a file changed, so the digest returned here stands for the rows."""
    recorded = (getattr(emb, "meta", None) or {}).get("digest")
    if recorded:
        return str(recorded)
    return rows_digest(emb)
