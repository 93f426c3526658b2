"""MODEL.IUQ.INTER.GRAD_BOUND (``iuq.inter.bound``) on toy networks whose gradients are computed by
hand: which parameters it measures at, the ratio it reads, the scale it applies, and that the
loss's value (and, where the bound does not bite, its gradient) is untouched."""
import pytest
import torch

from iuq.inter.bound import (MomentumBound, bound_influence, gradient_ratio, momentum_scale, nearest_parameters,
                              with_gradient_scale)


def toy():
    """x [4, 3] -> trunk (Linear 3->5, ReLU) -> head (Linear 5->2) = queries [4, 2]; a base loss
    and an inter loss both read the queries (the base through its own read, as SOLOv2's loss
    gathers the kernels apart from IUQ's capture)."""
    torch.manual_seed(0)
    trunk, head = torch.nn.Linear(3, 5), torch.nn.Linear(5, 2)
    x = torch.randn(4, 3)
    features = torch.relu(trunk(x))
    out = head(features)
    queries = out[[0, 2]]  # the capture's own gather
    base = out.pow(2).sum()  # d base / d out = 2 out
    inter = 10.0 * queries.sum()  # d inter / d queries = 10
    return trunk, head, features, out, queries, base, inter


def test_nearest_parameters_are_the_layer_that_makes_the_queries():
    trunk, head, *_, queries, _, _ = toy()
    model = torch.nn.Sequential(trunk, head)
    found = nearest_parameters(queries, model)
    assert {id(p) for p in found} == {id(head.weight), id(head.bias)}
    head.bias.requires_grad_(False)  # a frozen parameter is not measured
    assert [id(p) for p in nearest_parameters(queries, model)] == [id(head.weight)]
    head.requires_grad_(False)  # a frozen head: the walk goes on to the layer before it
    assert {id(p) for p in nearest_parameters(queries, model)} == {id(trunk.weight), id(trunk.bias)}
    assert nearest_parameters(torch.zeros(3), model) == []  # no graph


def test_gradient_ratio_is_the_hand_computed_one():
    _, head, features, out, queries, base, inter = toy()
    params = [head.weight, head.bias]
    ratio = gradient_ratio(inter, base, params)
    # by hand: d/dW of sum_k g_k W f_k = sum_k g_k f_k^T; d/db = sum_k g_k
    f = features.detach()
    g_inter = torch.zeros(4, 2)
    g_inter[[0, 2]] = 10.0
    g_base = 2 * out.detach()
    norm = lambda g: torch.cat([(g.t() @ f).flatten(), g.sum(0)]).norm()  # noqa: E731
    assert ratio == pytest.approx(float(norm(g_inter) / norm(g_base)), rel=1e-6)
    assert head.weight.grad is None  # nothing accumulated


@pytest.mark.parametrize("bound", [0.25, 1e6])
def test_the_bound_scales_the_whole_gradient_and_never_the_value(bound):
    trunk, head, _, _, _, base, inter = toy()
    params = [head.weight, head.bias]
    ratio = gradient_ratio(inter, base, params)
    assert ratio > 0.25  # the bound bites at 0.25, not at 1e6
    bounded, got_ratio, scale = bound_influence(inter, base, params, bound)
    assert got_ratio == pytest.approx(ratio)
    assert float(bounded) == float(inter)  # the value, exactly
    want_scale = min(1.0, bound / ratio)
    assert scale == pytest.approx(want_scale)
    if bound > ratio:
        assert bounded is inter  # untouched: the paper's step
    everything = [trunk.weight, trunk.bias, head.weight, head.bias]
    got = torch.autograd.grad(bounded, everything, retain_graph=True)
    full = torch.autograd.grad(inter, everything, retain_graph=True)
    for g, f in zip(got, full):  # upstream of the measured layer too
        torch.testing.assert_close(g, f * want_scale)
    if bound < ratio:  # at the measured layer the bounded gradient is exactly bound x the base's
        base_grads = torch.autograd.grad(base, params, retain_graph=True)
        norm = lambda gs: torch.cat([g.flatten() for g in gs]).norm()  # noqa: E731
        assert float(norm(got[2:]) / norm(base_grads)) == pytest.approx(bound, rel=1e-5)


def test_no_base_gradient_leaves_the_loss_alone():
    _, head, _, _, _, _, inter = toy()
    detached_base = torch.tensor(3.0)
    bounded, ratio, scale = bound_influence(inter, detached_base, [head.weight, head.bias], 0.1)
    assert bounded is inter and ratio is None and scale == 1.0


def test_with_gradient_scale_keeps_the_value():
    w = torch.tensor([2.0], requires_grad=True)
    loss = (w * 3.0).sum()
    scaled = with_gradient_scale(loss, 0.5)
    assert float(scaled) == 6.0
    (g,) = torch.autograd.grad(scaled, w)
    assert float(g) == pytest.approx(1.5)


@pytest.mark.parametrize("carried, grad, limit, want", [
    ([0.0, 0.0], [3.0, 4.0], 2.0, 0.4),  # |s (3, 4)| = 5 s <= 2
    ([1.0, 0.0], [0.0, 1.0], 2.0, 1.0),  # |(1, 1)| = 1.41 <= 2: s = 1, nothing scaled
    ([1.0, 0.0], [0.0, 1.0], 1.25 ** 0.5, 0.5),  # 1 + s^2 <= 1.25
    ([1.0, 0.0], [-1.0, 0.0], 0.5, 1.0),  # |1 - s| <= 0.5 from s = 0.5 on: the largest, 1
    ([3.0, 0.0], [-1.0, 0.0], 1.0, 1.0),  # over the bound for every s in [0, 1]: nearest at s = 1
    ([3.0, 0.0], [1.0, 0.0], 1.0, 0.0),  # ... here at s = 0 (L_inter's step adds nothing)
    ([1.0, 0.0], [0.0, 0.0], 0.1, 1.0),  # no gradient: nothing to scale
])
def test_momentum_scale_by_hand(carried, grad, limit, want):
    # reference (limit, 0) at bound 1: |carried + s grad| <= limit
    s = momentum_scale(torch.tensor(carried), torch.tensor(grad), torch.tensor([limit, 0.0]), 1.0)
    assert s == pytest.approx(want)


@pytest.mark.parametrize("carried, grad, limit, lowest, want", [
    ([3.0, 0.0], [1.0, 0.0], 1.0, -1.0, -1.0),  # |3 + s| <= 1 needs s <= -2: nearest in [-1, 1], -1
    ([3.0, 0.0], [1.0, 0.0], 2.5, -1.0, -0.5),  # |3 + s| <= 2.5: the largest s, -0.5 (taken back)
    ([3.0, 0.0], [1.0, 0.0], 2.5, -0.25, -0.25),  # ... floored at MIN_SCALE -0.25
    ([3.0, 0.0], [1.0, 0.0], 2.5, 0.0, 0.0),  # MIN_SCALE 0: adds nothing, takes nothing back
    ([0.0, 0.0], [3.0, 4.0], 2.0, -1.0, 0.4),  # within reach from s >= 0: as with MIN_SCALE 0
    ([1.0, 0.0], [0.0, 1.0], 0.5, -1.0, 0.0),  # 1 + s^2 > 0.25 for every s: nearest at s = 0
])
def test_momentum_scale_below_zero_takes_back_a_share(carried, grad, limit, lowest, want):
    s = momentum_scale(torch.tensor(carried), torch.tensor(grad), torch.tensor([limit, 0.0]), 1.0, lowest)
    assert s == pytest.approx(want)


def test_a_scale_below_zero_keeps_the_share_within_the_bound_where_zero_cannot():
    """The SGD toy below (a base gradient that turns every step, an inter gradient of one direction
    at half its size), bound 0.6: with scales in [0, 1] L_inter's share of the momentum is over the
    bound on some step (the base's share nearly cancels); with GRAD_BOUND_MIN_SCALE -1 it is within
    it on every step, the scale below 0 on the steps where it takes a share back, and the tracked
    shares still add up to torch's SGD buffer."""
    def run(lowest):
        w = torch.nn.Parameter(torch.zeros(2))
        optimizer = torch.optim.SGD([w], lr=0.1, momentum=0.9)
        bound, over, scales = MomentumBound(0.6, lowest), 0, []
        for step in range(12):
            base = (1.0 if step % 2 == 0 else -1.0) * (w * torch.tensor([2.0, 0.0])).sum()
            inter = (w * torch.tensor([0.0, 1.0])).sum()
            bounded, _, scale = bound(inter, base, [w], 0.9)
            optimizer.zero_grad()
            (base + bounded).backward()
            optimizer.step()
            torch.testing.assert_close(optimizer.state[w]["momentum_buffer"], bound.inter + bound.base)
            over += float(bound.inter.norm()) > 0.6 * float(bound.base.norm()) * (1 + 1e-6)
            scales.append(scale)
        return over, scales

    over_at_0, scales_at_0 = run(0.0)
    over_below, scales_below = run(-1.0)
    assert over_at_0 > 0 and min(scales_at_0) == 0.0
    assert over_below == 0 and min(scales_below) < 0.0


def test_momentum_bound_keeps_l_inters_share_of_the_real_sgd_buffer():
    """A parameter w [2] trained by torch's SGD (momentum 0.9) on a base loss whose gradient turns
    every step and an inter loss that pushes the same way every step, at 0.5x the base's gradient:
    the per-step bound (0.6) never bites, yet L_inter's share of the momentum grows past the base's.
    The momentum bound keeps it at 0.6x the base's share wherever L_inter's step can, and the two
    shares it tracks add up to the optimizer's own buffer."""
    w = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.SGD([w], lr=0.1, momentum=0.9)
    bound, unbounded_inter, unbounded_base = MomentumBound(0.6), torch.zeros(2), torch.zeros(2)
    bit = False
    for step in range(12):
        sign = 1.0 if step % 2 == 0 else -1.0
        base = sign * (w * torch.tensor([2.0, 0.0])).sum()  # d/dw = (2 sign, 0)
        inter = (w * torch.tensor([0.0, 1.0])).sum()  # d/dw = (0, 1): half the base's
        assert gradient_ratio(inter, base, [w]) == pytest.approx(0.5)  # the per-step bound: never bites
        bounded, ratio, scale = bound(inter, base, [w], 0.9)
        assert float(bounded) == float(inter)
        optimizer.zero_grad()
        (base + bounded).backward()
        optimizer.step()
        torch.testing.assert_close(optimizer.state[w]["momentum_buffer"], bound.inter + bound.base)
        # within the bound, or L_inter adds nothing this step (its past share alone is over it:
        # the base's share nearly cancels on every other step)
        assert scale == 0.0 or float(bound.inter.norm()) <= 0.6 * float(bound.base.norm()) * (1 + 1e-6)
        unbounded_inter = 0.9 * unbounded_inter + torch.tensor([0.0, 1.0])
        unbounded_base = 0.9 * unbounded_base + torch.tensor([2.0 * sign, 0.0])
        bit = bit or scale < 1.0
        if scale == 1.0:  # where it does not bite the step is the unbounded one
            assert ratio <= 0.6 * (1 + 1e-6)
    assert bit  # ... and it does bite: unbounded, L_inter's share would be ~9x the base's
    assert float(unbounded_inter.norm() / unbounded_base.norm()) > 4.0


def test_momentum_bound_at_momentum_0_is_the_per_step_bound():
    _, head, _, _, _, base, inter = toy()
    params = [head.weight, head.bias]
    _, ratio, scale = bound_influence(inter, base, params, 0.25)
    _, m_ratio, m_scale = MomentumBound(0.25)(inter, base, params, 0.0)
    assert m_ratio == pytest.approx(ratio) and m_scale == pytest.approx(scale)


def test_momentum_bound_resumes_from_its_state_dict():
    """Two steps, saved and loaded into a fresh bound, then a third: the same scale and shares as
    one bound that ran all three."""
    def losses(step):
        w = weights[step]
        return (w * torch.tensor([1.0, -1.0])).sum() * (-1) ** step * 3, (w * torch.tensor([0.5, 2.0])).sum()

    weights = [torch.nn.Parameter(torch.zeros(2)) for _ in range(3)]
    whole, first = MomentumBound(0.3), MomentumBound(0.3)
    for step in range(2):
        for b in (whole, first):
            base, inter = losses(step)
            b(inter, base, [weights[step]], 0.9)
    resumed = MomentumBound(0.3)
    resumed.load_state_dict({k: v.clone() for k, v in first.state_dict().items()})
    got = [b(losses(2)[1], losses(2)[0], [weights[2]], 0.9) for b in (whole, resumed)]
    assert got[0][1:] == got[1][1:]
    assert got[0][2] < 1.0  # it bites on the third step
    torch.testing.assert_close(whole.inter, resumed.inter)
    torch.testing.assert_close(whole.base, resumed.base)
    assert MomentumBound(0.3).state_dict() == {}
