"""The testbed-property measures (does the data let a query tell its own instance from one at the
same place in another image?) on hand-made tensors (no detectron2): the between-image share of
the embedding's variance and the own-vs-same-position linear probe."""
import math

import torch

from iuq.evaluation.measures import (
    between_image_share,
    between_share_from_statistics,
    group_statistics,
    own_vs_same_position_probe,
    probe_balanced_accuracy,
)


def test_between_image_share_by_hand():
    # Values 0, 2 | 4, 6: grand mean 3, total SS 9 + 1 + 1 + 9 = 20; image means 1 and 5, between
    # SS 2 * 4 + 2 * 4 = 16: share 0.8.
    features = torch.tensor([[0.0], [2.0], [4.0], [6.0]])
    groups = torch.tensor([0, 0, 1, 1])
    assert math.isclose(between_image_share(features, groups), 0.8, rel_tol=1e-12)
    # Channels are summed: a second channel constant within and across images changes nothing;
    # one that varies only within images (+-1 in each) adds 4 to the total: 16 / 24.
    two = torch.tensor([[0.0, 1.0], [2.0, -1.0], [4.0, 1.0], [6.0, -1.0]])
    assert math.isclose(between_image_share(two, groups), 16.0 / 24.0, rel_tol=1e-12)


def test_between_share_accumulates_over_batches():
    torch.manual_seed(0)
    features, groups = torch.randn(40, 3), torch.arange(40) % 5
    stats = [group_statistics(features[groups == g], torch.zeros(int((groups == g).sum()), dtype=torch.long))
             for g in range(5)]  # one image at a time, as the evaluator gathers them
    joined = [torch.cat([s[k] for s in stats]) for k in range(3)]
    assert math.isclose(between_share_from_statistics(*joined), between_image_share(features, groups), rel_tol=1e-9)


def test_between_share_extremes():
    groups = torch.tensor([0, 0, 1, 1])
    assert between_image_share(torch.tensor([[1.0], [1.0], [3.0], [3.0]]), groups) == 1.0  # alike within images
    assert between_image_share(torch.tensor([[1.0], [3.0], [1.0], [3.0]]), groups) == 0.0  # images alike
    assert math.isnan(between_image_share(torch.ones(4, 2), groups))


def test_probe_by_hand():
    # Symmetric 1-d training set: the fitted score's sign is the feature's. Test positives 0.5
    # and -0.5 (one right: TPR 1/2), test negative -3 (right: TNR 1): balanced accuracy 0.75.
    acc = probe_balanced_accuracy(torch.tensor([[1.0], [2.0]]), torch.tensor([[-1.0], [-2.0]]),
                                  torch.tensor([[0.5], [-0.5]]), torch.tensor([[-3.0]]))
    assert acc == 0.75


def test_probe_separable_and_identical():
    g = torch.Generator().manual_seed(0)
    shift = torch.zeros(8)
    shift[3] = 3.0
    pos, neg = torch.randn(40, 8, generator=g) + shift, torch.randn(120, 8, generator=g) - shift
    assert probe_balanced_accuracy(pos[:20], neg[:60], pos[20:], neg[60:]) >= 0.97
    same = torch.randn(20, 8, generator=g)
    # Own and other pixels identical: whatever the classifier says, it says it of both: exactly 0.5.
    assert probe_balanced_accuracy(same[:10], same[:10], same[10:], same[10:].repeat(3, 1)) == 0.5


def _batch(own_shift):
    """Two 8-channel maps 4x5 (the second image valid on 4x4 only), one 6-cell instance each."""
    g = torch.Generator().manual_seed(1)
    maps = torch.randn(2, 8, 4, 5, generator=g) * 0.3
    masks = [torch.zeros(1, 4, 5, dtype=torch.bool), torch.zeros(1, 4, 5, dtype=torch.bool)]
    masks[0][0, 1:3, 1:4] = True
    masks[1][0, 0:2, 0:3] = True
    maps[0, 2, 1:3, 1:4] += own_shift  # image 0's instance differs from image 1 at its cells
    maps[1, 5, 0:2, 0:3] -= own_shift
    return maps, [(4, 5), (4, 4)], masks


def test_own_vs_same_position_probe():
    maps, valid, masks = _batch(own_shift=5.0)
    accs = own_vs_same_position_probe(maps, valid, masks, torch.Generator().manual_seed(0))
    assert len(accs) == 2 and min(accs) == 1.0
    maps, valid, masks = _batch(own_shift=0.0)
    maps[1] = maps[0]  # the two images carry the same embedding: nothing to tell apart
    accs = own_vs_same_position_probe(maps, [(4, 5), (4, 5)], masks, torch.Generator().manual_seed(0))
    assert accs == [0.5, 0.5]
    # Deterministic for a seed; a single image has no other image to compare with.
    again = own_vs_same_position_probe(*_batch(5.0), torch.Generator().manual_seed(0))
    assert again == own_vs_same_position_probe(*_batch(5.0), torch.Generator().manual_seed(0))
    assert own_vs_same_position_probe(maps[:1], valid[:1], masks[:1]) == []


def test_probe_skips_small_instances():
    maps, valid, masks = _batch(own_shift=5.0)
    assert own_vs_same_position_probe(maps, valid, masks, min_cells=7) == []
