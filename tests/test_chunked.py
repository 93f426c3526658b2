"""chunked_sum: the value and gradients of the plain sum, with nothing but the gradients held."""
import pytest
import torch

from autograd_support import saved_bytes
from iuq.equi.chunked import chunked_sum


def per_query_dice(queries, features, targets):
    """A dice term per query on a dot-product decode: [Q]."""
    p = torch.sigmoid(queries @ features.flatten(1)).reshape(len(queries), *features.shape[1:])
    inter = (p * targets).flatten(1).sum(1)
    union = (p * p).flatten(1).sum(1) + (targets * targets).flatten(1).sum(1) + 1e-5
    return 1 - 2 * inter / union


def test_value_and_gradients_equal_the_plain_sum():
    torch.manual_seed(0)
    weights = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    base = torch.randn(4, 9, 11, dtype=torch.float64, requires_grad=True)
    targets = (torch.rand(6, 9, 11) > 0.6).double()
    # Inputs that are themselves outputs of a graph: the gradients must flow on into it.
    queries, features = weights * 2.0, base.flip(-1)
    chunks = torch.arange(6).split(4)  # uneven: 4 + 2

    got = chunked_sum(lambda k, q, f: per_query_dice(q[chunks[k]], f, targets[chunks[k]]).sum(), len(chunks),
                      queries, features)
    want = per_query_dice(queries, features, targets).sum()
    assert got.item() == pytest.approx(want.item(), rel=1e-12)
    ours = torch.autograd.grad(got * 3.0, [weights, base], retain_graph=True)  # keeps the shared upstream graph
    for a, b in zip(ours, torch.autograd.grad(want * 3.0, [weights, base])):
        assert b.abs().sum() > 0
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_only_the_input_gradients_are_held_for_backward():
    torch.manual_seed(0)
    q_count, d, h, w = 64, 8, 40, 50
    queries = torch.randn(q_count, d, requires_grad=True)
    features = torch.randn(d, h, w, requires_grad=True)
    targets = (torch.rand(q_count, h, w) > 0.5).float()
    chunks = torch.arange(q_count).split(8)
    maps = q_count * h * w * 4  # one float per query and cell
    _, plain = saved_bytes(lambda: per_query_dice(queries, features, targets).sum())
    _, ours = saved_bytes(lambda: chunked_sum(
        lambda k, q, f: per_query_dice(q[chunks[k]], f, targets[chunks[k]]).sum(), len(chunks), queries, features))
    assert plain > maps  # the plain graph keeps per-query maps
    grads = (queries.numel() + features.numel()) * 4
    assert ours < 1.05 * grads < 0.15 * maps  # ours: one gradient per input (and a few index bytes)


def test_constant_inputs_and_terms_without_gradient():
    x = torch.randn(3, requires_grad=True)
    # A non-tensor input and a chunk whose term does not depend on x.
    total = chunked_sum(lambda k, t, scale: (t * scale).sum() if k == 0 else torch.tensor(1.0), 2, x, 2.0)
    total.backward()
    assert total.item() == pytest.approx(2 * x.sum().item() + 1.0)
    torch.testing.assert_close(x.grad, torch.full((3,), 2.0))


def test_no_chunk_is_an_error():
    with pytest.raises(ValueError, match="at least one chunk"):
        chunked_sum(lambda k, t: t.sum(), 0, torch.ones(2))
