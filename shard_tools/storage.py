"""Storage: any fsspec URL (local path, ``s3://`` through s3fs) for inputs and shards.

S3 endpoint and credentials come from the standard AWS environment variables
(``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ...)
or from explicit ``storage_options``.
"""
from __future__ import annotations

import json
import logging
import os
import posixpath
import tempfile
from dataclasses import dataclass
from typing import Any, Mapping

import fsspec

log = logging.getLogger(__name__)

IMAGE_EXTS = (".jpg", ".jpeg")


def is_remote(url: str) -> bool:
    return "://" in url and not url.startswith("file://")


def normalize(url: str) -> str:
    """``file:///x`` -> ``/x``: local paths go through ``os``, everything else through fsspec."""
    return url[len("file://"):] if url.startswith("file://") else url


def dataset_root(url: str) -> str:
    """The folder of a shard set given as its folder or its ``manifest.json``."""
    url = normalize(url).rstrip("/")
    return url[: -len("/manifest.json")] if url.endswith("/manifest.json") else url


def _with_env_endpoint(protocol: str, options: Mapping[str, Any] | None) -> dict:
    opts = dict(options or {})
    if protocol in ("s3", "s3a"):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        client_kwargs = dict(opts.get("client_kwargs") or {})
        if endpoint and "endpoint_url" not in opts and "endpoint_url" not in client_kwargs:
            client_kwargs["endpoint_url"] = endpoint
        if client_kwargs:
            opts["client_kwargs"] = client_kwargs
    return opts


def filesystem(url: str, storage_options: Mapping[str, Any] | None = None):
    """``(fs, path)`` for a URL; local paths are made absolute."""
    protocol = url.split("://", 1)[0] if "://" in url else "file"
    fs, path = fsspec.core.url_to_fs(url, **_with_env_endpoint(protocol, storage_options))
    return fs, path


def join(url: str, *parts: str) -> str:
    """Join path parts onto a URL or local path (always with '/')."""
    if is_remote(url):
        return posixpath.join(url.rstrip("/"), *parts)
    return os.path.join(normalize(url), *parts)


def parse_storage_options(text: str | None) -> dict:
    """``--storage-options`` JSON -> dict, with a one-line error."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"--storage-options is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ValueError("--storage-options must be a JSON object")
    return value


@dataclass(frozen=True)
class InputList:
    """Images named relative to ``root``: a folder, or the folder of a ``.txt`` list."""

    root: str
    names: list[str]
    storage_options: Mapping[str, Any] | None = None

    def url(self, name: str) -> str:
        return join(self.root, name)



def list_inputs(src: str, storage_options: Mapping[str, Any] | None = None,
                exts: tuple[str, ...] = IMAGE_EXTS) -> InputList:
    """Sorted image names of SRC: a folder (recursive), a ``.txt`` list, or a URL of either.

    A ``.txt`` list holds one path per line relative to the list's folder (blank
    lines and ``#`` comments are ignored); only names are needed, so listed
    files need not exist.
    """
    src = normalize(src)
    fs, path = filesystem(src, storage_options)
    if src.endswith(".txt"):
        if not fs.exists(path):
            raise FileNotFoundError(f"input list not found: {src}")
        with fs.open(path, "rt") as f:
            names = [ln.strip() for ln in f if ln.strip() and not ln.lstrip().startswith("#")]
        root = src.rsplit("/", 1)[0] if is_remote(src) else os.path.dirname(os.path.abspath(src))
        return InputList(root=root, names=names, storage_options=storage_options)
    if not fs.exists(path):
        raise FileNotFoundError(f"input not found: {src}")
    if not fs.isdir(path):
        raise ValueError(f"input must be a folder or a .txt list: {src}")
    base = path.rstrip("/")
    names = sorted(
        p[len(base) + 1:] for p in fs.find(base)
        if p.lower().endswith(exts)
    )
    root = src.rstrip("/") if is_remote(src) else os.path.abspath(src)
    return InputList(root=root, names=names, storage_options=storage_options)


def exists(url: str, storage_options: Mapping[str, Any] | None = None) -> bool:
    """Fresh existence check (object-store listings are cached per process)."""
    fs, path = filesystem(url, storage_options)
    fs.invalidate_cache(path)
    return fs.exists(path)


def read_bytes(url: str, storage_options: Mapping[str, Any] | None = None) -> bytes:
    if not is_remote(url):  # the per-image hot path: skip fsspec's URL parsing
        with open(normalize(url), "rb") as f:
            return f.read()
    fs, path = filesystem(url, storage_options)
    with fs.open(path, "rb") as f:
        return f.read()


def read_json(url: str, storage_options: Mapping[str, Any] | None = None) -> Any:
    return json.loads(read_bytes(url, storage_options))


def makedirs(url: str, storage_options: Mapping[str, Any] | None = None) -> None:
    if not is_remote(url):
        os.makedirs(normalize(url), exist_ok=True)


def write_bytes_atomic(url: str, data: bytes,
                       storage_options: Mapping[str, Any] | None = None) -> None:
    """Write so that readers never see a partial object.

    Local: a temporary file in the same folder, then ``os.replace``. Object
    stores: a single PUT is already all-or-nothing.
    """
    if is_remote(url):
        fs, path = filesystem(url, storage_options)
        fs.pipe_file(path, data)
        return
    url = normalize(url)
    folder = os.path.dirname(os.path.abspath(url))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(url))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, url)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json_atomic(url: str, obj: Any, storage_options: Mapping[str, Any] | None = None,
                      indent: int | None = 1) -> None:
    data = (json.dumps(obj, indent=indent, sort_keys=True) + "\n").encode()
    write_bytes_atomic(url, data, storage_options)


def put_file_atomic(local_path: str, url: str,
                    storage_options: Mapping[str, Any] | None = None) -> None:
    """Move a finished local file to its final URL (rename locally, upload remotely)."""
    if is_remote(url):
        fs, path = filesystem(url, storage_options)
        fs.put_file(local_path, path)
        os.unlink(local_path)
    else:
        os.replace(local_path, normalize(url))


def open_read(url: str, storage_options: Mapping[str, Any] | None = None):
    fs, path = filesystem(url, storage_options)
    return fs.open(path, "rb")


def _gopen_fsspec(url: str, mode: str = "rb", bufsize: int = 8192,
                  storage_options: Mapping[str, Any] | None = None, **kw):
    fs, path = filesystem(url, storage_options)
    return fs.open(path, mode, block_size=max(bufsize, 1 << 22))


def register_webdataset_schemes(storage_options: Mapping[str, Any] | None = None,
                                schemes: tuple[str, ...] = ("s3", "s3a")) -> None:
    """Let ``webdataset.WebDataset("s3://...")`` stream through s3fs (no ``pipe:``).

    Idempotent. Without ``storage_options`` the endpoint and credentials come
    from the environment of whichever process opens the shard. Registration
    lives in the process that calls it: DataLoader workers started with
    ``spawn`` must call it again (e.g. in ``worker_init_fn``).
    """
    import functools
    import importlib

    gopen = importlib.import_module("webdataset.gopen")  # the package re-exports a function of the same name

    for scheme in schemes:
        gopen.gopen_schemes[scheme] = functools.partial(
            _gopen_fsspec, storage_options=dict(storage_options or {}))
