"""MODEL.IUQ.INTER.GRAD_BOUND on Mask2Former, SparseInst and SOLQ (CondInst and SOLOv2: in
``test_inter_bound_models.py``): the layer it measures at is the one that makes each model's
queries, and the bound scales L_inter's gradient, never its value. Each case skips, with the
reason, where its framework is not installed; SOTR's, in its own environment, is in
``test_integration_sotr.py``."""
import importlib

import pytest

from bound_support import check_bound_at_query_head

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
    tests = importlib.import_module(module)
    check_bound_at_query_head(tests.args_for, QUERY_HEADS[module], tmp_path)
