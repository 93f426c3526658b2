"""Measures of what each IUQ loss optimises, on held-out images, for any model with an adapter
(the baseline's too): a detectron2 ``DatasetEvaluator`` that ``--eval-only`` and the periodic /
final evaluation run next to COCO AP when ``MODEL.IUQ.MEASURES.ENABLED`` is True.

- Cross-scene false activation (what ``L_inter`` drives to zero): for the queries the model
  matches to ground-truth instances on held-out images (its own assignment, from a training-mode
  forward with frozen normalisation statistics), the mean probability sigmoid(<q, F'>) they give
  to instance pixels of *other* held-out images (``cross_fa``) and the fraction of those
  (query, pixel) pairs above 0.5 (``cross_fa_frac``); beside them the same on the pixels of the
  *other instances of the query's own image* (``own_fa``, ``own_fa_frac``: what the base mask loss
  already trains).
- Equivariance (what ``L_equi`` drives): for one view g(I) per image (flip / crop drawn from
  ``MEASURES.SEED``, as the training views are), the relative error
  ||f(g(I)) - g(f(I))|| / ||g(f(I))|| of the embedding map on the view's valid cells
  (``equi_rel_err``, mean over views), and the dice between <q^g, g(F)> thresholded at 0.5 and the
  view's ground truth g(M) (``equi_dice``, mean over the view's matched queries); beside it the
  dice of the same queries on the view's own map, <q^g, F^g> (``view_dice``).
- The testbed property (can the data tell instances apart across scenes at all? Eq. 5's premise):
  at the instance cells of the held-out images, the share of the embedding's variance that lies
  *between* images (``between_var``: sum over images of n_i ||mean_i - mean||^2 over the total
  sum of squares, channels summed; 1 = an image's instance pixels are all alike and differ only
  from other images', 0 = which image a pixel is from tells nothing), and the own-vs-same-position
  probe (``own_probe``): for each instance of >= ``PROBE_MIN_CELLS`` cells, a linear classifier
  (ridge least squares, class-balanced, closed form) on the embedding fitted to tell the
  instance's own cells from the *other images of its batch* at the same cells (what a CondInst
  query must do where its relative coordinates are identical), its balanced accuracy on the
  held-out half of the cells (chance 0.5), averaged over instances. Cells and halves are drawn
  from ``MEASURES.SEED`` + 1 (a stream of its own: the other measures' draws are unchanged).

The arithmetic is in small functions of plain tensors (``tests/test_measures.py`` pins each on
inputs whose answer is known by hand); :class:`IUQMeasures` runs the model and feeds them.
"""
import logging
import random
from contextlib import contextmanager

import torch

logger = logging.getLogger(__name__)


def false_activation(logits, include):
    """(sum of sigmoid(logits), count above 0.5, number of pairs) over the entries where the bool
    mask ``include`` [Q, C] is True; ``logits`` [Q, C]."""
    p = torch.sigmoid(logits.float())
    return float(p[include].sum()), int((p[include] > 0.5).sum()), int(include.sum())


def relative_error(actual, expected):
    """||actual - expected|| / ||expected|| (Frobenius norms; nan if ``expected`` is all zero)."""
    denominator = float(expected.float().norm())
    if denominator == 0.0:
        return float("nan")
    return float((actual.float() - expected.float()).norm()) / denominator


def hard_dice(logits, targets):
    """Per row, the dice 2|P & T| / (|P| + |T|) of P = logits > 0 (probability > 0.5) and
    T = targets > 0.5, both [Q, H, W]; 1 where both are empty. Returns [Q]."""
    pred = (logits > 0).flatten(1).float()
    true = (targets > 0.5).flatten(1).float()
    inter = (pred * true).sum(1)
    total = pred.sum(1) + true.sum(1)
    return torch.where(total > 0, 2 * inter / total.clamp(min=1), torch.ones_like(total))


def assign_instances(targets, instance_masks):
    """The instance each query's target mask is (the one of highest IoU): ``targets`` [Q, H, W],
    ``instance_masks`` [N, H, W] on the same grid. Returns [Q] int64 (-1 when no instance overlaps).
    Adapter-independent: CondInst's targets are rows of the image's masks, SOLOv2's are copies."""
    if len(instance_masks) == 0 or len(targets) == 0:
        return torch.full((len(targets),), -1, dtype=torch.long)
    t = (targets > 0.5).flatten(1).float()
    m = instance_masks.flatten(1).float()
    inter = t @ m.t()
    union = t.sum(1, keepdim=True) + m.sum(1)[None] - inter
    iou = inter / union.clamp(min=1)
    best, index = iou.max(dim=1)
    return torch.where(best > 0, index, torch.full_like(index, -1))


def pick_per_group(groups, k, generator=None):
    """Indices of up to ``k`` random members of each group (``groups`` [Q] int64; negative = none),
    sorted."""
    order = torch.randperm(len(groups), generator=generator)
    taken, keep = {}, []
    for i in order.tolist():
        g = int(groups[i])
        if g < 0 or taken.get(g, 0) >= k:
            continue
        taken[g] = taken.get(g, 0) + 1
        keep.append(i)
    return torch.tensor(sorted(keep), dtype=torch.long)


def sample_instance_pixels(instance_masks, k, generator=None):
    """Up to ``k`` random cells of each instance mask [N, H, W] (bool): (instance index [M],
    flat cell index [M]), the memory's instance-balanced draw (``samples._random_members``)."""
    from ..inter.samples import _random_members

    return _random_members(instance_masks.flatten(1), k, generator)


PROBE_MIN_CELLS = 4  # an instance enters the probe with at least this many cells (half to fit, half to test)
PROBE_RIDGE = 0.1  # ridge on the scaled features, against a total sample weight of 1


def group_statistics(features, groups):
    """Per group: (count [G], sum of features [G, D], sum of squared norms [G]) of ``features``
    [N, D] grouped by ``groups`` [N] (int64, 0..G-1), G = groups.max() + 1."""
    g = int(groups.max()) + 1 if len(groups) else 0
    features = features.double()
    counts = torch.zeros(g, dtype=torch.float64).index_add_(0, groups, torch.ones(len(groups), dtype=torch.float64))
    sums = torch.zeros(g, features.shape[1], dtype=torch.float64).index_add_(0, groups, features)
    sumsq = torch.zeros(g, dtype=torch.float64).index_add_(0, groups, (features ** 2).sum(1))
    return counts, sums, sumsq


def between_share_from_statistics(counts, sums, sumsq):
    """The between-group share of the total sum of squares from per-group statistics (as
    :func:`group_statistics` gives them; groups may come from separate batches):
    sum_g n_g ||mu_g - mu||^2 / sum_x ||x - mu||^2. nan when the total is zero."""
    counts, sums, sumsq = counts.double(), sums.double(), sumsq.double()
    keep = counts > 0
    counts, sums, sumsq = counts[keep], sums[keep], sumsq[keep]
    n = float(counts.sum())
    if n == 0:
        return float("nan")
    grand = sums.sum(0)
    correction = float((grand ** 2).sum()) / n
    total = float(sumsq.sum()) - correction
    between = float(((sums ** 2).sum(1) / counts).sum()) - correction
    if total <= 1e-12 * max(float(sumsq.sum()), 1e-300):
        return float("nan")
    return min(max(between / total, 0.0), 1.0)


def between_image_share(features, groups):
    """The share of the variance of ``features`` [N, D] that lies between the groups ``groups``
    [N] (images): see :func:`between_share_from_statistics`."""
    return between_share_from_statistics(*group_statistics(features, groups))


def probe_balanced_accuracy(pos_train, neg_train, pos_test, neg_test, ridge=PROBE_RIDGE):
    """Balanced accuracy on (``pos_test`` [P, D], ``neg_test`` [M, D]) of a linear classifier
    fitted in closed form on (``pos_train``, ``neg_train``): ridge least squares on targets +1 / -1
    with each class weighing 1/2 in total, features centred and scaled by the training set's RMS
    spread, bias unpenalised; a score > 0 says "positive". Deterministic."""
    x = torch.cat([pos_train, neg_train]).double()
    y = torch.cat([torch.ones(len(pos_train)), -torch.ones(len(neg_train))]).double()
    w = torch.cat([torch.full((len(pos_train),), 0.5 / len(pos_train)),
                   torch.full((len(neg_train),), 0.5 / len(neg_train))]).double()
    # Centred, and scaled by one number (the training set's RMS spread): the ridge is then
    # scale-free without inflating near-constant channels, as a per-channel scale would on the
    # few cells of a small instance.
    mean = x.mean(0)
    std = (x - mean).pow(2).mean().sqrt().clamp(min=1e-6)
    a = torch.cat([(x - mean) / std, torch.ones(len(x), 1, dtype=torch.float64)], dim=1)
    penalty = torch.eye(a.shape[1], dtype=torch.float64) * ridge
    penalty[-1, -1] = 0.0
    coef = torch.linalg.solve(a.t() @ (w[:, None] * a) + penalty, a.t() @ (w * y))

    def score(z):
        z = (z.double() - mean) / std
        return z @ coef[:-1] + coef[-1]

    tpr = float((score(pos_test) > 0).double().mean())
    tnr = float((score(neg_test) <= 0).double().mean())
    return 0.5 * (tpr + tnr)


def own_vs_same_position_probe(maps, valid, instance_masks, generator=None, min_cells=PROBE_MIN_CELLS):
    """The own-vs-same-position probe of one batch: ``maps`` [B, D, H, W] (the batch's embeddings,
    cells aligned), ``valid`` [(h, w)] per image (its cells; the rest is padding),
    ``instance_masks`` [N_i, H, W] bool per image on the same grid. For each instance with at
    least ``min_cells`` cells, its cells are split at random into halves; positives: the
    instance's own embeddings there; negatives: the other images' at the same cells (where
    valid). Returns the list of per-instance balanced accuracies (:func:`probe_balanced_accuracy`)."""
    accuracies = []
    for i, masks in enumerate(instance_masks):
        others = [j for j in range(len(instance_masks)) if j != i]
        if not others:
            break
        for mask in masks:
            ys, xs = mask.nonzero(as_tuple=True)
            if len(ys) < min_cells:
                continue
            order = torch.randperm(len(ys), generator=generator)
            half = (len(ys) + 1) // 2
            parts = []
            for cells in (order[:half], order[half:]):
                cy, cx = ys[cells], xs[cells]
                pos = maps[i][:, cy, cx].t()
                neg = [maps[j][:, cy, cx].t()[(cy < valid[j][0]) & (cx < valid[j][1])] for j in others]
                parts.append((pos, torch.cat(neg)))
            (pos_tr, neg_tr), (pos_te, neg_te) = parts
            if len(neg_tr) == 0 or len(neg_te) == 0:
                continue
            accuracies.append(probe_balanced_accuracy(pos_tr, neg_tr, pos_te, neg_te))
    return accuracies


def heldout_mapper(cfg):
    """A DatasetMapper for held-out images with their ground truth: resized as at test time (no
    random augmentation), instance masks kept."""
    from detectron2.data import DatasetMapper
    from detectron2.data import transforms as T

    return DatasetMapper(
        is_train=True,
        augmentations=[T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)],
        image_format=cfg.INPUT.FORMAT,
        use_instance_mask=True,
        instance_mask_format=cfg.INPUT.MASK_FORMAT,
    )


class _Accumulator:
    def __init__(self):
        self.sums = {}

    def add(self, name, total, count):
        s = self.sums.setdefault(name, [0.0, 0])
        s[0] += total
        s[1] += count

    def mean(self, name):
        total, count = self.sums.get(name, (0.0, 0))
        return total / count if count else float("nan")


@contextmanager
def training_forward_with_frozen_statistics(model):
    """The model in training mode (its loss path, hence its own matching) but every normalisation
    layer in eval mode (running statistics, no update), gradients off; modes restored after."""
    modes = {m: m.training for m in model.modules()}
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._NormBase):
            m.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, mode in modes.items():
            m.train(mode)


try:  # the functions above need no detectron2; the evaluator does
    from detectron2.evaluation import DatasetEvaluator
except ImportError:  # pragma: no cover - exercised on machines without detectron2
    DatasetEvaluator = object


class IUQMeasures(DatasetEvaluator):
    """The measures of the module docstring on the first ``MEASURES.MAX_IMAGES`` annotated images
    of ``dataset_name``, resized as at test time. Runs its own forwards in ``evaluate`` (it needs
    the ground truth and the model's matching, which inference does not give), on every process
    alike (the models' losses synchronise across processes); the main process returns them as
    ``{"iuq": {...}}``."""

    BATCH = 4

    def __init__(self, cfg, model, dataset_name):
        from ..adapters import build_adapter

        self.cfg, self.dataset_name = cfg, dataset_name
        self.model = model.module if hasattr(model, "module") else model
        self.adapter = build_adapter(cfg, self.model)  # the trainer's own, if it has one
        self.pixel_mean = torch.tensor(cfg.MODEL.PIXEL_MEAN).view(-1, 1, 1)

    def reset(self):
        pass

    def process(self, inputs, outputs):
        pass  # measured in evaluate(), from forwards of its own

    def _loader(self):
        from detectron2.data import DatasetCatalog

        m = self.cfg.MODEL.IUQ.MEASURES
        dicts = [d for d in DatasetCatalog.get(self.dataset_name) if d.get("annotations")][: m.MAX_IMAGES]
        if not dicts:
            raise ValueError(f"MODEL.IUQ.MEASURES: dataset {self.dataset_name!r} has no annotated image to measure on")
        mapper = heldout_mapper(self.cfg)
        for s in range(0, len(dicts), self.BATCH):
            batch = [mapper(d) for d in dicts[s : s + self.BATCH]]
            yield [d for d in batch if len(d["instances"]) > 0]

    def evaluate(self):
        from detectron2.utils import comm

        from ..data.batch import batch_masks
        from ..equi.views import add_views

        m_cfg = self.cfg.MODEL.IUQ.MEASURES
        gen = torch.Generator().manual_seed(m_cfg.SEED)
        self._probe_gen = torch.Generator().manual_seed(m_cfg.SEED + 1)  # the testbed property's own
        self._var_stats = []
        rng = random.Random(m_cfg.SEED)
        acc = _Accumulator()
        queries, metas, q_image, samples_e, samples_loc, s_image = [], [], [], [], [], []
        adapter, image_offset = self.adapter, 0
        with training_forward_with_frozen_statistics(self.model):
            for batch in self._loader():
                if not batch:
                    continue
                n = len(batch)
                masks = batch_masks(batch)  # rasterised once: for the views and the samples
                full, views = add_views(batch, adapter.stride, self.cfg.MODEL.IUQ.EQUI, self.pixel_mean, rng, masks=masks)
                with adapter.capture() as cap:
                    self.model(full)
                self._measure_batch(cap, full, views, n, image_offset, gen, acc,
                                    (queries, metas, q_image, samples_e, samples_loc, s_image), masks)
                image_offset += n
        self._cross_scene(queries, metas, q_image, samples_e, samples_loc, s_image, acc)
        if not comm.is_main_process():
            return {}
        names = ["cross_fa", "cross_fa_frac", "own_fa", "own_fa_frac", "equi_rel_err", "equi_dice", "view_dice",
                 "own_probe"]
        result = {name: acc.mean(name) for name in names}
        result["between_var"] = (between_share_from_statistics(*(torch.stack(t) for t in zip(*self._var_stats)))
                                 if self._var_stats else float("nan"))
        result["images"] = image_offset
        logger.info(f"IUQ measures on {self.dataset_name}: " + ", ".join(f"{k} {v:.4f}" for k, v in result.items()))
        return {"iuq": result}

    def _measure_batch(self, cap, batch, views, n, image_offset, gen, acc, store, masks):
        from ..equi.transforms import valid_cells
        from ..inter.samples import grid_locations, masks_on_grid

        queries, metas, q_image, samples_e, samples_loc, s_image = store
        adapter, k_q = self.adapter, self.cfg.MODEL.IUQ.MEASURES.QUERIES_PER_INSTANCE
        emb = cap.embeddings.float()
        grid_h, grid_w = emb.shape[-2:]
        locations = grid_locations(grid_h, grid_w, cap.stride, emb.device)
        mask_grid = cap.gt_masks.shape[-2:]
        valid = [valid_cells(tuple(batch[i]["image"].shape[-2:]), cap.stride) for i in range(n)]
        probe_masks = []
        for i in range(n):
            inst = masks[i]
            on_masks = masks_on_grid(inst, mask_grid, cap.mask_stride).to(emb.device)
            on_emb = masks_on_grid(inst, (grid_h, grid_w), cap.stride).to(emb.device)
            # The testbed property: this image's instance cells (valid region only).
            inside = torch.zeros((grid_h, grid_w), dtype=torch.bool, device=emb.device)
            inside[: valid[i][0], : valid[i][1]] = True
            cells = on_emb.bool() & inside
            probe_masks.append(cells.cpu())
            feats = emb[i][:, cells.any(0)].t().cpu()
            if len(feats):
                self._var_stats.append(tuple(t[0] for t in group_statistics(feats, torch.zeros(len(feats), dtype=torch.long))))
            mine = (cap.query_images == i).nonzero(as_tuple=True)[0]
            targets = cap.gt_masks[cap.gt_index[mine]]
            owner = assign_instances(targets, on_masks)
            pick = pick_per_group(owner, k_q, gen)
            chosen, chosen_owner = mine[pick], owner[pick]
            s_owner, s_cell = sample_instance_pixels(on_emb, self.cfg.MODEL.IUQ.MEASURES.PIXELS_PER_INSTANCE, gen)
            e = emb[i].flatten(1)[:, s_cell].t()  # [M, D]
            loc = locations[s_cell]
            meta = {key: v[chosen] for key, v in cap.query_meta.items()}
            q = cap.queries[chosen].float()
            if len(q) and len(e):
                logits = adapter.decode_samples(q, meta, e, loc)
                total, above, count = false_activation(logits, chosen_owner[:, None] != s_owner[None, :])
                acc.add("own_fa", total, count)
                acc.add("own_fa_frac", above, count)
            queries.append(q.cpu())
            metas.append({key: v.cpu() for key, v in meta.items()})
            q_image.append(torch.full((len(q),), image_offset + i, dtype=torch.long))
            samples_e.append(e.cpu())
            samples_loc.append(loc.cpu())
            s_image.append(torch.full((len(e),), image_offset + i, dtype=torch.long))
        probe = own_vs_same_position_probe(emb[:n].cpu(), valid, probe_masks, self._probe_gen)
        acc.add("own_probe", float(sum(probe)), len(probe))
        s = cap.stride
        for k, v in enumerate(views):
            (hc, wc), (hv, wv) = valid_cells(v.g.in_size, s), valid_cells(v.g.out_size, s)
            moved = v.g.apply_features(emb[v.source, :, :hc, :wc])
            own = emb[n + k, :, :hv, :wv]
            acc.add("equi_rel_err", relative_error(own, moved), 1)
            idx = (cap.query_images == n + k).nonzero(as_tuple=True)[0]
            if len(idx) == 0:
                continue
            hm, wm = valid_cells(v.g.out_size, cap.mask_stride)
            meta = {key: val[idx] for key, val in cap.query_meta.items()}
            zeros = torch.zeros_like(idx)
            target = cap.gt_masks[cap.gt_index[idx]][:, :hm, :wm]
            on_moved = adapter.decode_map(cap.queries[idx], meta, zeros, moved[None])[:, :hm, :wm]
            on_own = adapter.decode_map(cap.queries[idx], meta, zeros, own[None])[:, :hm, :wm]
            acc.add("equi_dice", float(hard_dice(on_moved, target).sum()), len(idx))
            acc.add("view_dice", float(hard_dice(on_own, target).sum()), len(idx))

    def _cross_scene(self, queries, metas, q_image, samples_e, samples_loc, s_image, acc, chunk=4096):
        if not queries:
            return
        q = torch.cat(queries)
        meta = {key: torch.cat([m[key] for m in metas]) for key in metas[0]}
        qi, e, loc, si = torch.cat(q_image), torch.cat(samples_e), torch.cat(samples_loc), torch.cat(s_image)
        if len(q) == 0 or len(e) == 0:
            return
        device = self.adapter.model.device if hasattr(self.adapter.model, "device") else "cpu"
        q, meta = q.to(device), {k: v.to(device) for k, v in meta.items()}
        for s in range(0, len(e), chunk):
            logits = self.adapter.decode_samples(q, meta, e[s : s + chunk].to(device), loc[s : s + chunk].to(device))
            total, above, count = false_activation(logits.cpu(), qi[:, None] != si[None, s : s + chunk])
            acc.add("cross_fa", total, count)
            acc.add("cross_fa_frac", above, count)
