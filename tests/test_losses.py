"""Inter-scene loss: hand-computed values, same-image exclusion, agreement with the naive
Q x M implementation (values and gradients), and memory that does not grow with Q x M."""
import math

import pytest
import torch

from autograd_support import saved_bytes
from iuq.inter.losses import (
    SampleDecode,
    inter_pointwise_loss,
    inter_pointwise_loss_and_grad,
    inter_scene_loss,
    naive_inter_scene_loss,
)
from iuq.inter.samples import PixelSamples


def bank(emb, ids, loc=None):
    emb = torch.as_tensor(emb, dtype=torch.float32)
    loc = torch.zeros(len(emb), 2) if loc is None else loc
    return PixelSamples(emb, loc, torch.as_tensor(ids, dtype=torch.int64))


def focal_by_hand(x, alpha=0.1, gamma=2.5):
    p = 1 / (1 + math.exp(-x))
    return (1 - alpha) * p**gamma * -math.log(1 - p)


def test_focal_value_against_hand_computation():
    q = torch.tensor([[1.0, 2.0]])
    b = bank([[0.5, 0.25], [-1.0, 0.0], [3.0, 3.0]], [7, 8, 9])
    # logits: 1.0, -1.0, 9.0 ; the query is from image 9, so only the first two are negatives.
    loss = inter_scene_loss(q, torch.tensor([9]), [b])
    expected = (focal_by_hand(1.0) + focal_by_hand(-1.0)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize(
    "name,fn",
    [
        ("ce", lambda p: -math.log(1 - p)),
        ("l1", lambda p: p),
        ("l2", lambda p: p * p),
        ("focal", lambda p: 0.75 * p**2 * -math.log(1 - p)),
    ],
)
def test_each_variant_against_hand_computation(name, fn):
    x = torch.tensor([-2.0, 0.0, 0.7, 4.0])
    p = torch.sigmoid(x).tolist()
    got = inter_pointwise_loss(x, name, alpha=0.25, gamma=2.0)
    assert got.tolist() == pytest.approx([fn(v) for v in p], rel=1e-5)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0, 1.7, 2.0, 2.5, 3.0])
def test_fused_focal_value_and_slope_for_any_gamma(gamma):
    """The fused pass (half-integer gammas through sqrt, not pow) against autograd of the plain
    pointwise focal loss (both in float32, as the loss computes)."""
    x = torch.linspace(-12, 12, 97, requires_grad=True)
    want = inter_pointwise_loss(x, "focal", alpha=0.1, gamma=gamma)
    (slope,) = torch.autograd.grad(want.sum(), x)
    value, got_slope = inter_pointwise_loss_and_grad(x.detach(), "focal", alpha=0.1, gamma=gamma)
    torch.testing.assert_close(value, want.detach(), rtol=1e-5, atol=1e-12)
    torch.testing.assert_close(got_slope, slope, rtol=1e-5, atol=1e-12)


def test_normalisation_is_per_query_mean_then_mean_over_queries():
    q = torch.tensor([[1.0], [2.0]])
    b = bank([[1.0], [1.0], [1.0]], [0, 1, 1])
    # query 0 (image 0) has negatives {1, 2}: logits 1, 1. query 1 (image 1) has {0}: logit 2.
    loss = inter_scene_loss(q, torch.tensor([0, 1]), [b], loss="l1")
    s = torch.sigmoid(torch.tensor([1.0, 2.0])).tolist()
    assert loss.item() == pytest.approx((s[0] + s[1]) / 2, rel=1e-6)


def test_same_image_samples_never_contribute():
    torch.manual_seed(0)
    q = torch.randn(2, 8, requires_grad=True)
    qids = torch.tensor([1, 1])  # both queries come from image 1
    own = torch.randn(5, 8, requires_grad=True)  # samples of image 1 (seen again, e.g. next epoch)
    own_bank = PixelSamples(own, torch.zeros(5, 2), torch.ones(5, dtype=torch.long))
    other = PixelSamples(torch.randn(6, 8), torch.zeros(6, 2), torch.tensor([2, 2, 3, 4, 4, 4]))
    loud_own = PixelSamples(own * 100, own_bank.locations, own_bank.image_ids)  # would dominate
    only_other = inter_scene_loss(q, qids, [other])
    with_own = inter_scene_loss(q, qids, [loud_own, other])
    assert with_own.item() == pytest.approx(only_other.item(), rel=1e-6)
    inter_scene_loss(q, qids, [own_bank, other]).backward()
    assert torch.count_nonzero(own.grad) == 0


def test_query_without_negatives_gives_a_zero_that_still_backpropagates():
    q = torch.randn(2, 4, requires_grad=True)
    b = bank(torch.randn(3, 4), [5, 5, 5])
    loss = inter_scene_loss(q, torch.tensor([5, 5]), [b])
    assert loss.item() == 0.0
    loss.backward()
    assert q.grad is not None and torch.count_nonzero(q.grad) == 0


def condinst_like_decode(queries, meta, embeddings, locations):
    """A dynamic 2-layer MLP on [embedding, relative coords]: the CondInst shape of decode."""
    d = embeddings.shape[1]
    cin, hidden = d + 2, 4
    w1 = queries[:, : cin * hidden].reshape(-1, hidden, cin)
    b1 = queries[:, cin * hidden : cin * hidden + hidden]
    w2 = queries[:, cin * hidden + hidden : cin * hidden + 2 * hidden]
    b2 = queries[:, -1]
    rel = (meta["locations"][:, None, :] - locations[None, :, :]) / meta["soi"][:, None, None]
    x = torch.cat([embeddings[None].expand(len(queries), -1, -1), rel], dim=2)  # [Q, C, cin]
    h = torch.relu(torch.einsum("qci,qhi->qch", x, w1) + b1[:, None])
    return torch.einsum("qch,qh->qc", h, w2) + b2[:, None]


class PreparedCondInstLikeDecode(SampleDecode):
    """``condinst_like_decode`` split as CondInst's adapter splits it: ``prepare`` folds the
    relative coordinates into the first layer (linear form), ``apply`` only touches samples."""

    def __init__(self):
        self.prepared = 0

    def prepare(self, queries, meta):
        self.prepared += 1
        hidden = 4
        cin = (queries.shape[1] - 2 * hidden - 1) // hidden
        w1 = queries[:, : cin * hidden].reshape(-1, hidden, cin)
        b1 = queries[:, cin * hidden : cin * hidden + hidden]
        w_xy = w1[:, :, -2:] / meta["soi"][:, None, None]
        b1 = b1 + (w_xy @ meta["locations"][:, :, None])[..., 0]
        a = torch.cat([w1[:, :, :-2], -w_xy, b1[:, :, None]], dim=2)  # against [e ; L ; 1]
        return a, queries[:, cin * hidden + hidden : cin * hidden + 2 * hidden], queries[:, -1]

    def apply(self, prepared, embeddings, locations):
        a, w2, b2 = prepared
        samples = torch.cat([embeddings, locations.to(embeddings.dtype), embeddings.new_ones(len(embeddings), 1)], 1)
        h = torch.relu(torch.einsum("ck,qhk->qch", samples, a))
        return torch.einsum("qch,qh->qc", h, w2) + b2[:, None]


@pytest.mark.parametrize("loss_name", ["focal", "ce", "l1", "l2"])
@pytest.mark.parametrize("decode_kind", ["dot", "condinst", "prepared"])
@pytest.mark.parametrize("chunk", [7, 64, 100000])
def test_matches_naive_values_and_gradients(loss_name, decode_kind, chunk):
    torch.manual_seed(3)
    d, q_count = 6, 9
    if decode_kind == "dot":
        from iuq.inter.losses import dot_product_decode as decode

        queries = torch.randn(q_count, d, dtype=torch.float64)
        meta = None
    else:
        # "prepared": the same decode split in two, so gradients also pass through ``prepare``.
        decode = condinst_like_decode if decode_kind == "condinst" else PreparedCondInstLikeDecode()
        queries = torch.randn(q_count, (d + 2) * 4 + 4 + 4 + 1, dtype=torch.float64) * 0.5
        meta = {"locations": torch.rand(q_count, 2, dtype=torch.float64) * 100,
                "soi": torch.full((q_count,), 64.0, dtype=torch.float64)}
    queries.requires_grad_(True)
    batch_emb = torch.randn(23, d, dtype=torch.float64, requires_grad=True)
    banks = [
        PixelSamples(batch_emb, torch.rand(23, 2, dtype=torch.float64) * 100, torch.randint(0, 4, (23,))),
        PixelSamples(torch.randn(150, d, dtype=torch.float64), torch.rand(150, 2, dtype=torch.float64) * 100,
                     torch.randint(0, 10, (150,))),
    ]
    qids = torch.randint(0, 4, (q_count,))
    kwargs = dict(decode=decode, query_meta=meta, loss=loss_name, alpha=0.1, gamma=2.5)

    ours = inter_scene_loss(queries, qids, banks, chunk_size=chunk, **kwargs)
    g_ours = torch.autograd.grad(ours, [queries, batch_emb])
    ref = naive_inter_scene_loss(queries, qids, banks, **kwargs)
    g_ref = torch.autograd.grad(ref, [queries, batch_emb])
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5)
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-9)
    assert g_ours[1].abs().sum() > 0  # mini-batch negatives are trained too


def test_half_precision_memory_bank_is_accepted():
    torch.manual_seed(0)
    q = torch.randn(3, 8, requires_grad=True)
    b = PixelSamples(torch.randn(10, 8).half(), torch.zeros(10, 2), torch.arange(10))
    loss = inter_scene_loss(q, torch.tensor([0, 1, 2]), [b], chunk_size=4)
    ref = naive_inter_scene_loss(q, torch.tensor([0, 1, 2]), [PixelSamples(b.embeddings.float(), b.locations, b.image_ids)])
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(ref.item(), rel=1e-5)


@pytest.mark.parametrize("decode_kind", ["dot", "condinst"])
def test_saved_memory_does_not_grow_with_queries_times_samples(decode_kind):
    torch.manual_seed(0)
    q_count, m, d = 300, 20000, 8
    if decode_kind == "dot":
        from iuq.inter.losses import dot_product_decode as decode

        queries, meta = torch.randn(q_count, d), None
    else:
        decode = condinst_like_decode
        queries = torch.randn(q_count, (d + 2) * 4 + 4 + 4 + 1) * 0.3
        meta = {"locations": torch.rand(q_count, 2) * 100, "soi": torch.full((q_count,), 64.0)}
    queries.requires_grad_(True)
    batch = PixelSamples(torch.randn(500, d, requires_grad=True), torch.rand(500, 2) * 100, torch.randint(0, 1000, (500,)))
    mem = PixelSamples(torch.randn(m, d), torch.rand(m, 2) * 100, torch.randint(0, 1000, (m,)))
    qids = torch.randint(0, 1000, (q_count,))
    kwargs = dict(decode=decode, query_meta=meta)
    ours, ours_bytes = saved_bytes(lambda: inter_scene_loss(queries, qids, [batch, mem], chunk_size=1024, **kwargs))
    ref, ref_bytes = saved_bytes(lambda: naive_inter_scene_loss(queries, qids, [batch, mem], **kwargs))
    q_by_m = q_count * (m + 500) * 4
    assert ref_bytes > q_by_m  # the naive version keeps at least one Q x M float tensor
    # Ours keeps at most the queries, the banks, their ids and gradients: (Q + M) * (D + a few).
    assert ours_bytes < 0.1 * q_by_m
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5)
    g_ours = torch.autograd.grad(ours, [queries, batch.embeddings])
    g_ref = torch.autograd.grad(ref, [queries, batch.embeddings])
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-9)


def test_each_chunk_is_decoded_once_for_value_and_gradients():
    torch.manual_seed(0)
    calls = []

    def counting_decode(queries, meta, embeddings, locations):
        calls.append(len(embeddings))
        return condinst_like_decode(queries, meta, embeddings, locations)

    queries = (torch.randn(5, 10 * 4 + 4 + 4 + 1) * 0.3).requires_grad_()
    meta = {"locations": torch.rand(5, 2) * 100, "soi": torch.full((5,), 64.0)}
    mem = PixelSamples(torch.randn(250, 8), torch.rand(250, 2) * 100, torch.randint(10, 20, (250,)))
    loss = inter_scene_loss(queries, torch.arange(5), [mem], decode=counting_decode, query_meta=meta, chunk_size=100)
    loss.backward()
    assert calls == [100, 100, 50]  # backward decoded nothing again
    assert queries.grad.abs().sum() > 0


def test_a_split_decode_prepares_the_queries_once_per_loss():
    torch.manual_seed(0)
    decode = PreparedCondInstLikeDecode()
    applied = []
    apply = decode.apply
    decode.apply = lambda prepared, e, loc: applied.append(len(e)) or apply(prepared, e, loc)
    queries = (torch.randn(5, 10 * 4 + 4 + 4 + 1) * 0.3).requires_grad_()
    meta = {"locations": torch.rand(5, 2) * 100, "soi": torch.full((5,), 64.0)}
    mem = PixelSamples(torch.randn(250, 8), torch.rand(250, 2) * 100, torch.randint(10, 20, (250,)))
    loss = inter_scene_loss(queries, torch.arange(5), [mem], decode=decode, query_meta=meta, chunk_size=100)
    loss.backward()
    assert decode.prepared == 1 and applied == [100, 100, 50]
    # The plain call is prepare + apply: the same numbers as the unsplit decode.
    torch.testing.assert_close(decode(queries, meta, mem.embeddings, mem.locations),
                               condinst_like_decode(queries, meta, mem.embeddings, mem.locations))


def test_mismatched_ids_are_reported():
    with pytest.raises(ValueError, match="3 queries but 2 image ids"):
        inter_scene_loss(torch.randn(3, 4), torch.tensor([0, 1]), [bank(torch.randn(2, 4), [0, 1])])
