"""Reading shard sets: list shards from a manifest, stream samples from a shard.

This is the small API that ``trainer`` and ``retrieval`` build on. Samples are
dicts ``{"__key__": key, "__shard__": url, "<ext>": bytes, ...}`` as in
webdataset; a truncated or corrupt tar ends its shard early with a counted
error instead of killing the reader. A tar cut inside a member header is such an
error too (``tarfile`` alone reads it as a shorter, valid archive), and
``check_shard_sizes`` compares the files with the manifest before a reader plans
anything from its counts.
"""
from __future__ import annotations

import logging
import posixpath
import tarfile
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Mapping

from . import storage
from .manifest import load_manifest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardInfo:
    url: str
    samples: int
    images: int
    bytes: int
    sha256: str


def list_shards(dataset: str, storage_options: Mapping[str, Any] | None = None,
                kind: str | None = None, reader: str = "this command") -> list[ShardInfo]:
    """Shards of a shard set, in manifest order, as full URLs. With ``kind`` (images or
    places) a set of the other kind is an error naming ``reader``, not a stream of samples
    without the expected members."""
    root = storage.dataset_root(dataset)
    manifest = load_manifest(root, storage_options)
    if kind is not None and manifest["kind"] != kind:
        raise ValueError(f"{dataset} holds {manifest['kind']} shards; {reader} reads "
                         f"{kind.rstrip('s')} shards (shard_tools convert --kind {kind})")
    return [ShardInfo(storage.join(root, s["name"]), s["samples"], s["images"], s["bytes"],
                      s["sha256"]) for s in manifest["shards"]]


def check_shard_sizes(shards: Iterable[ShardInfo],
                      storage_options: Mapping[str, Any] | None = None) -> None:
    """Raise ``ValueError`` naming the first shard whose file is missing or is not the size
    its manifest entry records: a cut or rewritten shard would otherwise hand out fewer
    samples than the counts a reader plans from. One listing per folder, no reads."""
    by_folder: dict[str, list[ShardInfo]] = {}
    for shard in shards:
        by_folder.setdefault(posixpath.dirname(shard.url), []).append(shard)
    for folder, members in by_folder.items():
        fs, path = storage.filesystem(folder, storage_options)
        fs.invalidate_cache(path)
        sizes = {p["name"].rsplit("/", 1)[-1]: p.get("size") for p in fs.ls(path, detail=True)}
        for shard in members:
            size = sizes.get(shard.url.rsplit("/", 1)[-1])
            if size is None:
                raise ValueError(f"{shard.url}: missing, but listed in the manifest (restore it "
                                 "or re-run shard_tools convert)")
            if int(size) != shard.bytes:
                raise ValueError(f"{shard.url}: {int(size)} bytes, the manifest says {shard.bytes} "
                                 "(cut short or rewritten: python -m shard_tools verify, then "
                                 "re-run convert)")


def open_shard(url: str, storage_options: Mapping[str, Any] | None = None):
    """A binary stream of one shard (local path or any fsspec URL)."""
    return storage.open_read(url, storage_options)


def _split_name(name: str) -> tuple[str, str]:
    base = name.rsplit("/", 1)[-1]
    prefix = name[: len(name) - len(base)]
    key, _, ext = base.partition(".")
    return prefix + key, ext


@dataclass
class ReadErrors:
    """Errors met while streaming; a reader keeps going and reports them."""

    count: int = 0
    last: str | None = None

    def add(self, url: str, exc: BaseException) -> None:
        self.count += 1
        self.last = f"{url}: {type(exc).__name__}: {exc}"
        log.warning("shard read error (%d so far): %s", self.count, self.last)


class _EndCheckingTarInfo(tarfile.TarInfo):
    """Records on the archive why reading stopped when it was not the end-of-archive
    marker: ``tarfile`` ends quietly at a truncated, empty or invalid header after the
    first member, which would drop the rest of a shard without a word."""

    @classmethod
    def fromtarfile(cls, tar: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tar)
        except (tarfile.TruncatedHeaderError, tarfile.EmptyHeaderError,
                tarfile.InvalidHeaderError) as exc:
            what = "no end-of-archive marker" if isinstance(exc, tarfile.EmptyHeaderError) else exc
            tar.broken_end = f"tar ends early at byte {tar.offset} ({what})"
            raise


def iter_tar_samples(fileobj, url: str = "") -> Iterator[dict]:
    """Group a tar stream's members into samples by key (webdataset's convention:
    the key is the file name up to its first dot). Errors propagate, a tar cut or
    corrupted at a member header included (``tarfile.ReadError``); the sample being
    assembled then is dropped, as it may be partial."""
    current: dict | None = None
    with tarfile.open(fileobj=fileobj, mode="r|", tarinfo=_EndCheckingTarInfo) as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, ext = _split_name(member.name)
            data = tar.extractfile(member).read()
            if current is not None and current["__key__"] != key:
                yield current
                current = None
            if current is None:
                current = {"__key__": key, "__shard__": url}
            current[ext] = data
        broken = getattr(tar, "broken_end", None)
    if broken:
        raise tarfile.ReadError(broken)
    if current is not None:
        yield current


def iter_samples(url: str, storage_options: Mapping[str, Any] | None = None,
                 errors: ReadErrors | None = None, expected: int | None = None) -> Iterator[dict]:
    """Samples of one shard, in order. A broken tail is skipped and counted in ``errors``
    (the sample being assembled when the tar broke may be partial, so it is dropped).
    With ``expected`` (the manifest's count), a shard that ends cleanly with fewer
    samples is an error too."""
    done = 0
    try:
        with open_shard(url, storage_options) as f:
            for sample in iter_tar_samples(f, url):
                done += 1
                yield sample
        if expected is not None and done < expected:
            raise tarfile.ReadError(shortfall_message(done, expected))
    except (tarfile.TarError, EOFError, OSError) as exc:
        if errors is None:
            raise
        errors.add(url, exc)


def shortfall_message(got: int, expected: int) -> str:
    return f"the shard ended after {got} of the {expected} samples its manifest entry counts"


def iter_dataset(dataset: str, storage_options: Mapping[str, Any] | None = None,
                 errors: ReadErrors | None = None) -> Iterator[dict]:
    for shard in list_shards(dataset, storage_options):
        yield from iter_samples(shard.url, storage_options, errors, shard.samples)


def member_images(sample: Mapping[str, Any]) -> tuple[list[bytes], list[bytes]]:
    """(database images, mined query images) of a place sample, in member order."""
    def ordered(prefix: str) -> list[bytes]:
        found = [(int(k[len(prefix):-4]), v) for k, v in sample.items()
                 if k.startswith(prefix) and k.endswith(".jpg") and k[len(prefix):-4].isdigit()]
        return [v for _, v in sorted(found)]
    return ordered("img"), ordered("q")


def webdataset_urls(dataset: str | Iterable[str],
                    storage_options: Mapping[str, Any] | None = None) -> list[str]:
    """Shard URLs for ``webdataset.WebDataset``, with the s3 opener registered."""
    storage.register_webdataset_schemes(storage_options)
    if isinstance(dataset, str):
        return [s.url for s in list_shards(dataset, storage_options)]
    return list(dataset)
