"""The inter-scene uniqueness loss (Eq. 5, second term).

Every query ``q_n`` of image ``i`` is decoded on pixel samples of *other* images (the current
mini-batch's and the memory's) and must fire on none of them: the target is all zeros.

Normalisation: for query n with negative set N_n (samples whose image id differs from n's),

    L_inter = 1/|{n : N_n != {}}| * sum_n  1/|N_n| * sum_{m in N_n} l(<q_n, F_m>)

i.e. the per-query mean over its negatives (Eq. 5's "mean over other images"), averaged over
queries like the base models average their mask losses over instances. Being a mean over the
negatives, its scale does not change with the memory size, so the paper's weight holds for any
``MEMORY.SIZE``. Queries with no negative (e.g. a batch of one image and an empty memory) are
left out; if none has one the loss is a zero that still depends on the queries.

Memory: the Q x M logits are never kept. Samples are decoded ``chunk_size`` at a time inside
``torch.utils.checkpoint``, which keeps only each chunk's inputs (views of the queries and of the
bank) and recomputes the chunk's logits in backward. Peak memory grows with (Q + M) * D plus one
Q x chunk_size block, not with Q x M.
"""
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def dot_product_decode(queries, query_meta, embeddings, locations):
    """SOLOv2 / SOTR / Mask2Former / SparseInst decode: logits [Q, C] = queries [Q, D] @ emb^T."""
    return queries @ embeddings.to(queries.dtype).t()


def inter_pointwise_loss(logits, loss="focal", alpha=0.1, gamma=2.5):
    """Elementwise loss of ``logits`` against an all-zero target, in float32.

    focal: sigmoid focal loss (Lin et al.) with t = 0: (1 - alpha) * p^gamma * -log(1 - p);
    ce: -log(1 - p); l1: |p - 0|; l2: (p - 0)^2; with p = sigmoid(logits).
    """
    x = logits.float()
    if loss == "focal":
        return (1.0 - alpha) * torch.sigmoid(x).pow(gamma) * F.softplus(x)
    if loss == "ce":
        return F.softplus(x)  # = -log(1 - sigmoid(x)), stable for large x
    if loss == "l1":
        return torch.sigmoid(x)
    if loss == "l2":
        return torch.sigmoid(x).pow(2)
    raise ValueError(f"Unknown inter-scene loss {loss!r}; use focal, l1, l2 or ce")


def _chunk_sums(queries, query_ids, embeddings, locations, ids, decode, query_meta, loss, alpha, gamma):
    """Per-query sum of the loss over this chunk's negatives: [Q] float32."""
    logits = decode(queries, query_meta, embeddings, locations)
    values = inter_pointwise_loss(logits, loss, alpha, gamma)
    negative = query_ids[:, None] != ids[None, :]
    return torch.where(negative, values, values.new_zeros(())).sum(dim=1)


def inter_scene_loss(
    queries,
    query_image_ids,
    banks,
    decode=dot_product_decode,
    query_meta=None,
    loss="focal",
    alpha=0.1,
    gamma=2.5,
    chunk_size=4096,
):
    """Inter-scene loss of ``queries`` against pixel samples of other images.

    Args:
        queries: [Q, P] query vectors (CondInst: flattened dynamic-head parameters).
        query_image_ids: [Q] int64 dataset-level id of each query's image.
        banks: iterable of :class:`~iuq.samples.PixelSamples` (the mini-batch's samples, which
            may carry gradient, and the memory's, which do not). Same-image samples are skipped.
        decode: ``decode(queries [q, P], query_meta, embeddings [C, D], locations [C, 2])``
            -> logits [q, C]. A pure function of its inputs (no parameters of its own).
        query_meta: per-query tensors the decode needs (CondInst: locations, sizes of interest),
            passed through untouched.
        chunk_size: samples decoded at once.

    Returns:
        scalar float32 loss (see the module docstring for the normalisation).
    """
    query_image_ids = torch.as_tensor(query_image_ids, device=queries.device, dtype=torch.int64)
    if query_image_ids.shape != queries.shape[:1]:
        raise ValueError(
            f"inter_scene_loss: {queries.shape[0]} queries but {query_image_ids.numel()} image ids"
        )
    sums = queries.new_zeros(queries.shape[0], dtype=torch.float32)
    counts = torch.zeros(queries.shape[0], dtype=torch.int64, device=queries.device)
    for bank in banks:
        for start in range(0, len(bank), chunk_size):
            chunk = bank[start : start + chunk_size]
            ids = chunk.image_ids.to(queries.device)
            with torch.no_grad():
                counts += (query_image_ids[:, None] != ids[None, :]).sum(dim=1)
            sums = sums + checkpoint(
                _chunk_sums,
                queries,
                query_image_ids,
                chunk.embeddings,
                chunk.locations,
                ids,
                decode,
                query_meta,
                loss,
                alpha,
                gamma,
                use_reentrant=False,
            )
    has_negatives = counts > 0
    if not bool(has_negatives.any()):
        return queries.sum().float() * 0.0
    return (sums[has_negatives] / counts[has_negatives]).mean()


def naive_inter_scene_loss(
    queries, query_image_ids, banks, decode=dot_product_decode, query_meta=None, loss="focal", alpha=0.1, gamma=2.5
):
    """Reference: all Q x M logits at once, the same normalisation. For tests and benchmarks."""
    from .samples import PixelSamples

    bank = PixelSamples.cat(list(banks))
    logits = decode(queries, query_meta, bank.embeddings, bank.locations)
    negative = torch.as_tensor(query_image_ids)[:, None] != bank.image_ids[None, :]
    values = inter_pointwise_loss(logits, loss, alpha, gamma) * negative
    counts = negative.sum(dim=1)
    keep = counts > 0
    if not bool(keep.any()):
        return queries.sum().float() * 0.0
    return (values.sum(dim=1)[keep] / counts[keep]).mean()
