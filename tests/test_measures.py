"""The IUQ measures' arithmetic on hand-made tensors whose answers are known by hand (no
detectron2): false activation, relative error, hard dice, instance assignment, sampling."""
import math

import torch

from iuq.evaluation.measures import (
    assign_instances,
    false_activation,
    hard_dice,
    pick_per_group,
    relative_error,
    sample_instance_pixels,
)


def test_false_activation_counts_only_the_included_pairs():
    logits = torch.tensor([[0.0, 100.0, -100.0], [math.log(3.0), 0.0, 5.0]])  # p: .5 1 0 / .75 .5 .993
    include = torch.tensor([[True, True, True], [True, False, False]])
    total, above, count = false_activation(logits, include)
    assert count == 4
    assert total == torch.tensor(0.5 + 1.0 + 0.0 + 0.75).item()
    assert above == 2  # 1.0 and 0.75; 0.5 is not above 0.5


def test_relative_error():
    expected = torch.tensor([[3.0, 4.0]])
    assert relative_error(expected, expected) == 0.0
    assert relative_error(torch.tensor([[3.0, 0.0]]), expected) == 4.0 / 5.0
    assert math.isnan(relative_error(expected, torch.zeros(1, 2)))


def test_hard_dice():
    targets = torch.tensor([[[1.0, 1.0, 0.0, 0.0]], [[0.0, 0.0, 0.0, 0.0]], [[1.0, 0.0, 0.0, 0.0]]])
    logits = torch.tensor([[[2.0, -1.0, 3.0, -2.0]], [[-1.0, -1.0, -1.0, -1.0]], [[-1.0, 1.0, -1.0, -1.0]]])
    # row 0: P = {0, 2}, T = {0, 1}: 2 * 1 / 4; row 1: both empty: 1; row 2: disjoint: 0
    assert hard_dice(logits, targets).tolist() == [0.5, 1.0, 0.0]


def test_assign_instances_by_highest_iou():
    masks = torch.zeros(2, 4, 4, dtype=torch.bool)
    masks[0, :2, :2] = True
    masks[1, 2:, :] = True
    targets = torch.zeros(3, 4, 4)
    targets[0, :2, :1] = 1  # inside instance 0
    targets[1, 1:, :] = 1  # overlaps both, IoU 2/12 with 0 and 8/12 with 1
    # targets[2] empty: no instance
    assert assign_instances(targets, masks).tolist() == [0, 1, -1]
    assert assign_instances(targets, masks[:0]).tolist() == [-1, -1, -1]


def test_pick_per_group_takes_at_most_k_of_each_group():
    groups = torch.tensor([0, 0, 0, 1, -1, 1, 2])
    picked = pick_per_group(groups, 2, torch.Generator().manual_seed(0))
    chosen = groups[picked].tolist()
    assert chosen.count(0) == 2 and chosen.count(1) == 2 and chosen.count(2) == 1 and -1 not in chosen
    again = pick_per_group(groups, 2, torch.Generator().manual_seed(0))
    assert torch.equal(picked, again)


def test_sample_instance_pixels_stays_inside_each_mask():
    masks = torch.zeros(2, 3, 5, dtype=torch.bool)
    masks[0, 0, :] = True  # 5 cells
    masks[1, 2, 1] = True  # 1 cell
    owner, cell = sample_instance_pixels(masks, 3, torch.Generator().manual_seed(1))
    assert owner.tolist() == [0, 0, 0, 1]
    assert all(masks[o].flatten()[c] for o, c in zip(owner.tolist(), cell.tolist()))
    assert len(set(cell[:3].tolist())) == 3 and cell[3].item() == 2 * 5 + 1
