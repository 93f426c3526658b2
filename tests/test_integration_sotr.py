"""IUQ on the real SOTR (github.com/easton-cau/SOTR), on real COCO images, on the CPU: the losses,
their gradients, the memory, a train_net.py run whose weights load into stock SOTR, and
--eval-only segm AP.

SOTR's package is also named `adet`, so this runs only in SOTR's own environment (README: SOTR);
elsewhere it is skipped with the reason. One SOTR training step at short side 256 (2 images, R50,
random init) takes ~22 s and 6 GB on a 2-core CPU, ~45 s and 11 GB with IUQ (its views double the
batch; IUQ's own losses take ~0.1 s), so the module runs one forward and one training iteration
(~1.5 min in all)."""
import gc
import sys
from types import SimpleNamespace

import pytest
import torch

from adelaidet_support import (CONFIGS, MODEL_SMALL, REPO, SMALL, check_trains_through_empty_images,
                               register_subset, require_sotr)
from autograd_support import check_iuq_loss_reaches, iuq_gradients

require_sotr()
sys.path.insert(0, str(REPO))
import train_net  # noqa: E402
from iuq.engine.trainer import IUQTrainer  # noqa: E402

# Score thresholds at 0 so that a barely trained model still emits masks. SOTR decodes a mask for
# every (grid cell, class) pair above SCORE_THR before NMS_PRE applies: at 0 and its grids that is
# 3872 x 80 masks (~11 GB, ~1 min here). A coarser grid at test time (no weight depends on it: the
# twin transformer has no positional parameters) keeps it at 404 x 80 (~2 GB, ~10 s).
EVAL = ["MODEL.SOTR.SCORE_THR", "0.0", "MODEL.SOTR.UPDATE_THR", "0.0", "MODEL.SOTR.NUM_GRIDS", "[12, 12, 8, 6, 4]",
        "MODEL.SOTR.NMS_PRE", "50", "MODEL.SOTR.MAX_PER_IMG", "20"]


def args_for(out, *opts, eval_only=False):
    argv = ["--config-file", str(CONFIGS["SOTR"])] + ["--eval-only"] * eval_only
    opts = SMALL + MODEL_SMALL["SOTR"] + ["OUTPUT_DIR", str(out)] + list(opts)
    return train_net.default_argument_parser().parse_args(argv + opts)


def probes(model):
    """(kernel head, mask head) parameters each IUQ loss must reach: the Linear that turns the
    twin transformer's features into kernels, and the mask head's last 1x1 convolution."""
    return model.cate_head.kernel_pred.weight, model.mask_head.conv_pred[0].weight


@pytest.fixture(scope="module")
def forward(tmp_path_factory):
    """One batch's losses (originals and their views) and each IUQ loss's gradients. Only what
    the tests read is kept: the graph and the trainer take ~10 GB, and the module's other
    fixture trains a second SOTR."""
    cfg = train_net.setup(args_for(tmp_path_factory.mktemp("sotr_forward")))
    trainer = IUQTrainer(cfg)
    batch = next(trainer._trainer._data_loader_iter)
    loss_dict, samples = trainer.forward_losses(batch)
    grads = {
        key: iuq_gradients(loss_dict[key], *probes(trainer.model))
        for key in ("loss_inter", "loss_equi")
    }
    kept = SimpleNamespace(
        model=type(trainer.model).__name__, adapter=type(trainer.adapter), stride=trainer.adapter.stride,
        batch=[{"image_id": d["image_id"], "instances": len(d["instances"])} for d in batch],
        losses={k: v.detach() for k, v in loss_dict.items()}, samples=samples.detach(), grads=grads,
    )
    del trainer, loss_dict
    gc.collect()
    return kept


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One training iteration through train_net.main; its output folder (model_final.pth)."""
    out = tmp_path_factory.mktemp("sotr_run")
    train_net.main(args_for(out, "SOLVER.MAX_ITER", "1", "DATASETS.TEST", "()"))
    gc.collect()  # the trainer is gone: free its memory before the next model is built
    return out


def test_adapter_is_the_solo_family_one(forward):
    from iuq.adapters.grid_kernels import GridKernelAdapter

    assert forward.model == "SOTR"
    assert forward.adapter.__name__ == "SOTR" and issubclass(forward.adapter, GridKernelAdapter)
    assert forward.stride == 4  # the unified mask feature


def test_iuq_losses_are_finite_and_non_zero(forward):
    losses = forward.losses
    for key in ("loss_inter", "loss_equi"):
        assert torch.isfinite(losses[key]) and losses[key].item() > 0, (key, losses[key])
    assert {"loss_ins", "loss_cate"} <= set(losses)  # SOTR's own losses are still there
    assert all(torch.isfinite(v) for v in losses.values()), losses


@pytest.mark.parametrize("key", ["loss_inter", "loss_equi"])
def test_each_iuq_loss_reaches_kernel_head_and_mask_head(forward, key):
    check_iuq_loss_reaches(key, forward.grads[key], ("kernel head", "mask head"), "SOTR")


def test_batch_samples_are_256_d_and_carry_the_batch_image_ids(forward):
    samples = forward.samples
    assert samples.embeddings.shape[1] == 256 and torch.isfinite(samples.embeddings).all()
    assert set(samples.image_ids.tolist()) == {int(d["image_id"]) for d in forward.batch}
    # Instance-balanced: at most 50 samples per instance.
    for d in forward.batch:
        count = int((samples.image_ids == int(d["image_id"])).sum())
        assert 0 < count <= 50 * d["instances"]


def test_training_fills_the_memory_with_256_d_samples_of_training_images(run):
    from detectron2.data import DatasetCatalog

    memory = torch.load(run / "model_final.pth", map_location="cpu", weights_only=False)["iuq_memory"]
    embeddings, image_ids = memory["embeddings"], memory["image_ids"]  # the filled slots only
    assert len(embeddings) > 0 and embeddings.shape[1] == 256 and torch.isfinite(embeddings).all()
    dataset_ids = {d["image_id"] for d in DatasetCatalog.get("coco_2017_train")}
    stored = set(image_ids.tolist())
    assert stored <= dataset_ids and len(stored) == 2  # one iteration of 2 images


def test_final_weights_load_into_the_stock_sotr_model(run):
    from detectron2.modeling import build_model

    stock = build_model(train_net.setup(args_for(run)))  # plain SOTR: no IUQ adapter installed
    assert type(stock).__name__ == "SOTR"
    state = torch.load(run / "model_final.pth", map_location="cpu", weights_only=False)["model"]
    result = stock.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert not any("iuq" in k.lower() for k in state)


def test_eval_only_reports_segm_ap(run, tmp_path):
    register_subset("iuq_test_coco_val2", 2, tmp_path)
    results = train_net.main(args_for(
        tmp_path / "eval", "MODEL.WEIGHTS", str(run / "model_final.pth"),
        "DATASETS.TEST", "('iuq_test_coco_val2',)", *EVAL, eval_only=True,
    ))
    ap = results["segm"]["AP"]
    assert isinstance(ap, float) and 0.0 <= ap <= 100.0


def test_batches_with_images_without_instances_train(tmp_path):
    """SOTR's own ground truth and loss fail on an image without instances and on a batch without
    any (as SOLOv2's: the same code); the adapter carries it through, with IUQ on. ~6 min here."""
    cfg = train_net.setup(args_for(tmp_path, "DATASETS.TRAIN", "('coco_2017_val',)", "DATASETS.TEST", "()",
                                   "DATALOADER.FILTER_EMPTY_ANNOTATIONS", "False"))
    seen = check_trains_through_empty_images(IUQTrainer(cfg), "coco_2017_val", "loss_ins", "loss_cate")
    assert seen == {"none empty", "some empty", "all empty"}
    gc.collect()


def test_the_gradient_bound_measures_at_the_kernel_head(tmp_path):
    """MODEL.IUQ.INTER.GRAD_BOUND on SOTR: measured at the Linear that makes the kernels (its twin
    transformer's ``cate_head.kernel_pred``), the gradient scaled and the value kept. (At this
    test's first step, full weight, the weighted L_inter's gradient there is ~76x the base losses'.)"""
    from bound_support import check_bound_at_query_head

    check_bound_at_query_head(args_for, ["cate_head.kernel_pred.weight", "cate_head.kernel_pred.bias"], tmp_path)
