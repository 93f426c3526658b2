"""The image-level memory and the per-level transforms of replay adapters (memory_kind "images":
SOLQ), without any framework: the FIFO keyed by image id, its state_dict, all-gather under a
(faked) 2-rank job, the loss excluding a query's own image, and ``g`` on every level of a
multi-stride map against the map of the transformed image (a translation-equivariant toy: average
pooling at strides 8 / 16 / 32 / 64)."""
import random

import pytest
import torch
import torch.nn.functional as F

from iuq.equi.replay import transform_scene
from iuq.equi.transforms import valid_cells
from iuq.equi.views import make_view
from iuq.inter import images
from iuq.inter.images import ImageMemory, Scene, image_inter_loss

STRIDES = (8, 16, 32, 64)


def scene(h, w, c=3, fill=None):
    levels = [torch.full((c, *valid_cells((h, w), s)), float(fill)) if fill is not None
              else torch.randn(c, *valid_cells((h, w), s)) for s in STRIDES]
    return Scene(levels, [torch.zeros(f.shape[-2:], dtype=torch.bool) for f in levels], STRIDES)


def test_fifo_keyed_by_image_id_and_state_dict_round_trip():
    mem = ImageMemory(3, dtype=torch.bfloat16)
    mem.enqueue([(i, scene(64, 96, fill=i)) for i in range(5)], gather=False)
    assert [i for i, _ in mem.scenes()] == [2, 3, 4]
    assert all(f.dtype == torch.bfloat16 and not f.requires_grad for _, s in mem.scenes() for f in s.levels)
    again = ImageMemory(3, dtype=torch.bfloat16)
    again.load_state_dict(mem.state_dict())
    assert [i for i, _ in again.scenes()] == [2, 3, 4]
    for (_, a), (_, b) in zip(mem.scenes(), again.scenes()):
        for x, y in zip(a.levels, b.levels):
            assert torch.equal(x, y)
    with pytest.raises(KeyError, match="SAMPLING"):
        again.load_state_dict({"capacity": 3, "ptr": 0, "embeddings": torch.zeros(0, 8)})
    empty = ImageMemory(0)
    empty.enqueue([(1, scene(64, 64))], gather=False)
    assert len(empty) == 0


def test_every_rank_enqueues_all_ranks_scenes(monkeypatch):
    mine = [(7, scene(64, 64, fill=7))]
    other = [(8, scene(128, 64, fill=8)), (9, scene(64, 64, fill=9))]
    monkeypatch.setattr(images, "_world_size", lambda: 2)
    monkeypatch.setattr(images, "_all_gather_objects", lambda data: [data, other])
    mem = ImageMemory(10)
    mem.enqueue(mine)
    assert [i for i, _ in mem.scenes()] == [7, 8, 9]


def test_inter_loss_skips_a_querys_own_image_and_averages_pairs():
    queries = torch.tensor([[1.0], [2.0], [3.0]], requires_grad=True)
    ids = torch.tensor([10, 10, 11])
    calls = []

    def replay(q, meta, s):  # logits [q, 2]: the query's value plus the scene's
        calls.append(len(q))
        return q.expand(-1, 2) + s.levels[0].mean()

    scenes = [(10, scene(64, 64, fill=0)), (11, scene(64, 64, fill=0)), (12, scene(64, 64, fill=0))]
    loss = image_inter_loss(replay, queries, {}, ids, scenes, "ce", 0.1, 2.5)
    assert calls == [1, 2, 3]  # image 10's scene: only the query of image 11; ...
    # the 6 (query, other image) pairs: query 3 on image 10, queries 1, 2 on 11, all three on 12;
    # 2 classes each, logits = the query's value
    want = sum(2 * F.softplus(torch.tensor(x)) for x in [3.0, 1.0, 2.0, 1.0, 2.0, 3.0]) / 6
    torch.testing.assert_close(loss, want)
    loss.backward()
    assert queries.grad.abs().sum() > 0


def _levels(image):
    """A translation-equivariant 'encoder': average pooling at every stride, on the image padded with
    zeros to the stride (valid cells: ceil(size / stride))."""
    out = []
    for s in STRIDES:
        h, w = valid_cells(image.shape[-2:], s)
        padded = F.pad(image, (0, w * s - image.shape[-1], 0, h * s - image.shape[-2]))
        out.append(F.avg_pool2d(padded[None], s)[0])
    return out


@pytest.mark.parametrize("seed", range(6))
def test_g_on_every_level_matches_the_levels_of_the_transformed_image(seed):
    from detectron2.structures import BitMasks, Boxes, Instances
    from fvcore.common.config import CfgNode

    rng = random.Random(seed)
    h, w = rng.randint(100, 300), rng.randint(100, 300)
    image = torch.rand(3, h, w)
    masks = torch.zeros(1, h, w, dtype=torch.bool)
    masks[0, h // 4: h // 2, w // 4: w // 2] = True
    inst = Instances((h, w), gt_boxes=Boxes(BitMasks(masks).get_bounding_boxes().tensor),
                     gt_classes=torch.zeros(1, dtype=torch.long), gt_masks=BitMasks(masks))
    cfg = CfgNode({"TRANSFORMS": ("flip", "crop"), "CROP_RANGE": (0.6, 1.0), "ROTATION_RANGE": (0.0, 60.0),
                   "SCALE_RANGE": (0.5, 2.0)})
    view, g = make_view({"image": image, "instances": inst, "image_id": 1}, 64, cfg, torch.zeros(3), rng)
    original = Scene(_levels(image), [torch.zeros(f.shape[-2:], dtype=torch.bool) for f in _levels(image)], STRIDES)
    moved = transform_scene(original, g)
    own = _levels(view["image"])
    for f, p, o in zip(moved.levels, moved.pads, own):
        assert f.shape == o.shape and p.shape == f.shape[-2:]
        torch.testing.assert_close(f, o)  # padding cells are zeros in both (the view's canvas is 0 there)
        assert not bool(p.any()) or bool((o[:, p] == 0).all())


def test_feature_mode_is_zero_where_the_levels_are_equivariant():
    from types import SimpleNamespace

    from iuq.equi.replay import replay_equi_loss
    from iuq.equi.transforms import HFlip, TransformList
    from iuq.equi.views import View

    image = torch.rand(3, 100, 150)
    g = TransformList([HFlip((100, 150), 64)], (100, 150), 64)

    def as_scene(img):
        levels = _levels(img)
        return Scene(levels, [torch.zeros(f.shape[-2:], dtype=torch.bool) for f in levels], STRIDES)

    view_image = g.apply_image(image)
    cap = SimpleNamespace(scene=[as_scene(image), as_scene(view_image)])
    loss = replay_equi_loss(None, cap, [View(0, g)], 1, mode="feature")
    assert float(loss) < 1e-12
    cap.scene[1] = as_scene(view_image + 1.0)
    assert float(replay_equi_loss(None, cap, [View(0, g)], 1, mode="feature")) > 0.5
