"""MODEL.IUQ.INTER.QUERIES = matched_originals on the real AdelaiDet models' captures: CondInst's
and SOLOv2's several queries per instance reduced to one per instance of the original images
(CondInst: the positive with the highest FCOS centerness target; SOLOv2: one per distinct target
mask), the views' queries left out. The hand-computed cases are in ``test_open_choices.py``."""
import random

import numpy as np
import pytest
import torch

from adelaidet_support import require_adelaidet, small_cfg

require_adelaidet()

from iuq.engine.trainer import IUQTrainer  # noqa: E402


def selected(name, tmp_path, seed=0):
    # The initialisation, CondInst's proposal clipping and the loader's order (its sampler's seed
    # is drawn from numpy's global RNG when training is not set up by train_net).
    random.seed(seed), np.random.seed(seed), torch.manual_seed(seed)
    trainer = IUQTrainer(small_cfg(name, "OUTPUT_DIR", str(tmp_path), "MODEL.IUQ.INTER.QUERIES", "matched_originals"))
    seen = {}
    inter_queries = trainer.inter_queries

    def spy(cap, num_originals):
        out = inter_queries(cap, num_originals)
        seen.update(cap=cap, num_originals=num_originals, out=out)
        return out

    trainer.inter_queries = spy
    batch = next(trainer._trainer._data_loader_iter)
    loss_dict, _ = trainer.forward_losses(batch)
    assert torch.isfinite(loss_dict["loss_inter"]) and loss_dict["loss_inter"] > 0
    return trainer, seen["cap"], seen["num_originals"], seen["out"]


@pytest.mark.parametrize("seed", [0, 1])
def test_condinst_keeps_each_original_instances_most_central_positive(tmp_path, seed):
    trainer, cap, n, (queries, images, meta, _) = selected("CondInst", tmp_path, seed)
    originals = cap.query_images < n
    assert (cap.query_images >= n).any()  # views' queries were captured, and are left out
    gts = cap.gt_index[originals]
    assert len(queries) == len(gts.unique()) < int(originals.sum())  # ~8 positives per instance before
    assert bool((images < n).all()) and set(meta) == {"locations", "fpn_levels"}
    assert cap.query_quality is not None
    for q, loc in zip(queries, meta["locations"]):
        k = ((cap.queries == q).all(dim=1) & (cap.query_meta["locations"] == loc).all(dim=1)).nonzero()[0, 0]
        same = originals & (cap.gt_index == cap.gt_index[k])
        assert cap.query_quality[k] == cap.query_quality[same].max()


def test_solov2_keeps_one_grid_cell_per_original_instance(tmp_path):
    trainer, cap, n, (queries, images, _, _) = selected("SOLOv2", tmp_path)
    originals = (cap.query_images < n).nonzero(as_tuple=True)[0]
    distinct = {(int(cap.query_images[i]), cap.gt_masks[cap.gt_index[i]].numpy().tobytes()) for i in originals}
    assert len(queries) == len(distinct) < len(originals)
    assert bool((images < n).all())


@pytest.mark.parametrize("detach", [True, False])
def test_condinst_inter_loss_reaches_the_mask_branch_only_through_attached_negatives(tmp_path, detach):
    """MODEL.IUQ.INTER.DETACH_NEGATIVES on the real model: detached (the default, Algorithm 1),
    loss_inter trains the controller (the queries) and nothing of the mask branch; attached, the
    batch's samples carry its gradient into the mask branch too."""
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    trainer = IUQTrainer(small_cfg("CondInst", "OUTPUT_DIR", str(tmp_path), "MODEL.IUQ.EQUI.ENABLED", "False",
                                   "MODEL.IUQ.INTER.DETACH_NEGATIVES", str(detach)))
    loss_dict, _ = trainer.forward_losses(next(trainer._trainer._data_loader_iter))
    model = trainer.model
    controller, mask_branch = torch.autograd.grad(loss_dict["loss_inter"], [model.controller.weight,
                                                  model.mask_branch.tower[-1].weight], allow_unused=True)
    assert controller is not None and controller.abs().sum() > 0
    if detach:
        assert mask_branch is None or not mask_branch.abs().sum()
    else:
        assert mask_branch is not None and mask_branch.abs().sum() > 0
