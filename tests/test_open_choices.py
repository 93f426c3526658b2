"""The paper's open choices as ``MODEL.IUQ`` options (issue 26, item 3), each on a hand-computed
example: INTER.DETACH_NEGATIVES (Algorithm 1's detached batch features), INTER.ALPHA_WEIGHTS
(which side of the focal loss alpha weighs), EQUI.DRAW (Algorithm 1's ``RandomChoice`` per batch
vs flip-then-crop per image), INTER.QUERIES (every positive and the views' queries vs one query
per instance of the originals); and their validation at start-up."""
import math
import random
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("detectron2", reason="detectron2 is not installed (not on PyPI; see README)")

from detectron2.structures import BitMasks, Boxes, Instances  # noqa: E402

from iuq.adapters.base import Captured, one_query_per_instance  # noqa: E402
from iuq.adapters.grid_kernels import GridKernelAdapter  # noqa: E402
from iuq.config import get_iuq_cfg, validate_iuq_config  # noqa: E402
from iuq.engine.trainer import IUQTrainer  # noqa: E402
from iuq.equi.transforms import Crop, HFlip  # noqa: E402
from iuq.equi.views import add_views  # noqa: E402
from iuq.inter.losses import DotProductDecode  # noqa: E402
from iuq.inter.memory import PixelMemory  # noqa: E402

ALPHA, GAMMA = 0.1, 2.5


class CountingDecode(DotProductDecode):
    """The dot-product decode, remembering how many queries (and which) the loss prepared."""

    def prepare(self, queries, query_meta):
        self.seen = queries.detach().clone()
        return super().prepare(queries, query_meta)


def trainer(*overrides):
    """An IUQTrainer with nothing but what ``inter_loss`` reads: a dot-product adapter, an empty
    memory, no stuff classes."""
    cfg = get_iuq_cfg()
    cfg.merge_from_list(list(overrides))
    validate_iuq_config(cfg)
    t = IUQTrainer.__new__(IUQTrainer)
    t.iuq_cfg = cfg.MODEL.IUQ
    t.adapter = SimpleNamespace(decode_samples=CountingDecode(), query_instances=lambda cap: cap.gt_index)
    t.stuff = torch.zeros(0, dtype=torch.bool)
    t.memory = PixelMemory(0)
    return t


def two_queries_three_samples():
    """Two images (dataset ids 10, 11) on a stride-1 map of 1 x 2 cells, D = 2. Image 0: one
    instance on cell 0 (embedding e0 = (1, 0); cell 1 is background); image 1: one instance on
    both cells (e1 = (0, 1), e2 = (-1, 1)). Query q0 = (1, 2) of image 0, q1 = (0.5, -1) of image 1.
    Negatives: q0 on e1, e2 (logits 2, 1); q1 on e0 (logit 0.5)."""
    emb = torch.tensor([[[[1.0, 5.0]], [[0.0, 5.0]]], [[[0.0, -1.0]], [[1.0, 1.0]]]], requires_grad=True)
    queries = torch.tensor([[1.0, 2.0], [0.5, -1.0]], requires_grad=True)
    masks = [torch.tensor([[[True, False]]]), torch.tensor([[[True, True]]])]
    batch = [{"instances": Instances((1, 2), gt_classes=torch.zeros(1, dtype=torch.int64))} for _ in range(2)]
    cap = Captured(queries=queries, query_images=torch.tensor([0, 1]), query_meta={}, gt_index=torch.tensor([0, 1]),
                   embeddings=emb, stride=1)
    return cap, emb, batch, torch.tensor([10, 11]), masks


def focal(x, weight):
    """weight * p^gamma * -log(1 - p), and its derivative weight * p^gamma (gamma (1 - p) s + p)."""
    p = 1 / (1 + math.exp(-x))
    s = -math.log(1 - p)
    return weight * p**GAMMA * s, weight * p**GAMMA * (GAMMA * (1 - p) * s + p)


def run_inter(t):
    cap, emb, batch, ids, masks = two_queries_three_samples()
    loss, _ = t.inter_loss(cap, emb, batch, ids, masks)
    loss.backward()
    return loss, emb.grad, cap.queries.grad


def test_defaults_follow_algorithm_1_where_it_speaks_and_are_validated():
    iuq = get_iuq_cfg().MODEL.IUQ
    # Algorithm 1 (supplementary): external_feats.clone().detach(); RandomChoice([flip, crop]).
    assert iuq.INTER.DETACH_NEGATIVES is True and iuq.EQUI.DRAW == "per_batch_choice"
    # Where the paper is silent, this project's first behaviour (the study decides).
    assert iuq.INTER.ALPHA_WEIGHTS == "positives" and iuq.INTER.QUERIES == "all"
    for key, value, why in [("INTER.DETACH_NEGATIVES", "yes", "True or False"),
                            ("INTER.ALPHA_WEIGHTS", "both", "one of"),
                            ("INTER.QUERIES", "matched", "one of"),
                            ("EQUI.DRAW", "per_batch", "one of")]:
        cfg = get_iuq_cfg()
        node = cfg.MODEL.IUQ
        *path, last = key.split(".")
        for part in path:
            node = node[part]
        node[last] = value
        with pytest.raises(ValueError, match=rf"MODEL\.IUQ\.{key} = '{value}': .*{why}"):
            validate_iuq_config(cfg)


def test_detached_negatives_give_the_same_loss_and_no_gradient_into_the_negatives():
    f2, f1, f05 = focal(2.0, 1 - ALPHA), focal(1.0, 1 - ALPHA), focal(0.5, 1 - ALPHA)
    hand = 0.5 * ((f2[0] + f1[0]) / 2 + f05[0])
    attached, grad_on, q_grad_on = run_inter(trainer("MODEL.IUQ.INTER.DETACH_NEGATIVES", "False"))
    detached, grad_off, q_grad_off = run_inter(trainer("MODEL.IUQ.INTER.DETACH_NEGATIVES", "True"))
    assert attached.item() == pytest.approx(hand, rel=1e-6)
    assert detached.item() == attached.item()
    # Attached: e0 = emb[0, :, 0, 0] is q1's negative, d L / d e0 = 1/2 * f'(0.5) * q1; image 1's
    # cells are q0's, d L / d e_k = 1/2 * 1/2 * f'(logit) * q0; image 0's background cell: none.
    q0, q1 = torch.tensor([1.0, 2.0]), torch.tensor([0.5, -1.0])
    assert torch.allclose(grad_on[0, :, 0, 0], 0.5 * f05[1] * q1, rtol=1e-5)
    assert torch.allclose(grad_on[1, :, 0, 0], 0.25 * f2[1] * q0, rtol=1e-5)
    assert torch.allclose(grad_on[1, :, 0, 1], 0.25 * f1[1] * q0, rtol=1e-5)
    assert grad_on[0, :, 0, 1].abs().sum() == 0
    assert grad_on.abs().sum() > 0
    # Detached: exactly zero into the negatives (the embedding map), the queries' gradient as before.
    assert grad_off is None or bool((grad_off == 0).all())
    assert torch.equal(q_grad_on, q_grad_off)


def test_alpha_weighting_the_negatives_is_exactly_alpha_over_one_minus_alpha_of_fvcores():
    positives, _, _ = run_inter(trainer())
    negatives, _, _ = run_inter(trainer("MODEL.IUQ.INTER.ALPHA_WEIGHTS", "negatives"))
    hand = 0.5 * ((focal(2.0, ALPHA)[0] + focal(1.0, ALPHA)[0]) / 2 + focal(0.5, ALPHA)[0])
    assert negatives.item() == pytest.approx(hand, rel=1e-6)
    assert positives.item() / negatives.item() == pytest.approx((1 - ALPHA) / ALPHA, rel=1e-6)


def toy_capture(quality=True):
    """Two originals and one view (batch index 2). Image 0: three queries on instance 0 (quality
    0.2, 0.9, 0.5), one on instance 1; image 1: two on instance 2 (tied 0.7); the view: two on
    instance 3."""
    images = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2])
    gt = torch.tensor([0, 0, 0, 1, 2, 2, 3, 3])
    q = torch.tensor([0.2, 0.9, 0.5, 0.1, 0.7, 0.7, 1.0, 0.3]) if quality else None
    queries = torch.arange(16, dtype=torch.float32).reshape(8, 2).requires_grad_()
    return Captured(queries=queries, query_images=images, query_meta={"levels": torch.arange(8)}, gt_index=gt,
                    query_quality=q, embeddings=torch.zeros(2, 2, 1, 2, requires_grad=True), stride=1)


def test_one_query_per_instance_keeps_the_best_of_each_originals_instance():
    cap = toy_capture()
    originals = cap.query_images < 2
    assert one_query_per_instance(cap.gt_index, originals, cap.query_quality).tolist() == [1, 3, 4]
    assert one_query_per_instance(cap.gt_index, originals).tolist() == [0, 3, 4]  # no quality: the first
    assert one_query_per_instance(cap.gt_index, torch.zeros(8, dtype=torch.bool)).tolist() == []


def test_matched_originals_feed_one_query_per_instance_into_the_loss():
    cap = toy_capture()
    emb = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]], [[[0.5, 0.5]], [[-1.0, 1.0]]]], requires_grad=True)
    masks = [torch.ones(1, 1, 2, dtype=torch.bool), torch.ones(1, 1, 2, dtype=torch.bool)]
    batch = [{"instances": Instances((1, 2), gt_classes=torch.zeros(1, dtype=torch.int64))} for _ in range(2)]
    ids = torch.tensor([10, 11, 10])  # the view carries its original's id
    every = trainer()
    every.inter_loss(cap, emb, batch, ids, masks)
    assert torch.equal(every.adapter.decode_samples.seen, cap.queries.detach())  # all 8, views' included
    matched = trainer("MODEL.IUQ.INTER.QUERIES", "matched_originals")
    loss, _ = matched.inter_loss(cap, emb, batch, ids, masks)
    assert torch.equal(matched.adapter.decode_samples.seen, cap.queries.detach()[[1, 3, 4]])
    loss.backward()
    assert cap.queries.grad[[0, 2, 5, 6, 7]].abs().sum() == 0 and cap.queries.grad[[1, 3, 4]].abs().sum() > 0


def test_grid_kernel_models_name_an_instance_by_its_target_mask():
    """SOLOv2 / SOTR hold one target mask per positive cell: cells with the same mask in the same
    image are one instance, whatever their level."""
    a, b = torch.zeros(4, 4, dtype=torch.uint8), torch.zeros(4, 4, dtype=torch.uint8)
    a[:2], b[2:] = 1, 1
    masks = torch.stack([a, a, b, a, a])
    cap = Captured(query_images=torch.tensor([0, 0, 0, 0, 1]), gt_masks=masks, gt_index=torch.arange(5))
    ids = GridKernelAdapter.query_instances(None, cap).tolist()
    assert ids[0] == ids[1] == ids[3] and len({ids[0], ids[2], ids[4]}) == 3
    assert one_query_per_instance(torch.tensor(ids), torch.ones(5, dtype=torch.bool)).tolist() == [0, 2, 4]


def batch_of(sizes):
    out = []
    for k, (h, w) in enumerate(sizes):
        m = torch.zeros(1, h, w, dtype=torch.bool)
        m[0, h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = True
        inst = Instances((h, w), gt_boxes=Boxes(BitMasks(m).get_bounding_boxes().tensor),
                         gt_classes=torch.zeros(1, dtype=torch.int64), gt_masks=BitMasks(m))
        out.append({"image_id": k, "image": torch.zeros(3, h, w), "instances": inst, "height": h, "width": w})
    return out


def test_per_batch_choice_gives_every_image_of_a_batch_the_same_single_transform_kind():
    equi, rng, kinds = get_iuq_cfg().MODEL.IUQ.EQUI, random.Random(0), []  # the default
    batch = batch_of([(64, 96), (80, 64), (56, 72)])
    for _ in range(40):
        _, views = add_views(batch, 8, equi, torch.zeros(3, 1, 1), rng)
        per_image = [type(t).__name__ for v in views for t in v.g.transforms]
        assert all(len(v.g.transforms) == 1 for v in views)  # a single transform each
        assert len(set(per_image)) == 1  # one kind for the batch
        kinds.append(per_image[0])
        if per_image[0] == "Crop":  # a crop of each image's own size
            assert all(isinstance(v.g.transforms[0], Crop) and v.g.in_size == tuple(d["image"].shape[-2:])
                       for v, d in zip(views, batch))
    assert set(kinds) == {"HFlip", "Crop"}


def test_per_image_compose_is_flip_then_crop():
    cfg = get_iuq_cfg()
    cfg.merge_from_list(["MODEL.IUQ.EQUI.DRAW", "per_image_compose"])
    equi = cfg.MODEL.IUQ.EQUI
    rng, shapes = random.Random(0), set()
    for _ in range(20):
        _, views = add_views(batch_of([(64, 96), (80, 64)]), 8, equi, torch.zeros(3, 1, 1), rng)
        for v in views:
            names = [type(t).__name__ for t in v.g.transforms]
            assert names in (["Crop"], ["HFlip", "Crop"])  # always a crop, a flip before it half the time
            shapes.add(tuple(names))
    assert len(shapes) == 2


def test_a_crop_batch_that_would_lose_every_instance_falls_back_to_the_whole_image_crop():
    cfg = get_iuq_cfg()
    cfg.merge_from_list(["MODEL.IUQ.EQUI.DRAW", "per_batch_choice", "MODEL.IUQ.EQUI.TRANSFORMS", "('crop',)",
                         "MODEL.IUQ.EQUI.CROP_RANGE", "(0.1, 0.1)"])
    d = batch_of([(80, 80)])[0]
    m = torch.zeros(1, 80, 80, dtype=torch.bool)
    m[0, 0, 0] = True  # one pixel in a corner: a 1-cell crop keeps it only if it lands there
    d["instances"].gt_masks = BitMasks(m)
    boxes = set()
    for seed in range(10):
        (_, view), (meta,) = add_views([d], 8, cfg.MODEL.IUQ.EQUI, torch.zeros(3, 1, 1), random.Random(seed))
        (t,) = meta.g.transforms
        assert isinstance(t, Crop) and not isinstance(t, HFlip) and len(view["instances"]) == 1
        assert t.box[:2] == (0, 0)  # the lucky 1-cell crop on the corner, or the whole image
        boxes.add(t.box)
    assert (0, 0, 80, 80) in boxes
