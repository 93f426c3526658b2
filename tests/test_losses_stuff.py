"""The inter-scene loss with stuff targets (panoptic segmentation): a stuff query's pixels of its own
stuff class in other images are positives. Hand-computed values (the loss computes in float32:
rel 1e-6), the fused chunked loss against the naive Q x M reference (values and gradients, mixed
targets), the all-zero case unchanged, and the memory and the sampler carrying classes through
save / load."""
import math

import pytest
import torch

from iuq.inter.losses import inter_scene_loss, naive_inter_scene_loss
from iuq.inter.memory import PixelMemory
from iuq.inter.samples import PixelSamples, sample_pixels


def samples(emb, ids, classes=None, stuff=None, dtype=torch.float64):
    emb = torch.as_tensor(emb, dtype=dtype)
    n = len(emb)
    return PixelSamples(emb, torch.zeros(n, 2, dtype=dtype), torch.as_tensor(ids, dtype=torch.int64),
                        None if classes is None else torch.as_tensor(classes, dtype=torch.int64),
                        None if stuff is None else torch.as_tensor(stuff, dtype=torch.bool))


def focal0(x, alpha=0.1, gamma=2.5):  # target 0: (1 - alpha) p^gamma (-log(1 - p))
    p = 1 / (1 + math.exp(-x))
    return (1 - alpha) * p**gamma * -math.log(1 - p)


def focal1(x, alpha=0.1, gamma=2.5):  # target 1: alpha (1 - p)^gamma (-log p)
    p = 1 / (1 + math.exp(-x))
    return alpha * (1 - p) ** gamma * -math.log(p)


# Other image 5: two pixels of stuff class 3, one of stuff class 4, one of thing class 3 (a thing
# and a stuff class never share an id in one dataset; here it checks the flag is what counts).
OTHER = dict(ids=[5, 5, 5, 5], classes=[3, 3, 4, 3], stuff=[True, True, True, False])


def test_values_against_hand_computation():
    """Query (image 1) of stuff class 3 on image 5's pixels, logits 2, 2, 2, 2: positives on the
    two class-3 stuff pixels, negatives on the others; a thing query: all negatives."""
    emb = [[1.0, 0.0]] * 4
    bank = samples(emb, **OTHER)
    q = torch.tensor([[2.0, 0.0], [2.0, 0.0]], dtype=torch.float64)
    stuff_query = inter_scene_loss(q[:1], torch.tensor([1]), [bank], query_stuff_classes=torch.tensor([3]))
    thing_query = inter_scene_loss(q[1:], torch.tensor([1]), [bank], query_stuff_classes=torch.tensor([-1]))
    assert stuff_query.item() == pytest.approx((2 * focal1(2.0) + 2 * focal0(2.0)) / 4, rel=1e-6)
    assert thing_query.item() == pytest.approx(focal0(2.0), rel=1e-6)
    # both at once: the mean over the queries of their own means
    both = inter_scene_loss(q, torch.tensor([1, 1]), [bank], query_stuff_classes=torch.tensor([3, -1]))
    assert both.item() == pytest.approx((stuff_query.item() + thing_query.item()) / 2, rel=1e-6)


def test_a_stuff_query_is_rewarded_for_firing_on_its_class_elsewhere():
    """Same pixels; the stuff query fires (+6) on the class-3 stuff pixels and not (-6) on the
    rest: low loss. The reverse: high. A thing query's best is silence everywhere."""
    emb = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]], dtype=torch.float64)
    bank = samples(emb, **OTHER)
    right = torch.tensor([[6.0, -6.0]], dtype=torch.float64)
    wrong = torch.tensor([[-6.0, 6.0]], dtype=torch.float64)
    silent = torch.tensor([[-6.0, -6.0]], dtype=torch.float64)
    loss = lambda q, c: inter_scene_loss(q, torch.tensor([1]), [bank], query_stuff_classes=torch.tensor([c])).item()  # noqa: E731
    assert loss(right, 3) < 1e-3 < 0.3 < loss(wrong, 3)
    assert loss(right, 3) == pytest.approx((2 * focal1(6.0) + 2 * focal0(-6.0)) / 4, rel=1e-6)
    assert loss(silent, -1) < loss(right, -1) and loss(silent, -1) == pytest.approx(focal0(-6.0), rel=1e-6)
    # the gradient of the stuff query raises its logit on its class's pixels
    q = right.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(inter_scene_loss(q, torch.tensor([1]), [bank], query_stuff_classes=torch.tensor([3])), q)
    assert g[0, 0] < 0  # descent increases q . e on the class-3 pixels


def test_own_image_stays_out_even_for_its_own_stuff_class():
    bank = samples([[1.0, 0.0]] * 4, ids=[1, 1, 5, 5], classes=[3, 3, 3, 3], stuff=[True] * 4)
    q = torch.tensor([[2.0, 0.0]], dtype=torch.float64)
    loss = inter_scene_loss(q, torch.tensor([1]), [bank], query_stuff_classes=torch.tensor([3]))
    assert loss.item() == pytest.approx(focal1(2.0), rel=1e-6)  # only image 5's two pixels count


@pytest.mark.parametrize("loss_name", ["focal", "ce", "l1", "l2"])
@pytest.mark.parametrize("chunk", [3, 16, 1000])
def test_fused_matches_the_naive_reference_with_mixed_targets(loss_name, chunk):
    torch.manual_seed(0)
    d, q_count = 8, 12
    queries = torch.randn(q_count, d, dtype=torch.float64, requires_grad=True)
    batch_emb = torch.randn(23, d, dtype=torch.float64, requires_grad=True)
    banks = [
        samples(batch_emb, torch.randint(0, 4, (23,)), torch.randint(0, 5, (23,)), torch.rand(23) < 0.5),
        samples(torch.randn(150, d), torch.randint(0, 10, (150,)), torch.randint(0, 5, (150,)), torch.rand(150) < 0.5),
    ]
    qids = torch.randint(0, 4, (q_count,))
    qstuff = torch.where(torch.rand(q_count) < 0.5, torch.randint(0, 5, (q_count,)), torch.tensor(-1))
    assert (qstuff >= 0).any() and (qstuff < 0).any()
    kwargs = dict(loss=loss_name, alpha=0.1, gamma=2.5, query_stuff_classes=qstuff)
    ours = inter_scene_loss(queries, qids, banks, chunk_size=chunk, **kwargs)
    g_ours = torch.autograd.grad(ours, [queries, batch_emb])
    ref = naive_inter_scene_loss(queries, qids, banks, **kwargs)
    g_ref = torch.autograd.grad(ref, [queries, batch_emb])
    assert ours.item() == pytest.approx(ref.item(), rel=1e-6)
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-9)
    # and the targets matter: the same inputs without stuff queries give another loss
    assert inter_scene_loss(queries, qids, banks, chunk_size=chunk, loss=loss_name).item() != pytest.approx(ours.item())


def test_without_stuff_queries_the_loss_is_exactly_the_all_zero_one():
    """Samples carrying classes and stuff flags change nothing for thing queries: bit for bit."""
    torch.manual_seed(1)
    queries, qids = torch.randn(7, 8), torch.randint(0, 6, (7,))
    emb, ids = torch.randn(60, 8), torch.randint(0, 6, (60,))
    plain = inter_scene_loss(queries, qids, [samples(emb, ids, dtype=torch.float32)])
    with_classes = inter_scene_loss(
        queries, qids, [samples(emb, ids, torch.randint(0, 5, (60,)), torch.ones(60, dtype=torch.bool), torch.float32)],
        query_stuff_classes=torch.full((7,), -1))
    assert torch.equal(plain, with_classes)


def test_the_memory_keeps_classes_through_save_and_load_and_reads_old_checkpoints():
    mem = PixelMemory(5)
    mem.enqueue(samples(torch.randn(3, 4), [1, 2, 3], [7, 8, 9], [True, False, True], torch.float32))
    mem.enqueue(samples(torch.randn(4, 4), [4, 5, 6, 7], [1, 2, 3, 4], [False, False, True, True], torch.float32))
    state = mem.state_dict()
    restored = PixelMemory(5)
    restored.load_state_dict(state)
    for key in ("classes", "stuff", "image_ids"):
        assert torch.equal(getattr(restored.samples(), key), getattr(mem.samples(), key)), key
    assert mem.chronological().classes.tolist() == [9, 1, 2, 3, 4]  # FIFO: the oldest two dropped
    assert restored.samples().stuff_classes().tolist() == [3, 4, 9, -1, -1]  # slot order
    old = {k: v for k, v in state.items() if k not in ("classes", "stuff")}  # a checkpoint from before
    legacy = PixelMemory(5)
    legacy.load_state_dict(old)
    assert legacy.samples().classes.tolist() == [-1] * 5 and not legacy.samples().stuff.any()


def test_the_sampler_gives_each_sample_its_segments_class():
    """Image 0: a thing of class 2 (left column) and a stuff segment of class 7 (the rest); image 1:
    one stuff segment of class 7. K pixels per segment, each with its segment's class and flag."""
    emb = torch.randn(2, 3, 4, 4)
    thing = torch.zeros(4, 4, dtype=torch.bool)
    thing[:, 0] = True
    masks = [torch.stack([thing, ~thing]), torch.ones(1, 4, 4, dtype=torch.bool)]
    out = sample_pixels(emb, masks, torch.tensor([10, 11]), 4, "instance", pixels_per_instance=3,
                        instance_classes=[torch.tensor([2, 7]), torch.tensor([7])],
                        instance_stuff=[torch.tensor([False, True]), torch.tensor([True])])
    assert len(out) == 9
    x = out.locations[:, 0]
    for i in range(9):
        first_column = bool(x[i] == 2) and int(out.image_ids[i]) == 10
        assert int(out.classes[i]) == (2 if first_column else 7) and bool(out.stuff[i]) == (not first_column)
    dense = sample_pixels(emb, masks, torch.tensor([10, 11]), 4, "dense",
                          instance_classes=[torch.tensor([2, 7]), torch.tensor([7])],
                          instance_stuff=[torch.tensor([False, True]), torch.tensor([True])])
    assert len(dense) == 32 and int((dense.classes == 2).sum()) == 4 and int(dense.stuff.sum()) == 28
    plain = sample_pixels(emb, masks, torch.tensor([10, 11]), 4, "image", pixels_per_image=5)
    assert plain.classes.tolist() == [-1] * 10 and not plain.stuff.any()


def test_thing_or_stuff_comes_from_the_metadata():
    from iuq.inter.stuff import stuff_classes_of, stuff_flags

    # panoptic: things are contiguous ids 0 and 2 of 5 (dataset ids 11, 13), the rest stuff
    panoptic = {"thing_dataset_id_to_contiguous_id": {11: 0, 13: 2}, "stuff_dataset_id_to_contiguous_id": {12: 1, 14: 3, 15: 4}}
    flags = stuff_flags(panoptic, 5)
    assert flags.tolist() == [False, True, False, True, True]
    assert stuff_classes_of(torch.tensor([0, 1, 2, 3, 4, -1]), flags).tolist() == [-1, 1, -1, 3, 4, -1]
    # instance segmentation metadata: things only, whatever the ids
    assert not stuff_flags({"thing_dataset_id_to_contiguous_id": {1: 0, 90: 79}}, 80).any()
    with pytest.raises(ValueError, match="outside the model's 3 classes"):
        stuff_flags({"thing_dataset_id_to_contiguous_id": {1: 5}, "stuff_classes": ["sky"]}, 3)
