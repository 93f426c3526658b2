"""IUQ on the real SOLQ (megvii-research/SOLQ @ 97f537c, package ``solq``; R50, random init, 1
encoder / 2 decoder layers, 50 queries), on real COCO images, on the CPU: the op stand-in against
finite differences, the replay against SOLQ's own last-layer outputs, the gradient of a query
replayed on another image's memory, both losses on a real batch, images without instances, trained
as SOLQ trains (its mapper, AdamW groups, clipping), a train_net run that resumes with its image
memory, whose weights load into stock SOLQ and whose --eval-only gives segm AP, and the error for
pixel-memory settings. Skipped (with the reason and the install command) where SOLQ is missing."""
import json

import pytest
import torch

from adelaidet_support import (CONFIGS, EMPTY_IMAGES, MODEL_SMALL, REPO, SMALL, register_subset, require_solq,
                               train_net_hiding)


def test_a_solq_config_without_solq_names_the_installer():
    pytest.importorskip("detectron2", reason="detectron2 is not installed (not on PyPI; see README)")
    code, stderr = train_net_hiding("solq", "--config-file", str(CONFIGS["SOLQ"]), "MODEL.DEVICE", "cpu")
    assert code == 1 and "Traceback" not in stderr, stderr[-2000:]
    assert "SOLQ" in stderr and "python tools/install_frameworks.py solq" in stderr


def args_for(out, *opts, eval_only=False, resume=False):
    import sys

    sys.path.insert(0, str(REPO))
    import train_net

    argv = ["--config-file", str(CONFIGS["SOLQ"])] + ["--eval-only"] * eval_only + ["--resume"] * resume
    opts = SMALL + MODEL_SMALL["SOLQ"] + ["OUTPUT_DIR", str(out)] + list(opts)
    return train_net.default_argument_parser().parse_args(argv + opts)


def test_the_op_stand_in_passes_gradcheck():
    """The installer's stand-in for SOLQ's compiled op (iuq.frameworks.fix_solq_ops_stand_in):
    SOLQ's own MSDeformAttnFunction through it, forward and backward, on tiny doubles."""
    require_solq()
    from solq.models.ops.functions.ms_deform_attn_func import MSDeformAttnFunction, ms_deform_attn_core_pytorch

    torch.manual_seed(0)
    shapes = torch.tensor([[3, 4], [2, 2]])
    start = torch.cat([shapes.new_zeros(1), shapes.prod(1).cumsum(0)[:-1]])
    n, heads, dim, queries, points = 1, 2, 3, 2, 2
    value = torch.rand(n, int(shapes.prod(1).sum()), heads, dim, dtype=torch.double, requires_grad=True)
    loc = torch.rand(n, queries, heads, len(shapes), points, 2, dtype=torch.double, requires_grad=True)
    weights = torch.rand(n, queries, heads, len(shapes), points, dtype=torch.double)
    weights = (weights / weights.sum((-1, -2), keepdim=True)).requires_grad_()
    out = MSDeformAttnFunction.apply(value, shapes, start, loc, weights, 64)
    torch.testing.assert_close(out, ms_deform_attn_core_pytorch(value, [(3, 4), (2, 2)], loc, weights))
    assert torch.autograd.gradcheck(lambda v, l, w: MSDeformAttnFunction.apply(v, shapes, start, l, w, 64),
                                    (value, loc, weights), eps=1e-6, atol=1e-4)


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    require_solq()
    import train_net
    from iuq.engine.trainer import IUQTrainer

    return IUQTrainer(train_net.setup(args_for(tmp_path_factory.mktemp("solq_trainer"), "MODEL.SOLQ.DROPOUT", "0.0")))


@pytest.fixture(scope="module")
def forward(trainer):
    """One real batch: a capture forward with SOLQ's own outputs next to it (the box and mask
    heads' zero-initialised last layers drawn at random, so that their outputs depend on the
    query), then the step's losses."""
    model = trainer.model
    torch.manual_seed(1)
    for head in (model.bbox_embed[-1].layers[-1], model.vector_embed[-1].layers[-1]):
        torch.nn.init.normal_(head.weight, std=0.05)
    batch = next(trainer._trainer._data_loader_iter)
    assert sum(len(d["instances"]) for d in batch) > 0
    with trainer.adapter.capture() as cap:
        model(batch)
    samples, _ = model.nested_images(batch, model.size_divisibility)
    with torch.no_grad():
        outputs = model.solq(samples)
    loss_dict, scenes = trainer.forward_losses(batch)
    return dict(cap=cap, outputs=outputs, batch=batch, losses=loss_dict, scenes=scenes)


def test_replay_on_its_own_memory_is_solqs_last_layer(trainer, forward):
    cap, out, adapter = forward["cap"], forward["outputs"], trainer.adapter
    assert len(cap.queries) > 0
    for b in range(len(forward["batch"])):
        rows = (cap.query_images == b).nonzero(as_tuple=True)[0]
        meta = {k: v[rows] for k, v in cap.query_meta.items()}
        with torch.no_grad():
            logits, boxes, vectors = adapter.replay(cap.queries[rows], meta, cap.scene[b])
        slot = meta["slot"]
        torch.testing.assert_close(logits, out["pred_logits"][b, slot], rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(boxes, out["pred_boxes"][b, slot], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(vectors, out["pred_vectors"][b, slot], rtol=1e-5, atol=1e-4)
        assert vectors.std(0).max() > 0  # the mask head reads the query (not its constant init)


def test_a_query_replayed_on_another_images_memory_gets_gradient(trainer, forward):
    cap, adapter, model = forward["cap"], trainer.adapter, trainer.model
    rows = (cap.query_images == 0).nonzero(as_tuple=True)[0]
    meta = {k: v[rows] for k, v in cap.query_meta.items()}
    queries = cap.queries[rows].detach().requires_grad_()
    other = cap.scene[1]
    level = other.levels[0].detach().requires_grad_()
    scene = type(other)([level] + [f.detach() for f in other.levels[1:]], other.pads, other.strides)
    offsets = model.transformer.decoder.layers[-1].cross_attn.sampling_offsets.weight
    logits = adapter.replay_logits(queries, meta, scene)
    gq, gl, go = torch.autograd.grad(logits.sigmoid().sum(), (queries, level, offsets))
    for name, g in (("the query", gq), ("the other image's memory", gl), ("the cross-attention", go)):
        assert torch.isfinite(g).all() and g.abs().sum() > 0, name
    # and nothing of image 0's own memory enters
    assert all(not f.requires_grad or f is level for f in scene.levels)


def test_iuq_losses_are_finite_and_non_zero(forward):
    losses = forward["losses"]
    for key in ("loss_inter", "loss_equi"):
        assert torch.isfinite(losses[key]) and losses[key].item() > 0, (key, losses[key])
    assert {"loss_ce", "loss_bbox", "loss_giou", "loss_vector", "loss_vector_0"} <= set(losses)
    assert not any("error" in k for k in losses)  # SOLQ's logging-only class_error / cardinality_error


@pytest.mark.parametrize("key", ["loss_inter", "loss_equi"])
def test_each_iuq_loss_reaches_the_decoder_and_the_encoder(trainer, forward, key):
    model = trainer.model
    probes = {"the last layer's cross-attention": model.transformer.decoder.layers[-1].cross_attn.value_proj.weight,
              "the encoder": model.transformer.encoder.layers[0].linear1.weight,
              "the first decoder layer": model.transformer.decoder.layers[0].linear1.weight}
    grads = torch.autograd.grad(forward["losses"][key], list(probes.values()), retain_graph=True, allow_unused=True)
    for name, g in zip(probes, grads):
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0, f"{key} does not reach {name}"


def test_the_batch_scenes_are_whole_valid_encoder_memories(trainer, forward):
    scenes = forward["scenes"]
    assert len(scenes) == len(forward["batch"])
    for (image_id, scene), d in zip(scenes, forward["batch"]):
        assert image_id == d["image_id"]
        h, w = d["image"].shape[-2:]
        assert [tuple(f.shape[-2:]) for f in scene.levels] == [(-(-h // s), -(-w // s)) for s in (8, 16, 32, 64)]
        assert all(not p.any() for p in scene.pads)


def test_it_trains_as_solq_trains(trainer, monkeypatch):
    import iuq.engine.trainer
    from iuq.modeling.solq import SOLQDatasetMapper

    opt = trainer.optimizer
    assert isinstance(opt, torch.optim.AdamW) and type(opt).__name__ == "FullModelClippingAdamW"
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    lrs = {}
    for g in opt.param_groups:
        for p in g["params"]:
            lrs[names[id(p)]] = g["initial_lr"] if "initial_lr" in g else g["lr"]
    assert lrs["transformer.decoder.layers.0.cross_attn.sampling_offsets.weight"] == pytest.approx(2e-5)
    assert lrs["transformer.reference_points.weight"] == pytest.approx(2e-5)
    assert lrs["backbone.0.body.layer2.0.conv1.weight"] == pytest.approx(2e-5)
    assert lrs["class_embed.0.weight"] == pytest.approx(2e-4)
    assert "backbone.0.body.layer1.0.conv1.weight" not in lrs  # SOLQ freezes the stem and layer1
    assert {g["weight_decay"] for g in opt.param_groups} == {1e-4}
    monkeypatch.setattr(iuq.engine.trainer, "build_detection_train_loader", lambda cfg, mapper, dataset: mapper)
    from iuq.data.mapper import NamedRecordErrors

    loader_mapper = trainer.build_train_loader(trainer.cfg)
    assert isinstance(loader_mapper, NamedRecordErrors) and not loader_mapper.skip
    assert isinstance(loader_mapper.mapper, SOLQDatasetMapper)


@pytest.mark.parametrize("which", ["all", "mixed"])
def test_images_without_instances_train(trainer, forward, which):
    from detectron2.data import DatasetCatalog

    from iuq.modeling.solq import SOLQDatasetMapper

    mapper = SOLQDatasetMapper(trainer.cfg, True)
    dicts = DatasetCatalog.get("coco_2017_val")
    batch = [mapper(dicts[i]) for i in EMPTY_IMAGES[:2]]
    assert all(len(d["instances"]) == 0 for d in batch)
    if which == "mixed":
        batch = batch[:1] + forward["batch"][:1]
    loss_dict, _ = trainer.forward_losses(batch)
    for key, value in loss_dict.items():
        assert torch.isfinite(value) and value.requires_grad, key
    if which == "all":
        assert loss_dict["loss_inter"].item() == 0 and loss_dict["loss_equi"].item() == 0
    else:
        assert loss_dict["loss_inter"].item() > 0
    sum(loss_dict.values()).backward()


def test_weights_load_into_stock_solq_key_for_key(trainer):
    from iuq.modeling.solq import build_stock_solq

    stock, _ = build_stock_solq(trainer.cfg)
    ours = trainer.model.state_dict()
    assert list(ours) == list(stock.state_dict())
    result = stock.load_state_dict(ours, strict=True)
    assert not result.missing_keys and not result.unexpected_keys


def test_torchvision_imagenet_weights_load_by_suffix(trainer, tmp_path):
    """The recipe's MODEL.WEIGHTS is torchvision's ResNet-50 with ?matching_heuristics=True: every
    backbone parameter is filled from it (here a random torchvision ResNet-50 on disk)."""
    import torchvision
    from detectron2.checkpoint import DetectionCheckpointer

    resnet = torchvision.models.resnet50()
    path = tmp_path / "resnet50.pth"
    torch.save(resnet.state_dict(), path)
    model = trainer.model
    DetectionCheckpointer(model).load(f"{path}?matching_heuristics=True")
    body = model.backbone[0].body.state_dict()
    for key, value in resnet.state_dict().items():
        if key.startswith("fc.") or key.endswith("num_batches_tracked"):
            continue
        torch.testing.assert_close(body[key], value, msg=key)


def test_pixel_memory_settings_are_refused_naming_the_key(trainer):
    from iuq.adapters.base import IUQAdapter
    from iuq.adapters.solq import SOLQ

    cfg = trainer.cfg.clone()
    cfg.defrost()
    cfg.MODEL.IUQ.MEMORY.SAMPLING = "instance"
    with pytest.raises(ValueError, match=r"MODEL\.IUQ\.MEMORY\.SAMPLING = 'instance'.*'images'"):
        SOLQ.check_config(cfg)
    cfg.MODEL.IUQ.MEMORY.SAMPLING = "images"
    with pytest.raises(ValueError, match=r"MODEL\.IUQ\.MEMORY\.SAMPLING = 'images'"):
        type("PixelModel", (IUQAdapter,), {}).check_config(cfg)
    cfg.MODEL.SOLQ.SIZE_DIVISIBILITY = 32
    with pytest.raises(ValueError, match=r"MODEL\.SOLQ\.SIZE_DIVISIBILITY = 32"):
        SOLQ.check_config(cfg)
    cfg.MODEL.SOLQ.SIZE_DIVISIBILITY = 64
    cfg.MODEL.IUQ.MEASURES.ENABLED = True
    with pytest.raises(ValueError, match=r"MODEL\.IUQ\.MEASURES\.ENABLED = True"):
        SOLQ.check_config(cfg)
    cfg.MODEL.IUQ.MEASURES.ENABLED = False
    SOLQ.check_config(cfg)


@pytest.fixture(scope="module")
def run(tmp_path_factory, trainer):
    """Two training iterations through train_net.main, checkpointing after each."""
    import train_net

    out = tmp_path_factory.mktemp("solq_run")
    train_net.main(args_for(out, "SOLVER.MAX_ITER", "2", "SOLVER.CHECKPOINT_PERIOD", "1", "DATASETS.TEST", "()"))
    return out


def test_losses_in_metrics_and_resume_restores_the_image_memory(run):
    import train_net
    from iuq.engine.trainer import IUQTrainer

    rows = [json.loads(line) for line in (run / "metrics.json").read_text().splitlines()]
    assert any("loss_inter" in r and "loss_equi" in r for r in rows)
    saved = torch.load(run / "model_final.pth", map_location="cpu", weights_only=False)["iuq_memory"]
    assert len(saved["image_ids"]) == 4  # MEMORY.SIZE 4: two steps of 2 images
    resumed = IUQTrainer(train_net.setup(args_for(run, "SOLVER.MAX_ITER", "2", "DATASETS.TEST", "()", resume=True)))
    resumed.resume_or_load(resume=True)
    assert resumed.start_iter == 2
    assert [i for i, _ in resumed.memory.scenes()] == saved["image_ids"]
    for (_, scene), levels in zip(resumed.memory.scenes(), saved["levels"]):
        for got, want in zip(scene.levels, levels):
            torch.testing.assert_close(got, want)


def test_final_weights_load_into_stock_solq(run):
    from solq.models.solq import build as build_solq

    import train_net
    from iuq.modeling.solq import solq_args

    stock, _, _ = build_solq(solq_args(train_net.setup(args_for(run))))
    state = torch.load(run / "model_final.pth", map_location="cpu", weights_only=False)["model"]
    result = stock.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys


def test_eval_only_reports_segm_ap(run, tmp_path):
    import train_net

    register_subset("iuq_test_coco_val2", 2, tmp_path)
    results = train_net.main(args_for(tmp_path / "eval", "MODEL.WEIGHTS", str(run / "model_final.pth"),
                                      "DATASETS.TEST", "('iuq_test_coco_val2',)", eval_only=True))
    segm = results["segm"]
    assert 0 <= segm["AP"] <= 100 and json.dumps(segm)
