"""Dead masks: the IUQ loss-weight warm-up (MODEL.IUQ.WARMUP_ITERS) and the monitor that says so
in the log when every mask of a run is off (SOLOv2 from random initialisation: README, "SOLOv2's
dead masks"). Runs on AdelaiDet's SOLOv2 (its adapter's decode); skipped where it is missing."""
import copy
import logging

import pytest
import torch

from adelaidet_support import require_adelaidet, small_cfg

require_adelaidet()

from iuq.engine import hooks as trainer_module  # noqa: E402
from iuq.adapters.base import Captured  # noqa: E402
from iuq.engine.trainer import IUQTrainer  # noqa: E402


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    return IUQTrainer(small_cfg("SOLOv2", "OUTPUT_DIR", str(tmp_path_factory.mktemp("dead")), "MODEL.IUQ.WARMUP_ITERS", "8"))


def test_warmup_factor_ramps_linearly_to_one(trainer):
    factors = []
    for it in (0, 3, 7, 8, 80):
        trainer.iter = it
        factors.append(trainer.iuq_weight_factor())
    assert factors == pytest.approx([1 / 8, 0.5, 1.0, 1.0, 1.0])
    trainer.iuq_cfg.WARMUP_ITERS = 0
    try:
        trainer.iter = 0
        assert trainer.iuq_weight_factor() == 1.0  # the paper's behaviour: no ramp
    finally:
        trainer.iuq_cfg.WARMUP_ITERS = 8


def test_warmup_scales_the_iuq_losses(trainer):
    batch = next(trainer._trainer._data_loader_iter)
    losses = {}
    for it in (0, 8):  # 1/8, then 1
        trainer.iter = it
        trainer.view_rng.seed(1)
        torch.manual_seed(1)
        loss_dict, _ = trainer.forward_losses(copy.deepcopy(batch))
        losses[it] = {k: float(v) for k, v in loss_dict.items()}
    for key in ("loss_inter", "loss_equi"):
        assert losses[0][key] == pytest.approx(losses[8][key] / 8, rel=1e-5)
    assert losses[0]["loss_ins"] == pytest.approx(losses[8]["loss_ins"], rel=1e-6)  # base losses untouched


def test_dead_masks_are_detected_and_logged_once(trainer, caplog, monkeypatch):
    monkeypatch.setattr(trainer_module, "DEAD_MASK_STEPS", 3)
    d, h, w = 256, 8, 8
    gt = torch.zeros(2, h, w)
    gt[:, 2:6, 2:6] = 1

    def captured(sign):  # SOLOv2's features are >= 0 (ReLU): kernels of one sign decide every logit
        return Captured(queries=sign * torch.ones(2, d), query_images=torch.tensor([0, 1]), gt_masks=gt,
                        gt_index=torch.arange(2), embeddings=torch.rand(2, d, h, w) + 0.1)

    dead, alive = captured(-1.0), captured(1.0)
    assert float(trainer.own_mask_probability(dead, 2).max()) < 1e-6
    assert float(trainer.own_mask_probability(alive, 2).min()) > 0.99
    trainer.dead_steps = 0
    # Directly on the logger: train_net's setup_logger("iuq") stops propagation to the root (and
    # so to caplog) once an earlier test in the session has run train_net.
    monkeypatch.setattr(logging.getLogger("iuq.engine.hooks"), "handlers", [caplog.handler])
    monkeypatch.setattr(logging.getLogger("iuq.engine.hooks"), "propagate", False)
    with caplog.at_level(logging.WARNING, logger="iuq.engine.hooks"):
        for _ in range(2):
            trainer.watch_dead_masks(dead, 2)
        trainer.watch_dead_masks(alive, 2)  # a live step resets the count
        assert trainer.dead_steps == 0 and not caplog.records
        for _ in range(5):
            trainer.watch_dead_masks(dead, 2)
        trainer.watch_dead_masks(alive, 2)  # back to life: said once
        trainer.watch_dead_masks(alive, 2)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and "every mask has been off for 3 steps" in warnings[0]
    # the remedies
    assert "MODEL.IUQ.WARMUP_ITERS" in warnings[0] and "MODEL.IUQ.INTER.GRAD_BOUND_ON momentum" in warnings[0]
    assert warnings[1] == "IUQ: the masks are alive again after 5 dead steps"


def _own_mask_p_per_step(tmp_path, steps, *overrides):
    """Train the slim quickstart SOLOv2 (configs/quickstart_solov2.yaml, SEED 0, random init,
    loss_inter only: the loss that kills) ``steps`` steps; per step, the largest own-instance
    probability among the matched queries the monitor watches (a step is dead, for the monitor,
    when it is below DEAD_MASK_P)."""
    from detectron2.utils.env import seed_all_rng

    from adelaidet_support import REPO, own_mask_p_per_step
    from iuq.config import get_iuq_cfg
    from iuq.data import register_quickstart

    register_quickstart(root=str(tmp_path / "data"), names=["iuq_quickstart_train"])
    cfg = get_iuq_cfg()
    cfg.merge_from_file(str(REPO / "configs" / "quickstart_solov2.yaml"))
    cfg.merge_from_list(["SEED", "0", "OUTPUT_DIR", str(tmp_path / "out"), "MODEL.IUQ.EQUI.ENABLED", "False",
                         *overrides])
    seed_all_rng(cfg.SEED)  # what train_net's default_setup does: the weights' and the data order's seed
    return own_mask_p_per_step(IUQTrainer(cfg), steps)


def test_the_ramped_iuq_weights_keep_the_slim_solov2s_masks_alive(tmp_path):
    """From random initialisation (SEED 0), the quickstart SOLOv2 as shipped (IUQ's weights and the
    lr ramped together over 500 iterations to lr 0.0025) keeps its masks through 30 steps; at the
    paper's full weight from step 0, lr 0.01 and a 50-iteration lr warm-up they are dead well
    before. (The shipped schedule kept them for 500 iterations on seeds 0-4; docs/study.md,
    "SOLOv2's dead masks".)"""
    remedy = _own_mask_p_per_step(tmp_path / "remedy", 30)
    paper = _own_mask_p_per_step(tmp_path / "paper", 30, "MODEL.IUQ.WARMUP_ITERS", "0", "SOLVER.BASE_LR", "0.01",
                                 "SOLVER.WARMUP_ITERS", "50", "SOLVER.WARMUP_FACTOR", "0.001")
    print("largest own-instance p per step, ramped:", [f"{p:.2g}" for p in remedy])
    print("largest own-instance p per step, the paper's setting:", [f"{p:.2g}" for p in paper])
    dead = trainer_module.DEAD_MASK_P
    assert min(remedy[-10:]) > dead, remedy  # alive, for the monitor, through the last 10 steps
    assert max(paper[-10:]) < dead, paper  # dead, for the monitor, through the last 10 steps


def test_the_gradient_bound_keeps_the_slim_solov2s_masks_where_the_papers_setting_loses_them(tmp_path):
    """MODEL.IUQ.INTER.GRAD_BOUND 0.3 at the paper's setting (full weight from step 0, lr 0.01,
    a 50-iteration lr warm-up), SEED 3: alive, for the monitor, through the last 10 of 30 steps;
    without the bound, dead from the fifth step on (measured: largest own-instance p below 1e-3
    from step 4). The bound kept 4 seeds of 5 here, and the paper's setting none
    (studies/solov2_r50_instability/slim_bound.py; docs/study.md, "A bound on L_inter's influence")."""
    paper = ["MODEL.IUQ.WARMUP_ITERS", "0", "SOLVER.BASE_LR", "0.01", "SOLVER.WARMUP_ITERS", "50",
             "SOLVER.WARMUP_FACTOR", "0.001", "SEED", "3"]
    bounded = _own_mask_p_per_step(tmp_path / "bounded", 30, *paper, "MODEL.IUQ.INTER.GRAD_BOUND", "0.3")
    unbounded = _own_mask_p_per_step(tmp_path / "paper", 30, *paper)
    print("largest own-instance p per step, bounded:", [f"{p:.2g}" for p in bounded])
    print("largest own-instance p per step, the paper's setting:", [f"{p:.2g}" for p in unbounded])
    dead = trainer_module.DEAD_MASK_P
    assert min(bounded[-10:]) > dead, bounded
    assert max(unbounded[-10:]) < dead, unbounded
