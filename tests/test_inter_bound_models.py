"""MODEL.IUQ.INTER.GRAD_BOUND on the real AdelaiDet models (the toy-network checks are in
``test_inter_bound.py``): it measures at the layer that makes the queries, it never changes a
loss's value, and where it does not bite a run is the paper's run, parameter for parameter."""
import random
from functools import partial

import numpy as np
import pytest
import torch

from adelaidet_support import require_adelaidet, small_cfg
from bound_support import check_bound_at_query_head

require_adelaidet()

from detectron2.utils.events import EventStorage  # noqa: E402

from iuq.engine.trainer import IUQTrainer  # noqa: E402

# the layer whose output the captured queries are read from
QUERY_HEADS = {"CondInst": ["controller.weight", "controller.bias"],
               "SOLOv2": ["ins_head.kernel_pred.weight", "ins_head.kernel_pred.bias"]}


def build(name, tmp_path, *overrides):
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    return IUQTrainer(small_cfg(name, "OUTPUT_DIR", str(tmp_path), *overrides))


def train(trainer, steps):
    """``steps`` of run_step; returns each step's loss values."""
    seen, forward = [], trainer.forward_losses

    def spy(batch):
        loss_dict, samples = forward(batch)
        seen.append({k: float(v) for k, v in loss_dict.items()})
        return loss_dict, samples

    trainer.forward_losses = spy
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one summation order: the comparison below is exact
    try:
        with EventStorage(0) as storage:
            trainer.storage = trainer._trainer.storage = storage
            for it in range(steps):
                trainer.iter = storage.iter = it
                trainer.run_step()
    finally:
        torch.set_num_threads(threads)
    return seen


@pytest.mark.parametrize("name", sorted(QUERY_HEADS))
def test_it_measures_at_the_query_head_and_keeps_the_value(name, tmp_path):
    import test_train_net_cli  # its train_net arguments: the small settings, through train_net.setup

    check_bound_at_query_head(partial(test_train_net_cli.args_for, name), QUERY_HEADS[name], tmp_path)


@pytest.mark.parametrize("on", ["step", "momentum"])
def test_where_it_does_not_bite_the_run_is_the_papers(on, tmp_path):
    """CondInst, 2 steps (the second's losses depend on the first's update): GRAD_BOUND 1e9 (never
    reached), on this step's gradients or on the momentum's shares, gives the same losses at every
    step and the same parameters after, bit for bit, as GRAD_BOUND 0 (off)."""
    # The first trainer of a process gets backbone gradients that differ in the last bits from every
    # later one's (measured: the same holds with the bound off, e.g. a kernel's first-call path), so
    # one step of a throwaway trainer first.
    train(build("CondInst", tmp_path / "warm"), 1)
    off = build("CondInst", tmp_path / "off")  # (each built and trained in turn: the mapper's
    off_losses = train(off, 2)  # augmentations draw from the global RNGs that build seeds)
    on = build("CondInst", tmp_path / "on", "MODEL.IUQ.INTER.GRAD_BOUND", "1e9", "MODEL.IUQ.INTER.GRAD_BOUND_ON", on)
    assert train(on, 2) == off_losses
    assert on.inter_bound[1] == 1.0 and on.inter_bound[0] > 0
    for (n, a), (_, b) in zip(off.model.named_parameters(), on.model.named_parameters()):
        assert torch.equal(a, b), n


@pytest.mark.parametrize("min_scale", ["0.0", "-1.0"])
def test_the_momentum_bound_bites_and_its_shares_are_checkpointed(tmp_path, min_scale):
    """SOLOv2, GRAD_BOUND_ON momentum at a bound that bites (1e-3), 2 steps: L_inter's share of the
    optimizer's momentum at the kernel head ends at 1e-3 of the base losses' share (toy checks of
    the shares against torch's SGD buffer: test_inter_bound.py), with the scale floored at 0 or
    allowed down to -1 (GRAD_BOUND_MIN_SCALE, read by the trainer); both shares are saved with the
    checkpoint and a fresh trainer resumed from it (as ``--resume`` does) carries them on."""
    overrides = ("MODEL.IUQ.INTER.GRAD_BOUND", "1e-3", "MODEL.IUQ.INTER.GRAD_BOUND_ON", "momentum",
                 "MODEL.IUQ.INTER.GRAD_BOUND_MIN_SCALE", min_scale)
    trainer = build("SOLOv2", tmp_path / "run", *overrides)
    assert trainer.inter_momentum.lowest == float(min_scale)
    train(trainer, 2)
    ratio, scale = trainer.inter_bound
    shares = trainer.inter_momentum
    assert scale < 1.0 and ratio > 1e-3  # it bites
    assert float(shares.inter.norm()) == pytest.approx(1e-3 * float(shares.base.norm()), rel=1e-4)
    trainer.checkpointer.save("model_0000001")
    saved = torch.load(tmp_path / "run" / "model_0000001.pth", weights_only=False)
    assert set(saved["iuq_inter_momentum"]) == {"inter", "base"}
    resumed = build("SOLOv2", tmp_path / "run", *overrides)
    resumed.resume_or_load(resume=True)
    torch.testing.assert_close(resumed.inter_momentum.inter, shares.inter)
    torch.testing.assert_close(resumed.inter_momentum.base, shares.base)
    assert resumed.start_iter == 2
