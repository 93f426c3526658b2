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

Stuff (panoptic segmentation, the supplementary's one change): stuff is instance-agnostic, so a
query matched to a *stuff* segment of class c has, on another image, that image's pixels of stuff
class c as positives (target 1) and every other sample as a negative (target 0). A query's class
(``query_stuff_classes``: c for a stuff query, -1 otherwise) and a sample's (its bank's
``stuff_classes()``) decide each pair's target; the Q x M target matrix is never formed (one chunk's
comparison at a time). Positives take the same loss with target 1 (focal: alpha (1 - p)^gamma
(-log p), i.e. alpha weighs positives and 1 - alpha negatives, as in Lin et al.; ce / l1 / l2 against
1), and the normalisation is unchanged: a query's loss is the mean over *all* its other-image
samples, positives included. Thing queries, and every query when no stuff sample is present, get
exactly the all-zero loss above (the same code runs; nothing is added).

Cost: the Q x M logits are never kept. Samples are decoded ``chunk_size`` at a time and, as the
loss is a scalar whose derivative in each logit has a closed form, every chunk's gradients are
formed in the forward pass itself and the chunk is freed: backward only rescales them, and no
logit is computed twice (unlike ``torch.utils.checkpoint``, which would decode every chunk again
in backward). Peak memory grows with (Q + M) * D plus one chunk's decode (Q x chunk_size x the
decode's width), not with Q x M.

A decode may be split in two (:class:`SampleDecode`): ``prepare`` turns the queries into what the
per-sample work needs (CondInst: its dynamic MLP's weights in linear form) once per loss, and
each chunk runs on that (``forward_chunk``, then ``backward_chunk`` with the loss's gradient in
the logits); the chunks' gradients are summed on the prepared tensors and reach the queries
through one backward of ``prepare``, not one per chunk.
"""
import torch
import torch.nn.functional as F


class SampleDecode:
    """How queries turn into logits on pixel samples, in two steps the loss can run apart:

    ``prepare(queries [Q, P], query_meta)`` -> tuple of tensors, differentiable in the queries,
    run once per loss; ``apply(prepared, embeddings [C, D], locations [C, 2])`` -> logits [Q, C],
    differentiable in ``prepared`` and ``embeddings``, run once per chunk of samples. Calling the
    object is the plain decode signature: ``decode(queries, query_meta, embeddings, locations)``.

    The inter-scene loss runs each chunk as ``forward_chunk`` then, with the loss's gradient in
    the logits, ``backward_chunk``; by default through autograd on ``apply``. A decode may write
    the pair out by hand (CondInst, dot product): the loss's inner loop then builds no graph per
    chunk, and buffers can be reused from one chunk to the next, as nothing outlives the chunk.
    """

    def prepare(self, queries, query_meta):
        return (queries,)

    def apply(self, prepared, embeddings, locations):
        raise NotImplementedError

    def forward_chunk(self, prepared, embeddings, locations):
        """Logits [Q, C] (no graph) and the state ``backward_chunk`` needs. Gradients are wanted
        for the tensors of ``prepared`` and ``embeddings`` that have ``requires_grad`` set."""
        with torch.enable_grad():
            logits = self.apply(prepared, embeddings, locations)
        return logits.detach(), (logits, prepared, embeddings)

    def backward_chunk(self, state, grad_logits):
        """(grads of ``prepared`` (None where not wanted), grad of the embeddings or None), given
        d loss / d logits [Q, C]. Called once per ``forward_chunk``, before the next one."""
        logits, prepared, embeddings = state
        wrt = [t for t in (*prepared, embeddings) if t.requires_grad]
        grads = iter(torch.autograd.grad(logits, wrt, grad_logits) if wrt else ())
        return [next(grads) if t.requires_grad else None for t in prepared], (
            next(grads) if embeddings.requires_grad else None
        )

    def release(self):
        """Drop whatever was kept from one chunk to the next; called once the loss is formed."""

    def __call__(self, queries, query_meta, embeddings, locations):
        return self.apply(self.prepare(queries, query_meta), embeddings, locations)


class DotProductDecode(SampleDecode):
    """SOLOv2 / SOTR / Mask2Former / SparseInst decode: logits [Q, C] = queries [Q, D] @ emb^T."""

    def apply(self, prepared, embeddings, locations):
        (queries,) = prepared
        return queries @ embeddings.to(queries.dtype).t()

    @torch.no_grad()
    def forward_chunk(self, prepared, embeddings, locations):
        return self.apply(prepared, embeddings, locations), (prepared[0], embeddings)

    @torch.no_grad()
    def backward_chunk(self, state, grad_logits):
        queries, embeddings = state
        grad_queries = grad_logits @ embeddings.to(queries.dtype) if queries.requires_grad else None
        grad_embeddings = grad_logits.t() @ queries if embeddings.requires_grad else None
        return [grad_queries], grad_embeddings


dot_product_decode = DotProductDecode()


def dot_product_map(queries, query_images, embeddings):
    """Logits [Q, H, W] of each query [Q, D] on its own image's map in ``embeddings`` [B, D, H, W]
    (``query_images`` [Q] batch indices): ``<q, F>`` per pixel, one matmul per image, not per
    query. The dot-product decoders' ``decode_map`` (SOLOv2, SOTR, SparseInst before its
    upsampling, Mask2Former's ``pred_masks``)."""
    b, d, h, w = embeddings.shape
    logits = embeddings.new_zeros(queries.shape[0], h, w)
    for i in query_images.unique().tolist():
        idx = (query_images == i).nonzero(as_tuple=True)[0]
        logits = logits.index_copy(0, idx, (queries[idx] @ embeddings[i].reshape(d, h * w)).reshape(-1, h, w))
    return logits


class _PlainDecode(SampleDecode):
    """A plain ``decode(queries, query_meta, embeddings, locations)`` function as a SampleDecode."""

    def __init__(self, decode, query_meta):
        self.decode, self.query_meta = decode, query_meta

    def apply(self, prepared, embeddings, locations):
        return self.decode(prepared[0], self.query_meta, embeddings, locations)


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


def inter_pointwise_loss_and_grad(logits, loss="focal", alpha=0.1, gamma=2.5):
    """(l(x), dl/dx) of :func:`inter_pointwise_loss`, in float32, from one sigmoid. Runs on every
    (query, sample) pair, so it works in place where it can."""
    x = logits.float()
    p = torch.sigmoid(x)
    if loss == "focal":
        sp = F.softplus(x)
        scaled = _power(p, gamma).mul_(1.0 - alpha)  # (1 - alpha) p^g
        value = scaled * sp
        # d/dx [p^g * softplus(x)] = p^g * (g * (1 - p) * softplus(x) + p), since dp/dx = p (1 - p)
        slope = torch.addcmul(sp, sp, p, value=-1.0).mul_(gamma).add_(p).mul_(scaled)
        return value, slope
    if loss == "ce":
        return F.softplus(x), p
    if loss == "l1":
        return p, p * (1.0 - p)
    if loss == "l2":
        return p * p, (p * p).mul_(1.0 - p).mul_(2.0)
    raise ValueError(f"Unknown inter-scene loss {loss!r}; use focal, l1, l2 or ce")


def _power(p, gamma):
    """``p ** gamma``; for a half-integer gamma (the paper's 2.5) as ``p^n * sqrt(p)``, within an
    ulp or two of ``pow`` (sqrt is exact to the ulp) at a fraction of its time: this runs on every
    (query, sample) pair."""
    whole = int(gamma)
    if gamma < 0 or 2 * gamma != int(2 * gamma):
        return p.pow(gamma)
    power = p.pow(whole) if whole else torch.ones_like(p)
    return power.mul_(p.sqrt()) if gamma != whole else power


def _query_weights(query_ids, banks):
    """w_q = 1 / (|N_q| * #queries with negatives), 0 for queries without negatives: [Q]."""
    ids = torch.cat([b.image_ids.to(query_ids.device) for b in banks]) if banks else query_ids[:0]
    ids = ids.sort().values
    same = torch.searchsorted(ids, query_ids, right=True) - torch.searchsorted(ids, query_ids)
    counts = (len(ids) - same).float()
    has = counts > 0
    weights = torch.zeros_like(counts)
    weights[has] = 1.0 / (counts[has] * has.sum())
    return weights


def _with_positives(logits, value, slope, positive, loss, alpha, gamma):
    """Overwrite ``value`` / ``slope`` [Q, C] (the loss against 0 and its derivative) at the
    ``positive`` [Q, C] entries with the loss against 1: l_1(x) = l_0(-x) with alpha -> 1 - alpha,
    so d l_1 / dx = -l_0'(-x)."""
    x = logits[positive]
    v, g = inter_pointwise_loss_and_grad(-x, loss, 1.0 - alpha, gamma)
    value[positive] = v
    slope[positive] = -g


class _FusedInterLoss(torch.autograd.Function):
    """sum_{q, m} w_q [id_q != id_m] l(apply(prepared, e_m), t_qm), chunked over the samples, with its
    gradients formed in the same pass: the loss is a scalar, so each chunk's d total / d logits is
    known in closed form (``inter_pointwise_loss_and_grad``) and is pushed through the decode at
    once (``decode.backward_chunk``), after which nothing of the chunk is kept. Nothing of size
    Q x M is kept, nothing is recomputed, and backward only rescales the stored gradients. The
    banks' locations are constants (no gradient). Computes in at least float32.

    Inputs after the constants: ``num_prepared`` prepared query tensors, then (embeddings,
    locations, image_ids, stuff_classes) per bank. ``query_stuff`` [Q]: a stuff query's class, -1
    for the others (t_qm = 1 where it equals the sample's stuff class, else 0)."""

    @staticmethod
    def forward(ctx, decode, weights, query_ids, query_stuff, loss, alpha, gamma, chunk_size, num_prepared, *inputs):
        n, first = num_prepared, 9  # index of the first tensor input in needs_input_grad
        dtype = torch.promote_types(inputs[0].dtype, torch.float32)
        prepared = [t.detach().to(dtype).requires_grad_(ctx.needs_input_grad[first + i]) for i, t in enumerate(inputs[:n])]
        bank = inputs[n:]
        total = torch.zeros((), dtype=dtype, device=query_ids.device)
        grad_prepared = [torch.zeros_like(p) if p.requires_grad else None for p in prepared]
        prepared_needs = any(p.requires_grad for p in prepared)
        query_images = query_ids.unique()
        stuff_classes = query_stuff[query_stuff >= 0].unique()
        grad_bank = []
        for k in range(0, len(bank), 4):
            emb, locations, ids, sample_stuff = bank[k : k + 4]
            needs = ctx.needs_input_grad[first + n + k]
            grad_emb = torch.zeros(emb.shape, dtype=dtype, device=emb.device) if needs else None
            # The chunks holding samples of the queries' own images, and those holding a positive
            # for some stuff query (one sync per bank, not per chunk).
            mixed = set((torch.isin(ids, query_images).nonzero()[:, 0] // chunk_size).tolist())
            positives = set((torch.isin(sample_stuff, stuff_classes).nonzero()[:, 0] // chunk_size).tolist()) \
                if len(stuff_classes) else set()
            for s in range(0, len(emb), chunk_size):
                e = emb[s : s + chunk_size].detach().to(dtype).requires_grad_(needs)
                logits, state = decode.forward_chunk(prepared, e, locations[s : s + chunk_size])
                value, slope = inter_pointwise_loss_and_grad(logits, loss, alpha, gamma)
                if s // chunk_size in positives:  # a stuff query meets its class: target 1 there
                    positive = (query_stuff[:, None] == sample_stuff[s : s + chunk_size][None, :]) & (query_stuff[:, None] >= 0)
                    _with_positives(logits, value, slope, positive, loss, alpha, gamma)
                if s // chunk_size in mixed:  # some samples are not negatives
                    same = query_ids[:, None] == ids[s : s + chunk_size][None, :]
                    value.masked_fill_(same, 0.0)
                    slope.masked_fill_(same, 0.0)
                total += weights @ value.sum(dim=1)
                if not (needs or prepared_needs):
                    continue
                grads, grad_e = decode.backward_chunk(state, slope.mul_(weights[:, None]).to(logits.dtype))
                for acc, g in zip(grad_prepared, grads):
                    if acc is not None:
                        acc += g
                if needs:
                    grad_emb[s : s + chunk_size] = grad_e
            grad_bank += [grad_emb, None, None, None]
        grads = grad_prepared + grad_bank
        ctx.has_grad = [g is not None for g in grads]
        ctx.save_for_backward(*[g for g in grads if g is not None])
        ctx.dtypes = [t.dtype for t in inputs]
        return total

    @staticmethod
    def backward(ctx, grad_total):
        saved = iter(ctx.saved_tensors)
        grads = [(next(saved) * grad_total).to(dtype) if has else None for has, dtype in zip(ctx.has_grad, ctx.dtypes)]
        return (None,) * 9 + tuple(grads)


def inter_scene_loss(
    queries,
    query_image_ids,
    banks,
    decode=dot_product_decode,
    query_meta=None,
    loss="focal",
    alpha=0.1,
    gamma=2.5,
    chunk_size=512,
    query_stuff_classes=None,
):
    """Inter-scene loss of ``queries`` against pixel samples of other images.

    Args:
        queries: [Q, P] query vectors (CondInst: flattened dynamic-head parameters).
        query_image_ids: [Q] int64 dataset-level id of each query's image.
        banks: iterable of :class:`~iuq.inter.samples.PixelSamples` (the mini-batch's samples, which
            may carry gradient, and the memory's, which do not). Same-image samples are skipped.
        decode: a :class:`SampleDecode` (its ``prepare`` runs once, its ``apply`` per chunk), or
            a plain ``decode(queries [q, P], query_meta, embeddings [C, D], locations [C, 2])``
            -> logits [q, C]. A pure function of its inputs (no parameters of its own),
            differentiable in ``queries`` and ``embeddings``.
        query_meta: per-query tensors the decode needs (CondInst: locations, sizes of interest),
            passed through untouched and treated as constants.
        chunk_size: samples decoded at once (peak memory: one chunk's decode).
        query_stuff_classes: optional [Q] int64, the class of each query matched to a stuff
            segment, -1 for the others (default: all -1, every sample a negative). A stuff query's
            targets on the samples of its class (the banks' ``stuff_classes()``) are 1.

    Returns:
        scalar float32 loss (see the module docstring for the normalisation).
    """
    query_image_ids = torch.as_tensor(query_image_ids, device=queries.device, dtype=torch.int64)
    if query_image_ids.shape != queries.shape[:1]:
        raise ValueError(
            f"inter_scene_loss: {queries.shape[0]} queries but {query_image_ids.numel()} image ids"
        )
    banks = [b for b in banks if len(b) > 0]
    weights = _query_weights(query_image_ids, banks)
    if not bool((weights > 0).any()):
        return queries.sum().float() * 0.0
    if not isinstance(decode, SampleDecode):
        decode = _PlainDecode(decode, query_meta)
    query_stuff = _query_stuff(query_stuff_classes, queries)
    prepared = tuple(decode.prepare(queries, query_meta))
    flat = [t for b in banks for t in (b.embeddings, b.locations, b.image_ids.to(queries.device),
                                       b.stuff_classes().to(queries.device))]
    try:
        return _FusedInterLoss.apply(
            decode, weights, query_image_ids, query_stuff, loss, alpha, gamma, chunk_size, len(prepared),
            *prepared, *flat
        )
    finally:
        decode.release()


def _query_stuff(query_stuff_classes, queries):
    if query_stuff_classes is None:
        return torch.full((len(queries),), -1, dtype=torch.int64, device=queries.device)
    out = torch.as_tensor(query_stuff_classes, dtype=torch.int64, device=queries.device)
    if out.shape != queries.shape[:1]:
        raise ValueError(f"inter_scene_loss: {queries.shape[0]} queries but {out.numel()} query stuff classes")
    return out


def naive_inter_scene_loss(
    queries, query_image_ids, banks, decode=dot_product_decode, query_meta=None, loss="focal", alpha=0.1, gamma=2.5,
    query_stuff_classes=None,
):
    """Reference: all Q x M logits and targets at once, the same normalisation. For tests and
    benchmarks."""
    from .samples import PixelSamples

    bank = PixelSamples.cat(list(banks))
    logits = decode(queries, query_meta, bank.embeddings, bank.locations)
    negative = torch.as_tensor(query_image_ids)[:, None] != bank.image_ids[None, :]  # "other image"
    qs = _query_stuff(query_stuff_classes, queries)[:, None]
    target = (qs >= 0) & (qs == bank.stuff_classes()[None, :])
    against_0 = inter_pointwise_loss(logits, loss, alpha, gamma)
    against_1 = inter_pointwise_loss(-logits, loss, 1.0 - alpha, gamma)
    values = torch.where(target, against_1, against_0) * negative
    counts = negative.sum(dim=1)
    keep = counts > 0
    if not bool(keep.any()):
        return queries.sum().float() * 0.0
    return (values.sum(dim=1)[keep] / counts[keep]).mean()
