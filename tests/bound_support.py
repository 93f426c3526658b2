"""A check shared by the frameworks' tests of MODEL.IUQ.INTER.GRAD_BOUND: one training forward
with a bound that bites (1e-6), the layer it measures at, the scale it applies, the value it
keeps."""
import sys

import pytest
import torch

from adelaidet_support import REPO


def check_bound_at_query_head(args_for, expected, tmp_path):
    """``args_for(out, *opts)``: a test module's train_net arguments; ``expected``: the names of the
    parameters of the layer that makes the model's queries."""
    from detectron2.utils.events import EventStorage

    from iuq.inter.bound import nearest_parameters

    sys.path.insert(0, str(REPO))  # this project's train_net, not a framework's
    import train_net

    from iuq.engine.trainer import IUQTrainer

    torch.manual_seed(0)
    trainer = IUQTrainer(train_net.setup(args_for(tmp_path, "MODEL.IUQ.INTER.GRAD_BOUND", "1e-6")))
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    seen, bounded = {}, trainer.bounded_inter_loss

    def spy(loss_dict, cap):
        seen["params"] = [names[id(p)] for p in nearest_parameters(cap.queries, trainer.model)]
        seen["before"], seen["after"] = loss_dict["loss_inter"], bounded(loss_dict, cap)
        return seen["after"]

    trainer.bounded_inter_loss = spy
    with EventStorage(0):
        trainer.forward_losses(next(trainer._trainer._data_loader_iter))
    assert sorted(seen["params"]) == sorted(expected)
    ratio, scale = trainer.inter_bound
    assert ratio > 1e-6 and scale == pytest.approx(1e-6 / ratio)  # the bound bites: the gradient is scaled
    assert float(seen["after"]) == float(seen["before"])  # the value is not
    weight = trainer.model.get_parameter(expected[0])
    (full,) = torch.autograd.grad(seen["before"], weight, retain_graph=True)
    (got,) = torch.autograd.grad(seen["after"], weight, retain_graph=True)
    torch.testing.assert_close(got, full * scale)
    return ratio
