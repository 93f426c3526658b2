"""MODEL.IUQ.INTER.GRAD_BOUND on Mask2Former, SparseInst and SOLQ (CondInst and SOLOv2: in
``test_inter_bound_models.py``): the layer it measures at is the one that makes each model's
queries, and the bound scales L_inter's gradient, never its value. Each case skips, with the
reason, where its framework is not installed."""
import importlib
import sys

import pytest
import torch

from adelaidet_support import REPO

# the layer whose output each model's captured queries are (small test configs)
QUERY_HEADS = {
    "test_integration_mask2former": ["sem_seg_head.predictor.mask_embed.layers.2.weight",
                                     "sem_seg_head.predictor.mask_embed.layers.2.bias"],
    "test_integration_sparseinst": ["decoder.inst_branch.mask_kernel.weight", "decoder.inst_branch.mask_kernel.bias"],
    # SOLQ's queries are the last decoder layer's input (IUQ replays that layer on other images)
    "test_integration_solq": ["transformer.decoder.layers.1.norm2.weight", "transformer.decoder.layers.1.norm2.bias"],
}
REQUIRE = {"test_integration_mask2former": "require_mask2former", "test_integration_sparseinst": "require_sparseinst",
           "test_integration_solq": "require_solq"}


@pytest.mark.parametrize("module", sorted(QUERY_HEADS))
def test_it_measures_at_the_query_head_and_keeps_the_value(module, tmp_path):
    import adelaidet_support

    getattr(adelaidet_support, REQUIRE[module])()
    from detectron2.utils.events import EventStorage

    from iuq.inter.bound import nearest_parameters

    tests = importlib.import_module(module)
    sys.path.insert(0, str(REPO))  # this project's train_net, not a framework's
    import train_net

    from iuq.engine.trainer import IUQTrainer

    torch.manual_seed(0)
    trainer = IUQTrainer(train_net.setup(tests.args_for(tmp_path, "MODEL.IUQ.INTER.GRAD_BOUND", "1e-6")))
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    seen, bounded = {}, trainer.bounded_inter_loss

    def spy(loss_dict, cap):
        seen["params"] = [names[id(p)] for p in nearest_parameters(cap.queries, trainer.model)]
        seen["before"], seen["after"] = loss_dict["loss_inter"], bounded(loss_dict, cap)
        return seen["after"]

    trainer.bounded_inter_loss = spy
    with EventStorage(0):
        trainer.forward_losses(next(trainer._trainer._data_loader_iter))
    assert sorted(seen["params"]) == sorted(QUERY_HEADS[module])
    ratio, scale = trainer.inter_bound
    assert ratio > 1e-6 and scale == pytest.approx(1e-6 / ratio)
    assert float(seen["after"]) == float(seen["before"])
    weight = trainer.model.get_parameter(QUERY_HEADS[module][0])
    (full,) = torch.autograd.grad(seen["before"], weight, retain_graph=True)
    (got,) = torch.autograd.grad(seen["after"], weight, retain_graph=True)
    torch.testing.assert_close(got, full * scale)
