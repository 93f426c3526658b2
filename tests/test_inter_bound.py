"""MODEL.IUQ.INTER.GRAD_BOUND (``iuq.inter.bound``) on toy networks whose gradients are computed by
hand: which parameters it measures at, the ratio it reads, the scale it applies, and that the
loss's value (and, where the bound does not bite, its gradient) is untouched."""
import pytest
import torch

from iuq.inter.bound import bound_influence, gradient_ratio, nearest_parameters, with_gradient_scale


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
