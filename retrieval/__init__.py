"""Retrieval at database scale: embed image shards, index them in FAISS shards, search, score.

The core sees an encoder only as an ``nn.Module`` mapping ``[B, 3, H, W]``
ImageNet-normalised images to L2-normalised descriptors; only the command line
(``python -m retrieval``) loads saved encoders (``trainer.models.load_encoder``).

Python API (what the trainer's validation and the demo call)::

    import retrieval as R

    # 1. each rank embeds its share of the shards (every world_size-th shard from rank)
    stats = R.embed_shards(model, "shards/val-db", "work/emb/db", image_size=(320, 320),
                           rotations=(0, 90, 180, 270), batch_size=64, dtype="float16",
                           rank=rank, world_size=world_size, resume=False)
    R.embed_shards(model, "shards/val-queries", "work/emb/q", image_size=(320, 320),
                   rank=rank, world_size=world_size, resume=False)
    # (barrier; then on one rank, or on every rank)
    R.finalize_embeddings("work/emb/db"); R.finalize_embeddings("work/emb/q")
    # pass encoder_id=retrieval.provenance.encoder_identity(folder) for a saved encoder:
    # it is recorded, and a folder made by other weights is refused; a shard whose manifest
    # sha256 changed since it was embedded is embedded again

    # 2. recall@K end to end (per-region index, ground truth, dedupe of rotations)
    report = R.evaluate("work/emb/db", "work/emb/q", protocol="apl",
                        regions=["earthloc-val"], ks=(1, 5, 10, 20, 100))
    report.average[1], report.average_dedupe[1], print(report.table())

    # or the pieces:
    db = R.Embeddings.open("work/emb/db")          # memory-mapped rows, lazy records
    index = R.build_index(db, None, factory="IVF1024,PQ32", num_shards=4)  # in memory
    index = R.build_index(db, "work/idx", factory="Flat", num_shards=4)    # on disk
    index = R.ShardedIndex.load("work/idx")
    res = R.search(index, query_vectors, k=100, nprobe=32)  # SearchResult(scores, ids)
    res = R.dedupe(R.search(index, q, k=100 * 4), db.image_of_row, k=100)
    R.recall_at_k(image_ids, positives, ks=(1, 5, 10))      # RecallResult
    R.check_same_encoder(db.encoder, queries.encoder)      # ValueError for two encoders

    # under torch.distributed: ranks load different index shards, results merged
    index = R.ShardedIndex.load("work/idx", shards=range(rank, num_shards, world_size))
    res = R.search_distributed(index, queries_on_rank0, k=100)

Global ids are row numbers over the embeddings' shards in order; ``image_of_row``
maps a row to its database image (rotations of a tile share it). Scores are
inner products of unit vectors: larger is better.
"""
from .distributed import array_task, init_process_group_from_env, rank_and_world, worker_part
from .embed import (EmbedStats, Embeddings, check_same_encoder, embed_shard, embed_shards,
                    finalize_embeddings, resolve_shards, shard_name)
from .evaluate import EvalReport, RegionResult, evaluate, positives_for
from .images import IMAGENET_MEAN, IMAGENET_STD, load_views
from .index import ShardedIndex, build_index, merge_ondisk
from .metrics import RecallResult, recall_at_k
from .search import SearchResult, dedupe, merge_topk, search, search_distributed

__all__ = [
    "embed_shards", "embed_shard", "finalize_embeddings", "Embeddings", "EmbedStats",
    "resolve_shards", "shard_name", "check_same_encoder",
    "build_index", "ShardedIndex", "merge_ondisk",
    "search", "search_distributed", "merge_topk", "dedupe", "SearchResult",
    "recall_at_k", "RecallResult",
    "evaluate", "EvalReport", "RegionResult", "positives_for",
    "load_views", "IMAGENET_MEAN", "IMAGENET_STD",
    "rank_and_world", "init_process_group_from_env", "array_task", "worker_part",
]
