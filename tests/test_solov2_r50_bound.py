"""Issue 30: ``MODEL.IUQ.INTER.GRAD_BOUND 0.3`` on the momentum's shares (``GRAD_BOUND_ON momentum``,
the remedy the dead-mask warning names) keeps the real SOLOv2 R50's masks alive where the paper's
setting loses them. AdelaiDet's SOLOv2 with the R50 recipe (``configs/IUQ/SOLOv2/R50_1x.yaml``),
random initialisation, the COCO sample, issue 30's setting (``R50_COCO_SAMPLE``: 2 images a step,
short side 320, a memory of 5,000), IUQ's weights full from step 0 (the paper's: no ramp), SEED 0.

Measured with ``studies/solov2_r50_instability/run.sh`` (``paper_setting.jsonl``): without the
bound, L_inter's gradient at the kernel head is hundreds of times the base losses' and the largest
own-instance probability falls to 2e-3 at step 1 and below 1e-10 from step 2 on; with ρ = 0.3 on
the momentum's shares it stays at 0.9 or more through 15 steps, L_inter's gradient scaled by 0.02
at step 0 and by 0 to 1e-3 after (its share of the momentum already over the bound; with ρ = 0.3 on
each step's gradient, the first remedy, it stays at 0.88 or more, scaled by 0.05 down to 2e-4).
The test runs the bounded model 10 steps, past the step where the masks die without it, and the
unbounded one 4. (With the recipe's ramp, in the issue's setting, the same seed's masks die at
step 42 without the bound and live through 50 steps with it: too long for a test. The per-step bound
at 0.3 failed on 2 of the 5 (norm, seed) pairs run there; the momentum bound kept all 6 through 50
steps, one of them dying at step 50: docs/study.md.)

Slow (two R50 trainings on one CPU thread, 4 and 10 steps: ~7 min): skipped, with the reason, where detectron2,
AdelaiDet or the COCO sample is missing."""
import pytest

from adelaidet_support import CONFIGS, R50_COCO_SAMPLE, own_mask_p_per_step, require_adelaidet

require_adelaidet()

from iuq.engine.hooks import DEAD_MASK_P  # noqa: E402


def _r50_own_mask_p(tmp_path, steps, *overrides):
    """The largest own-instance probability per step of the R50 at the paper's setting."""
    from detectron2.utils.env import seed_all_rng

    from iuq.config import get_iuq_cfg
    from iuq.engine.models import register_base_models
    from iuq.engine.trainer import IUQTrainer

    register_base_models()
    cfg = get_iuq_cfg()
    cfg.merge_from_file(str(CONFIGS["SOLOv2"]))
    cfg.merge_from_list(R50_COCO_SAMPLE + ["SEED", "0", "OUTPUT_DIR", str(tmp_path), "MODEL.IUQ.WARMUP_ITERS", "0",
                                           *overrides])
    seed_all_rng(cfg.SEED)  # what train_net's default_setup does: the weights' and the data order's seed
    return own_mask_p_per_step(IUQTrainer(cfg), steps)


def test_the_gradient_bound_keeps_the_r50s_masks_where_the_papers_setting_loses_them(tmp_path):
    unbounded = _r50_own_mask_p(tmp_path / "paper", 4)
    bounded = _r50_own_mask_p(tmp_path / "bounded", 10, "MODEL.IUQ.INTER.GRAD_BOUND", "0.3",
                              "MODEL.IUQ.INTER.GRAD_BOUND_ON", "momentum")
    print("largest own-instance p per step, the paper's setting:", [f"{p:.2g}" for p in unbounded])
    print("largest own-instance p per step, GRAD_BOUND 0.3 on the momentum:", [f"{p:.2g}" for p in bounded])
    # Step 0 is the same run (the bound changes no loss value, only L_inter's gradient after it).
    assert bounded[0] == pytest.approx(unbounded[0], rel=1e-5) and unbounded[0] > 0.5
    assert max(unbounded[2:]) < DEAD_MASK_P, unbounded  # every mask off, for the monitor, from step 2
    assert min(bounded) > DEAD_MASK_P, bounded  # alive at every step, the unstable ones included
