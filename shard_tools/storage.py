"""Storage: any fsspec URL (local path, ``s3://`` through s3fs) for inputs and shards.

S3 endpoint and credentials come from the standard AWS environment variables
(``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ...)
or from explicit ``storage_options``.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import posixpath
import tempfile
from dataclasses import dataclass, field
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
    """Images named relative to ``root``: a folder, or the folder of a ``.txt`` list.

    ``skipped`` holds ``(name, reason, detail)`` for what was listed but cannot be
    used (a repeated line of a list, a symlink loop, a broken link), so that
    scanners report it instead of losing it silently. ``sizes`` holds
    ``name -> (size, mtime)`` where an object-store listing gave them for free.
    """

    root: str
    names: list[str]
    storage_options: Mapping[str, Any] | None = None
    skipped: list[tuple[str, str, str]] = field(default_factory=list)
    sizes: dict[str, tuple[int, str]] = field(default_factory=dict)

    def url(self, name: str) -> str:
        return join(self.root, name)


def _walk_local(base: str, exts: tuple[str, ...]) -> tuple[list[str], list[tuple[str, str, str]]]:
    """Image names under ``base``, following directory symlinks.

    A directory reached twice through links (a loop, or two links to one folder)
    is listed once; the other way in is reported as skipped, as is a broken link.
    """
    names: list[str] = []
    skipped: list[tuple[str, str, str]] = []
    seen: dict[tuple[int, int], str] = {}

    def walk(folder: str, rel: str) -> None:
        st = os.stat(folder)
        ident = (st.st_dev, st.st_ino)
        if ident in seen:
            first = seen[ident]
            loop = not first or rel.startswith(first + "/")
            skipped.append((rel, "symlink loop" if loop else "duplicate",
                            f"folder already listed as {first or '.'}"))
            return
        seen[ident] = rel
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as exc:
            skipped.append((rel or ".", "unreadable", f"{exc.strerror or exc}"))
            return
        for entry in entries:
            name = f"{rel}/{entry.name}" if rel else entry.name
            try:
                is_dir = entry.is_dir(follow_symlinks=True)
            except OSError:
                is_dir = False
            if is_dir:
                walk(entry.path, name)
            elif entry.name.lower().endswith(exts) and os.path.exists(entry.path):
                names.append(name)   # not only regular files: a FIFO is read (or rejected) too
            elif entry.is_symlink() and not os.path.exists(entry.path):
                skipped.append((name, "broken symlink", f"-> {os.readlink(entry.path)}"))

    walk(base, "")
    return sorted(names), skipped


def _dedupe(names: list[str]) -> tuple[list[str], list[tuple[str, str, str]]]:
    """Keep the first of names that denote the same path (``a/x.jpg``, ``./a/x.jpg``)."""
    first: dict[str, int] = {}
    kept, skipped = [], []
    for i, name in enumerate(names):
        norm = posixpath.normpath(name.replace("\\", "/"))
        if norm in first:
            skipped.append((name, "duplicate", f"line {i + 1} repeats line {first[norm] + 1}"))
            continue
        first[norm] = i
        kept.append(name)
    return kept, skipped


def list_inputs(src: str, storage_options: Mapping[str, Any] | None = None,
                exts: tuple[str, ...] = IMAGE_EXTS) -> InputList:
    """Sorted image names of SRC: a folder (recursive), a ``.txt`` list, or a URL of either.

    A ``.txt`` list holds one path per line relative to the list's folder (blank
    lines and ``#`` comments are ignored); only names are needed, so listed
    files need not exist. A repeated path is kept once (the others are in
    ``skipped`` as duplicates). Local folders follow directory symlinks.
    """
    src = normalize(src)
    fs, path = filesystem(src, storage_options)
    if src.endswith(".txt"):
        if not fs.exists(path):
            raise FileNotFoundError(f"input list not found: {src}")
        with fs.open(path, "rb") as f:
            raw = f.read()
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise ValueError(f"{src}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        lines = [ln.strip() for ln in text.splitlines()]
        names, skipped = _dedupe([ln for ln in lines if ln and not ln.startswith("#")])
        root = src.rsplit("/", 1)[0] if is_remote(src) else os.path.dirname(os.path.abspath(src))
        return InputList(root=root, names=names, storage_options=storage_options,
                         skipped=skipped)
    if not fs.exists(path):
        raise FileNotFoundError(f"input not found: {src}")
    if not fs.isdir(path):
        raise ValueError(f"input must be a folder or a .txt list: {src}")
    if not is_remote(src):
        root = os.path.abspath(src)
        names, skipped = _walk_local(root, exts)
        return InputList(root=root, names=names, storage_options=storage_options,
                         skipped=skipped)
    base = path.rstrip("/")
    found = fs.find(base, detail=True)
    sizes = {p[len(base) + 1:]: (int(info.get("size") or 0),
                                 str(info.get("LastModified") or info.get("mtime") or ""))
             for p, info in found.items() if p.lower().endswith(exts)}
    return InputList(root=src.rstrip("/"), names=sorted(sizes), storage_options=storage_options,
                     sizes=sizes)


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


class BadFile(ValueError):
    """A file that exists but cannot be understood (bad JSON, not UTF-8, wrong shape)."""


def read_json(url: str, storage_options: Mapping[str, Any] | None = None) -> Any:
    """Parsed JSON; a file that is not UTF-8 JSON is a ``BadFile`` error naming it."""
    data = read_bytes(url, storage_options)
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise BadFile(f"{url}: not UTF-8 ({exc.reason} at byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise BadFile(f"{url}: not valid JSON ({exc.msg} at line {exc.lineno} "
                      f"column {exc.colno})") from None


def local_stat(url: str) -> tuple[int, int] | None:
    """(size, mtime in ns) of a local file, or None when it is remote or missing."""
    if is_remote(url):
        return None
    try:
        st = os.stat(normalize(url))
    except (OSError, ValueError):
        return None
    return st.st_size, st.st_mtime_ns


# ---------------------------------------------------------------- output checks

def with_path(exc: OSError, path: str) -> OSError:
    """``exc`` naming ``path`` when it names no file (a failed write, e.g. a full disk)."""
    if exc.filename is None and exc.errno is not None:
        return type(exc)(exc.errno, exc.strerror or os.strerror(exc.errno), path)
    return exc

def _os_error(code: int, path: str) -> OSError:
    return OSError(code, os.strerror(code), path)


def _probe_folder(folder: str) -> None:
    """Create and remove a file in ``folder``: the only test that root, ACLs, read-only
    mounts and quotas all answer truthfully."""
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".streamloc-probe-")
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, folder) from None
    os.close(fd)
    os.unlink(probe)


def check_output_dir(url: str, storage_options: Mapping[str, Any] | None = None) -> None:
    """Fail now, as ``OSError(path)``, when a local output folder cannot be written.

    Checked before any work: a path under a regular file, a folder without write
    permission, a read-only filesystem. Remote outputs are checked by their first write.
    """
    if is_remote(url):
        return
    path = os.path.abspath(normalize(url))
    if os.path.exists(path) and not os.path.isdir(path):
        raise _os_error(errno.ENOTDIR, path)
    probe = path
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        raise _os_error(errno.ENOTDIR, probe)
    _probe_folder(probe)


def check_output_file(url: str, storage_options: Mapping[str, Any] | None = None) -> None:
    """Like ``check_output_dir`` for an output file: also refuses a path that is a folder."""
    if is_remote(url):
        if url.endswith("/"):
            raise _os_error(errno.EISDIR, url)
        return
    path = os.path.abspath(normalize(url))
    if os.path.isdir(path):
        raise _os_error(errno.EISDIR, path)
    check_output_dir(os.path.dirname(path))


def makedirs(url: str, storage_options: Mapping[str, Any] | None = None) -> None:
    if not is_remote(url):
        _makedirs_local(normalize(url))


def _makedirs_local(folder: str) -> None:
    """``os.makedirs`` that names the file in the way (``exist_ok`` alone says "File exists")."""
    try:
        os.makedirs(folder, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = folder
        while blocker and not os.path.isfile(blocker):
            blocker = os.path.dirname(blocker)
        raise NotADirectoryError(errno.ENOTDIR, "a file is in the way of this folder",
                                 blocker or folder) from None


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
    if os.path.isdir(url):
        raise IsADirectoryError(errno.EISDIR, "is a folder, not a file to write", url)
    folder = os.path.dirname(os.path.abspath(url))
    _makedirs_local(folder)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(url))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, url)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise with_path(exc, url) from None
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
