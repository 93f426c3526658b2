import pytest
import torch
from torch.profiler import profile

from iuq.equi.crops import crops

BOXES = [
    (slice(0, 2),),  # the originals of a batch of 4
    (1, slice(None), slice(0, 3), slice(0, 4)),  # a view's source region
    (1, slice(None), slice(1, 5), slice(0, 4)),  # another, overlapping it
    (3, slice(None), slice(0, 2), slice(0, 2)),  # read but unused by the loss
]


def toy_loss(parts):
    """Uses the crops in ways IUQ does: a pixel gather, a flip, a plain sum; the last one unused."""
    originals, a, b, _ = parts
    return originals.flatten(2)[[0, 1, 1], :, [3, 7, 7]].pow(2).sum() + (a.flip(-1) * a).sum() + 3 * b.sum()


def full_size_zero_fills(x, parts_of):
    with profile(record_shapes=True) as prof:
        toy_loss(parts_of(x)).backward()
    return sum(
        e.count
        for e in prof.key_averages(group_by_input_shape=True)
        if e.key == "aten::zero_" and e.input_shapes and list(e.input_shapes[0]) == list(x.shape)
    )


def test_crops_are_views_with_the_gradient_of_plain_indexing():
    # Small integers: every sum is exact in any order, so the gradients must agree to the bit.
    x = torch.randint(-4, 5, (4, 3, 5, 6)).double().requires_grad_()
    parts = crops(x, BOXES)
    for part, box in zip(parts, BOXES):
        assert part._base is x and torch.equal(part, x[box])
    (ours,) = torch.autograd.grad(toy_loss(parts), x)
    (plain,) = torch.autograd.grad(toy_loss([x[box] for box in BOXES]), x)
    assert plain[1].abs().sum() > 0 and plain[3].abs().sum() == 0
    torch.testing.assert_close(ours, plain, rtol=0, atol=0)


def test_crops_fill_one_input_sized_gradient_where_plain_indexing_fills_one_per_read():
    x = torch.randn(4, 3, 5, 6, requires_grad=True)
    assert full_size_zero_fills(x, lambda t: crops(t, BOXES)) == 1
    assert full_size_zero_fills(x, lambda t: [t[box] for box in BOXES]) == 3  # why crops exists


def test_crops_without_any_used_gives_no_gradient_and_rejects_advanced_indexing():
    x = torch.randn(2, 3, requires_grad=True)
    (part,) = crops(x, [(0,)])
    assert torch.autograd.grad(x.sum() + part.detach().sum(), x)[0].eq(1).all()
    with pytest.raises(TypeError, match="basic indexing"):
        crops(x, [(torch.tensor([0, 1]),)])
