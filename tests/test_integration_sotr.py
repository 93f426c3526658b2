"""IUQ on the real SOTR (github.com/easton-cau/SOTR), on real COCO images, on the CPU: the losses,
their gradients, the memory, a train_net.py run whose weights load into stock SOTR, and
--eval-only segm AP.

SOTR's package is also named `adet`, so this runs only in SOTR's own environment (README: SOTR);
elsewhere it is skipped with the reason. One SOTR step at short side 256 takes ~25 s on a 2-core
CPU (~2x with IUQ: the views double the batch), so the module runs one forward and one training
iteration, nothing more."""
import pytest
import torch

from adelaidet_support import CONFIGS, MODEL_SMALL, REPO, SMALL, register_subset, require_sotr

require_sotr()

import sys  # noqa: E402

sys.path.insert(0, str(REPO))
import train_net  # noqa: E402
from iuq.trainer import IUQTrainer  # noqa: E402

# Score thresholds at 0 so that a barely trained model still emits masks; fewer candidates than
# SOTR's 500 / 100 keep the matrix NMS and mask pasting quick on the CPU.
EVAL = ["MODEL.SOTR.SCORE_THR", "0.0", "MODEL.SOTR.UPDATE_THR", "0.0",
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
    """One batch's losses (originals and their views) and each IUQ loss's gradients."""
    cfg = train_net.setup(args_for(tmp_path_factory.mktemp("sotr_forward")))
    trainer = IUQTrainer(cfg)
    batch = next(trainer._trainer._data_loader_iter)
    loss_dict, samples = trainer.forward_losses(batch)
    grads = {
        key: torch.autograd.grad(loss_dict[key], probes(trainer.model), retain_graph=True)
        for key in ("loss_inter", "loss_equi")
    }
    return trainer, batch, loss_dict, samples, grads


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One training iteration through train_net.main; its output folder (model_final.pth)."""
    out = tmp_path_factory.mktemp("sotr_run")
    train_net.main(args_for(out, "SOLVER.MAX_ITER", "1", "DATASETS.TEST", "()"))
    return out


def test_adapter_is_the_solo_family_one(forward):
    from iuq.adapters.grid_kernels import GridKernelAdapter

    trainer = forward[0]
    assert type(trainer.model).__name__ == "SOTR"
    assert type(trainer.adapter).__name__ == "SOTR" and isinstance(trainer.adapter, GridKernelAdapter)
    assert trainer.adapter.stride == 4


def test_iuq_losses_are_finite_and_non_zero(forward):
    _, _, loss_dict, _, _ = forward
    for key in ("loss_inter", "loss_equi"):
        assert torch.isfinite(loss_dict[key]) and loss_dict[key].item() > 0, (key, loss_dict[key])
    assert {"loss_ins", "loss_cate"} <= set(loss_dict)  # SOTR's own losses are still there
    assert all(torch.isfinite(v) for v in loss_dict.values()), loss_dict


@pytest.mark.parametrize("key", ["loss_inter", "loss_equi"])
def test_each_iuq_loss_reaches_kernel_head_and_mask_head(forward, key):
    for which, g in zip(("kernel head", "mask head"), forward[4][key]):
        assert torch.isfinite(g).all() and g.abs().sum() > 0, f"{key} does not reach SOTR's {which}"


def test_batch_samples_are_256_d_and_carry_the_batch_image_ids(forward):
    _, batch, _, samples, _ = forward
    assert samples.embeddings.shape[1] == 256 and torch.isfinite(samples.embeddings).all()
    assert set(samples.image_ids.tolist()) == {int(d["image_id"]) for d in batch}
    # Instance-balanced: at most 50 samples per instance.
    for d in batch:
        count = int((samples.image_ids == int(d["image_id"])).sum())
        assert 0 < count <= 50 * len(d["instances"])


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
