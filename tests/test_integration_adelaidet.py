"""IUQ on the real AdelaiDet CondInst and SOLOv2, on real COCO images, on the CPU.

Skipped (with the reason) where detectron2 / AdelaiDet or ../shared/datasets are missing."""
import pytest
import torch

from adelaidet_support import require_adelaidet, small_cfg
from autograd_support import check_iuq_loss_reaches, iuq_gradients

require_adelaidet()

from iuq.engine.trainer import IUQTrainer  # noqa: E402

# (query head, mask branch) parameters the two IUQ losses must reach.
PROBES = {
    "CondInst": lambda m: (m.controller.weight, m.mask_branch.tower[-1].weight),
    "SOLOv2": lambda m: (m.ins_head.kernel_pred.weight, m.mask_head.conv_pred[0].weight),
}
EMBED_DIM = {"CondInst": 8, "SOLOv2": 256}


@pytest.fixture(scope="module", params=["CondInst", "SOLOv2"])
def trained(request, tmp_path_factory):
    """A trainer of each model, one batch's losses, then two real training steps."""
    name = request.param
    # DATASETS.TEST (): train() would end with an evaluation on the 128 val images that no test here
    # reads (SOLOv2's took ~8 of this fixture's ~10 minutes on one core)
    cfg = small_cfg(name, "OUTPUT_DIR", str(tmp_path_factory.mktemp(name)), "SOLVER.MAX_ITER", "2",
                    "DATASETS.TEST", "()")
    trainer = IUQTrainer(cfg)
    batch = next(trainer._trainer._data_loader_iter)
    loss_dict, samples = trainer.forward_losses(batch)
    query_head, mask_branch = PROBES[name](trainer.model)
    grads = {key: iuq_gradients(loss_dict[key], query_head, mask_branch) for key in ("loss_inter", "loss_equi")}
    trainer.train()
    return name, trainer, batch, loss_dict, samples, grads


def test_iuq_losses_are_finite_and_non_zero(trained):
    name, _, _, loss_dict, _, _ = trained
    for key in ("loss_inter", "loss_equi"):
        value = loss_dict[key].item()
        assert torch.isfinite(loss_dict[key]) and value > 0, (name, key, value)
    # The base model's own losses are still there.
    base = {"CondInst": {"loss_fcos_cls", "loss_mask"}, "SOLOv2": {"loss_ins", "loss_cate"}}[name]
    assert base <= set(loss_dict)


@pytest.mark.parametrize("key", ["loss_inter", "loss_equi"])
def test_each_iuq_loss_reaches_query_head_and_mask_branch(trained, key):
    name, _, _, _, _, grads = trained
    check_iuq_loss_reaches(key, grads[key], ("query head", "mask branch"), name)


def test_memory_fills_with_samples_of_the_batch(trained):
    name, trainer, batch, _, samples, _ = trained
    mem = trainer.memory.samples()
    assert len(mem) > 0 and mem.embeddings.shape[1] == EMBED_DIM[name]
    assert torch.isfinite(mem.embeddings).all()
    # Samples carry the dataset ids of the images they came from (two steps of 2 images each).
    from detectron2.data import DatasetCatalog

    dataset_ids = {d["image_id"] for d in DatasetCatalog.get("coco_2017_train")}
    stored = set(mem.image_ids.tolist())
    assert stored <= dataset_ids and 2 <= len(stored) <= 4
    assert set(samples.image_ids.tolist()) == {int(d["image_id"]) for d in batch}
    # Instance-balanced: at most 50 samples per instance, so at most 50 * #instances per image.
    counts = torch.bincount(samples.image_ids - samples.image_ids.min())
    assert counts.max() <= 50 * max(len(d["instances"]) for d in batch)


def test_stock_model_weights_are_untouched_by_iuq(trained):
    name, trainer, _, _, _, _ = trained
    from detectron2.modeling import build_model

    stock = build_model(trainer.cfg)
    assert set(stock.state_dict()) == set(trainer.model.state_dict())
    assert not any("iuq" in k.lower() for k in trainer.model.state_dict())


def test_condinst_sample_decode_matches_its_dynamic_head():
    """decode_samples on every cell of a real embedding map == the head's own map decode, in value
    and in the gradients of the queries and the embeddings (its backward is written by hand)."""
    from detectron2.modeling import build_model
    from detectron2.structures import Instances

    from iuq.adapters import build_adapter
    from iuq.inter.samples import grid_locations

    cfg = small_cfg("CondInst")
    model = build_model(cfg).double()
    adapter = build_adapter(cfg, model)
    head, stride = model.mask_head, adapter.stride
    torch.manual_seed(0)
    b, h, w, q = 2, 6, 9, 11
    feats = torch.randn(b, head.in_channels, h, w, dtype=torch.float64, requires_grad=True)
    params = (torch.randn(q, head.num_gen_params, dtype=torch.float64) * 0.3).requires_grad_()
    inst = Instances((h * stride, w * stride))
    inst.mask_head_params = params
    inst.im_inds = torch.randint(0, b, (q,))
    inst.locations = torch.rand(q, 2, dtype=torch.float64) * torch.tensor([w * stride, h * stride])
    inst.fpn_levels = torch.randint(0, 5, (q,))
    head.mask_out_stride = stride  # no x2 upsampling: logits on the embedding grid itself
    reference = adapter._with_coords(feats, stride, inst).reshape(q, h * w)
    meta = {"locations": inst.locations, "fpn_levels": inst.fpn_levels}
    locations = grid_locations(h, w, stride).double()
    got = torch.zeros_like(reference)
    for i in range(b):
        mine = inst.im_inds == i
        emb = feats[i].reshape(head.in_channels, -1).t()
        got[mine] = adapter.decode_samples(params[mine], {k: v[mine] for k, v in meta.items()}, emb, locations)
    torch.testing.assert_close(got, reference, rtol=1e-6, atol=1e-7)  # the head makes its coordinates in float32
    probe = torch.randn_like(reference)
    for a, r in zip(torch.autograd.grad((got * probe).sum(), [params, feats]),
                    torch.autograd.grad((reference * probe).sum(), [params, feats])):
        assert r.abs().sum() > 0
        torch.testing.assert_close(a, r, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "overrides,present,absent,images",
    [
        (["MODEL.IUQ.EQUI.ENABLED", "False"], {"loss_inter"}, {"loss_equi"}, 2),  # inter only
        (["MODEL.IUQ.INTER.ENABLED", "False"], {"loss_equi"}, {"loss_inter"}, 4),  # equi only
        (["MODEL.IUQ.EQUI.MODE", "feature"], {"loss_inter", "loss_equi"}, set(), 4),
        (["MODEL.IUQ.EQUI.MODE", "augment"], {"loss_inter"}, {"loss_equi"}, 4),  # views as plain augmentation
        (["MODEL.IUQ.ENABLED", "False"], set(), {"loss_inter", "loss_equi"}, 2),  # the baseline
        # compute-matched: the loader reads half of IMS_PER_BATCH (4), the views fill the step
        (["MODEL.IUQ.EQUI.VIEWS_IN_BATCH", "True", "SOLVER.IMS_PER_BATCH", "4"], {"loss_inter", "loss_equi"}, set(), 4),
    ],
)
def test_the_papers_ablation_modes_are_reachable_from_the_config(overrides, present, absent, images, tmp_path):
    trainer = IUQTrainer(small_cfg("CondInst", "OUTPUT_DIR", str(tmp_path), *overrides))
    seen = []
    forward = trainer.model.forward
    trainer.model.forward = lambda batch: seen.append(len(batch)) or forward(batch)
    loss_dict, _ = trainer.forward_losses(next(trainer._trainer._data_loader_iter))
    assert present <= set(loss_dict) and not absent & set(loss_dict)
    assert seen == [images]  # one forward; views join the batch when equivariance is on
    for key in present:
        assert torch.isfinite(loss_dict[key]) and loss_dict[key] > 0


def straightforward_equi_loss(adapter, cap, views, num_originals, weight):
    """Eq. 8 as first written: g(F) of every view pasted into a zero map of the padded batch's
    size, every view query decoded on the whole map at once, cells outside the view's valid region
    masked out of the model's own mask loss."""
    import torch.nn.functional as F

    from iuq.equi.transforms import valid_cells

    emb = cap.embeddings
    g_emb = [torch.zeros_like(emb[0])] * num_originals
    for v in views:
        hc, wc = valid_cells(v.g.in_size, cap.stride)
        moved = v.g.apply_features(emb[v.source, :, :hc, :wc])
        g_emb.append(F.pad(moved, (0, emb.shape[-1] - moved.shape[-1], 0, emb.shape[-2] - moved.shape[-2])))
    queries, images, meta, targets = cap.select_queries(cap.query_images >= num_originals)
    logits = adapter.decode_map(queries, meta, images, torch.stack(g_emb))
    valid = torch.zeros_like(logits, dtype=torch.bool)
    for k, v in enumerate(views):
        hm, wm = valid_cells(v.g.out_size, cap.mask_stride)
        valid[images == num_originals + k, :hm, :wm] = True
    # sigmoid(-inf) = 0: the same as multiplying the probabilities by the valid mask.
    return adapter.mask_loss(logits.masked_fill(~valid, float("-inf")), targets * valid) * weight


@pytest.mark.parametrize("name", ["CondInst", "SOLOv2"])
def test_equivariance_loss_equals_the_straightforward_computation(name, tmp_path):
    """loss_equi decodes each view on its own region, in chunks differentiated at once; value and
    gradients (queries, embeddings) must be those of the plain whole-map computation."""
    from iuq.equi.views import add_views

    trainer = IUQTrainer(small_cfg(name, "OUTPUT_DIR", str(tmp_path), "MODEL.IUQ.EQUI.CROP_RANGE", "(0.5, 0.8)"))
    batch = next(trainer._trainer._data_loader_iter)
    iuq = trainer.iuq_cfg
    batch, views = add_views(batch, trainer.adapter.stride, iuq.EQUI, trainer.pixel_mean, trainer.view_rng)
    with trainer.adapter.capture() as cap:
        trainer.model(batch)
    assert int((cap.query_images >= 2).sum()) > 0
    ours = trainer.equi_loss(cap, views, 2, trainer.read_embeddings(cap, views, 2)[1])
    ref = straightforward_equi_loss(trainer.adapter, cap, views, 2, iuq.EQUI.WEIGHT)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5)
    wrt = [cap.queries, cap.embeddings]
    g_ours = torch.autograd.grad(ours, wrt, retain_graph=True)
    g_ref = torch.autograd.grad(ref, wrt)
    for a, b in zip(g_ours, g_ref):
        assert b.abs().sum() > 0
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_solov2_iuq_losses_leave_levels_without_positives_out_of_the_graph(tmp_path):
    """SOLOv2's own loss skips FPN levels where an image has no positive cell; IUQ's queries must
    too, or backward runs the whole kernel branch of that level on zero gradients."""
    trainer = IUQTrainer(small_cfg("SOLOv2", "OUTPUT_DIR", str(tmp_path)))
    seen = {}
    loss = trainer.adapter.model.loss

    def spy(cate_preds, kernel_preds, ins_pred, targets):
        seen.update(kernel_preds=kernel_preds, grid_order_list=targets[3])
        return loss(cate_preds, kernel_preds, ins_pred, targets)

    trainer.adapter.model.loss = spy  # inside IUQ's wrap: the model's own arguments
    loss_dict, _ = trainer.forward_losses(next(trainer._trainer._data_loader_iter))
    orders = seen["grid_order_list"]
    empty = [lvl for lvl in range(len(seen["kernel_preds"])) if all(len(o[lvl]) == 0 for o in orders)]
    busy = [lvl for lvl in range(len(seen["kernel_preds"])) if lvl not in empty]
    assert empty and busy, "the test batch should have levels with and without positives"
    for key in ("loss_inter", "loss_equi"):
        grads = torch.autograd.grad(loss_dict[key], seen["kernel_preds"], retain_graph=True, allow_unused=True)
        assert all(grads[lvl] is None for lvl in empty), key
        assert all(grads[lvl] is not None and grads[lvl].abs().sum() > 0 for lvl in busy), key


def test_condinst_chunk_path_matches_autograd_through_its_decode():
    """The inter-scene loss's inner loop (``forward_chunk`` / ``backward_chunk``, backward by hand,
    buffers reused from chunk to chunk) == autograd through ``apply``: logits and the gradients of
    every prepared tensor and of the embeddings, for chunks of changing sizes in a row (a buffer
    grown, then read as a smaller view, then grown again)."""
    from detectron2.modeling import build_model

    from iuq.adapters import build_adapter

    cfg = small_cfg("CondInst")
    adapter = build_adapter(cfg, build_model(cfg).double())
    decode = adapter.decode_samples
    torch.manual_seed(0)
    params = (torch.randn(5, adapter.head.num_gen_params, dtype=torch.float64) * 0.3).requires_grad_()
    meta = {"locations": torch.rand(5, 2, dtype=torch.float64) * 100, "fpn_levels": torch.randint(0, 5, (5,))}
    prepared = [t.detach().requires_grad_() for t in decode.prepare(params, meta)]
    for c in (7, 3, 11):
        emb = torch.randn(c, 8, dtype=torch.float64, requires_grad=True)
        loc = torch.rand(c, 2, dtype=torch.float64) * 100
        probe = torch.randn(5, c, dtype=torch.float64)
        reference = decode.apply(prepared, emb, loc)
        expected = torch.autograd.grad(reference, [*prepared, emb], probe)
        logits, state = decode.forward_chunk(prepared, emb.detach().requires_grad_(), loc)
        torch.testing.assert_close(logits, reference.detach(), rtol=1e-12, atol=1e-12)
        grads, grad_emb = decode.backward_chunk(state, probe)
        for got, want in zip([*grads, grad_emb], expected):
            assert want.abs().sum() > 0
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    decode.release()
