"""IUQTrainer: detectron2's DefaultTrainer whose ``run_step`` adds the two IUQ losses.

Read ``run_step`` top to bottom: views in, one forward of the stock model with its calls
captured, the base losses as the model defines them, ``loss_inter`` against the memory,
``loss_equi`` against the transformed embeddings, backward, memory update, step.
Nothing of IUQ lives in the model: its weights are the stock model's.
"""
import logging
import random
import time
from contextlib import nullcontext

import torch
from detectron2.data import DatasetMapper, MetadataCatalog, build_detection_train_loader, get_detection_dataset_dicts
from detectron2.engine import AMPTrainer, DefaultTrainer
from detectron2.evaluation import DatasetEvaluators
from detectron2.utils import comm

from ..adapters import adapter_class, adapter_class_or_none, build_adapter
from ..adapters.base import one_query_per_instance
from ..config import iuq_on, validate_iuq_config
from ..data.batch import batch_masks, dataset_image_id, with_empty_masks
from ..data.loader import check_dataset_masks, loader_config
from ..data.mapper import NamedRecordErrors, named_dataset_errors
from ..equi.chunked import chunked_sum
from ..equi.replay import replay_equi_loss
from ..equi.crops import crops
from ..equi.transforms import valid_cells
from ..equi.views import add_views
from ..evaluation.evaluators import build_evaluator
from ..evaluation.measures import IUQMeasures
from ..inter.bound import MomentumBound, bound_influence, nearest_parameters
from ..inter.images import ImageMemory, image_inter_loss
from ..inter.losses import inter_scene_loss
from ..inter.memory import PixelMemory
from ..inter.samples import masks_on_grid, sample_pixels
from ..inter.stuff import stuff_classes_of, stuff_flags
from .hooks import PeakMemory, count_dead_steps, own_mask_probability, put_scalars
from .launch import cpu_ddp_support
from .models import check_num_classes

# Queries of a view decoded at once by the equivariance loss: bounds its transient memory (CondInst:
# ~10 maps of the view's size per query) while keeping the per-chunk overhead small.
EQUI_QUERY_CHUNK = 32

logger = logging.getLogger(__name__)


class IUQTrainer(DefaultTrainer):
    def __init__(self, cfg):
        validate_iuq_config(cfg)
        iuq = cfg.MODEL.IUQ
        self.iuq_on = iuq_on(cfg)
        if self.iuq_on:  # fail before building anything if the model has no adapter or cannot take the config
            adapter_class(cfg).check_config(cfg)
        with cpu_ddp_support(cfg):
            super().__init__(cfg)
        self.iuq_cfg = iuq
        # Installed with IUQ off too, where the model has one: an adapter also carries its model
        # through batches the model's own code fails on (images without instances), and the IUQ-off
        # twin must train on the same data. Without an open capture it records nothing.
        self.adapter = build_adapter(cfg, self.model) if self.iuq_on or adapter_class_or_none(cfg) else None
        # Pixel samples, or whole images for adapters whose decode is a replay (SOLQ).
        self.memory_kind = self.adapter.memory_kind if self.adapter is not None else "pixels"
        memory = ImageMemory if self.memory_kind == "images" else PixelMemory
        self.memory = memory(iuq.MEMORY.SIZE, dtype=getattr(torch, iuq.MEMORY.DTYPE), device=cfg.MODEL.DEVICE)
        # The memory is training state: saved with the optimizer in checkpoints, never in the model.
        self.checkpointer.add_checkpointable("iuq_memory", self.memory)
        self.pixel_mean = torch.tensor(cfg.MODEL.PIXEL_MEAN).view(-1, 1, 1)
        # Views are drawn per rank (like the data), reproducibly when SEED is set.
        self.view_rng = random.Random((cfg.SEED if cfg.SEED >= 0 else random.getrandbits(32)) + comm.get_rank())
        self.dead_steps = 0  # consecutive steps whose masks are all off (see own_mask_probability)
        # INTER.GRAD_BOUND: the last step's (ratio before the bound or None, scale), and whether the
        # layer it measures at has been logged
        self.inter_bound, self._bound_logged = (None, 1.0), False
        # GRAD_BOUND_ON "momentum": L_inter's and the base losses' shares of the optimizer's momentum
        # at the query head, training state (checkpointed with the optimizer)
        self.inter_momentum = None
        if iuq.INTER.GRAD_BOUND > 0 and iuq.INTER.GRAD_BOUND_ON == "momentum":
            self.inter_momentum = MomentumBound(iuq.INTER.GRAD_BOUND, iuq.INTER.GRAD_BOUND_MIN_SCALE)
            self.checkpointer.add_checkpointable("iuq_inter_momentum", self.inter_momentum)
        # Which contiguous classes are stuff (panoptic data; none for instance segmentation).
        train = cfg.DATASETS.TRAIN
        self.stuff = stuff_flags(MetadataCatalog.get(train[0])) if train else torch.zeros(0, dtype=torch.bool)

    @classmethod
    def build_optimizer(cls, cfg, model):
        """The base model's own optimizer where its adapter names one (SparseInst: AdamW with its
        parameter groups), else detectron2's."""
        adapter = adapter_class_or_none(cfg)
        return (adapter and adapter.build_optimizer(cfg, model)) or super().build_optimizer(cfg, model)

    @classmethod
    def build_train_loader(cls, cfg):
        # The base model's own mapper where its adapter names one; else detectron2's, with instance
        # masks whatever MODEL.MASK_ON says (IUQ needs them).
        adapter = adapter_class_or_none(cfg)
        mapper = adapter and adapter.train_mapper(cfg)
        if mapper is None:
            mapper = DatasetMapper(**{**DatasetMapper.from_config(cfg, is_train=True), "use_instance_mask": True})
        # Whichever mapper: an image it fails on is named (file, image id, what to do), or skipped
        # with a warning under DATALOADER.SKIP_BAD_IMAGES.
        mapper = NamedRecordErrors(mapper, skip=cfg.DATALOADER.SKIP_BAD_IMAGES)
        # The dicts as detectron2's loader would read them, read here once so that their masks are
        # checked before the first step.
        with named_dataset_errors(cfg.DATASETS.TRAIN):
            dataset = get_detection_dataset_dicts(
                cfg.DATASETS.TRAIN, filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS,
                min_keypoints=cfg.MODEL.ROI_KEYPOINT_HEAD.MIN_KEYPOINTS_PER_IMAGE if cfg.MODEL.KEYPOINT_ON else 0,
                proposal_files=cfg.DATASETS.PROPOSAL_FILES_TRAIN if cfg.MODEL.LOAD_PROPOSALS else None,
            )
        if iuq_on(cfg):
            check_dataset_masks(dataset, cfg.DATASETS.TRAIN)
        check_num_classes(cfg, dataset, cfg.DATASETS.TRAIN)
        return build_detection_train_loader(loader_config(cfg), mapper=mapper, dataset=dataset)

    def build_hooks(self):
        hooks = super().build_hooks()
        # Before the writers (the last hook), so that each write sees the peak so far.
        return hooks[:-1] + [PeakMemory()] + hooks[-1:]

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        return build_evaluator(cfg, dataset_name, output_folder)

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        """detectron2's test, with the IUQ measures next to each dataset's evaluator when
        ``MODEL.IUQ.MEASURES.ENABLED`` (they need the model, which ``build_evaluator`` is not given)."""
        if evaluators is None and cfg.MODEL.IUQ.MEASURES.ENABLED:
            evaluators = [DatasetEvaluators([cls.build_evaluator(cfg, name), IUQMeasures(cfg, model, name)])
                          for name in cfg.DATASETS.TEST]
        return super().test(cfg, model, evaluators)

    def run_step(self):
        trainer = self._trainer
        trainer.iter = self.iter
        assert self.model.training, "[IUQTrainer] model was changed to eval mode!"
        start = time.perf_counter()
        batch = next(trainer._data_loader_iter)
        data_time = time.perf_counter() - start

        with self._autocast():
            loss_dict, batch_samples = self.forward_losses(batch)
            losses = sum(loss_dict.values())
        self.optimizer.zero_grad()
        scaler = trainer.grad_scaler if isinstance(trainer, AMPTrainer) else None
        (scaler.scale(losses) if scaler else losses).backward()
        if batch_samples is not None:  # after the loss (a batch never meets itself through the
            self.memory.enqueue(batch_samples.detach())  # memory) and after backward (may re-read it)
        trainer.after_backward()
        trainer._write_metrics(loss_dict, data_time)
        if scaler:
            scaler.step(self.optimizer)
            scaler.update()
        else:
            self.optimizer.step()

    def forward_losses(self, batch):
        """The base model's losses on ``batch`` and its views, plus ``loss_inter`` and
        ``loss_equi``. Returns (loss_dict, this batch's pixel samples for the memory or None)."""
        views_on = self.iuq_on and self.iuq_cfg.EQUI.ENABLED
        equi = views_on and self.iuq_cfg.EQUI.MODE != "augment"  # "augment": views as plain augmentation
        inter = self.iuq_on and self.iuq_cfg.INTER.ENABLED
        num_originals, samples = len(batch), None
        batch = with_empty_masks(batch, require=self.iuq_on)
        masks = batch_masks(batch) if views_on or inter else None  # the originals', rasterised once
        if views_on:  # originals, then one transformed view of each
            batch, views = add_views(batch, self.adapter.stride, self.iuq_cfg.EQUI, self.pixel_mean, self.view_rng,
                                     masks=masks)

        with self.adapter.capture() if inter or equi else nullcontext() as captured:
            loss_dict = self.model(batch)  # the base model's own losses (originals and views)
        if inter or equi:
            originals, regions = (None, None) if self.memory_kind == "images" else \
                self.read_embeddings(captured, views if equi else [], num_originals)
            self.watch_dead_masks(captured, num_originals)
        ramp = self.iuq_weight_factor()  # MODEL.IUQ.WARMUP_ITERS; 1 without
        if inter:
            image_ids = torch.tensor([dataset_image_id(d) for d in batch], device=self.memory.device)
            if self.memory_kind == "images":
                loss_dict["loss_inter"], samples = self.replay_inter_loss(captured, image_ids, num_originals)
            else:
                loss_dict["loss_inter"], samples = self.inter_loss(captured, originals, batch, image_ids, masks)
            loss_dict["loss_inter"] = loss_dict["loss_inter"] * ramp
            if self.iuq_cfg.INTER.GRAD_BOUND > 0:  # its gradient at the query head capped (value unchanged)
                loss_dict["loss_inter"] = self.bounded_inter_loss(loss_dict, captured)
        if equi:
            loss_dict["loss_equi"] = self.equi_loss(captured, views, num_originals, regions) * ramp
        return loss_dict, samples

    def bounded_inter_loss(self, loss_dict, cap):
        """``loss_dict["loss_inter"]`` with its gradient at most ``INTER.GRAD_BOUND`` times the base
        losses' (the entries other than IUQ's) at the parameters nearest the queries, this step's or
        (``INTER.GRAD_BOUND_ON "momentum"``) their shares of the optimizer's momentum
        (``iuq.inter.bound``); logs ``iuq/inter_grad_ratio`` (before the bound) and
        ``iuq/inter_grad_scale``."""
        loss = loss_dict["loss_inter"]
        base = [v for k, v in loss_dict.items() if k not in ("loss_inter", "loss_equi")]
        params = nearest_parameters(cap.queries, self.model)
        if not base or not params:  # (the momentum's shares skip this step: they neither decay nor grow)
            return loss
        if not self._bound_logged:
            names = {id(p): n for n, p in self.model.named_parameters()}
            logger.info(f"IUQ: MODEL.IUQ.INTER.GRAD_BOUND {self.iuq_cfg.INTER.GRAD_BOUND} compares "
                        f"{'shares of the momentum' if self.inter_momentum is not None else 'gradients'} at "
                        f"{', '.join(names.get(id(p), '?') for p in params)}")
            self._bound_logged = True
        if self.inter_momentum is not None:
            loss, ratio, scale = self.inter_momentum(loss, sum(base), params, self.momentum_of(params[0]))
        else:
            loss, ratio, scale = bound_influence(loss, sum(base), params, self.iuq_cfg.INTER.GRAD_BOUND)
        self.inter_bound = (ratio, scale)
        put_scalars({"iuq/inter_grad_scale": scale, **({} if ratio is None else {"iuq/inter_grad_ratio": ratio})})
        return loss

    def momentum_of(self, param):
        """The optimizer's momentum for ``param``: SGD's ``momentum``, Adam's ``betas[0]`` (0 if it
        has none, where the momentum bound is the per-step one)."""
        for group in self.optimizer.param_groups:
            if any(p is param for p in group["params"]):
                return float(group.get("momentum", group.get("betas", (0.0,))[0]))
        return 0.0

    def iuq_weight_factor(self):
        """MODEL.IUQ.WARMUP_ITERS: min(1, (iter + 1) / WARMUP_ITERS), 1 without warm-up."""
        n = self.iuq_cfg.WARMUP_ITERS
        return 1.0 if n <= 0 else min(1.0, (getattr(self, "iter", 0) + 1) / n)

    def own_mask_probability(self, cap, num_originals):
        """The dead-mask monitor's reading (``hooks.own_mask_probability``) with this adapter (or
        the adapter's own, where it has one: SOLQ's, none)."""
        own = getattr(self.adapter, "own_mask_probability", None)
        if own is not None:
            return own(cap, num_originals)
        return own_mask_probability(self.adapter, cap, num_originals)

    def watch_dead_masks(self, cap, num_originals):
        """Log ``iuq/own_mask_p`` and warn when the masks die or come back (``hooks.count_dead_steps``)."""
        p = self.own_mask_probability(cap, num_originals)
        if p is not None:
            self.dead_steps = count_dead_steps(p, self.dead_steps)

    def _autocast(self):
        if not isinstance(self._trainer, AMPTrainer):
            return nullcontext()
        device = torch.device(self.cfg.MODEL.DEVICE).type
        dtype = self._trainer.precision if device == "cuda" else torch.bfloat16
        return torch.autocast(device_type=device, dtype=dtype)

    @staticmethod
    def read_embeddings(cap, views, num_originals):
        """IUQ's reads of the pixel-embedding map ``cap.embeddings`` [B, D, H, W], all from one
        autograd node (``crops``: one gradient buffer in backward, not one per read). Returns the
        originals' maps [num_originals, D, H, W] and, per view, (its source's valid cells
        [D, hc, wc], the view's own valid cells [D, h', w'])."""
        s, boxes = cap.stride, [(slice(0, num_originals),)]
        for k, v in enumerate(views):
            (hc, wc), (hv, wv) = valid_cells(v.g.in_size, s), valid_cells(v.g.out_size, s)
            boxes.append((v.source, slice(None), slice(0, hc), slice(0, wc)))
            boxes.append((num_originals + k, slice(None), slice(0, hv), slice(0, wv)))
        originals, *regions = crops(cap.embeddings, boxes)
        return originals, list(zip(regions[::2], regions[1::2]))

    def inter_loss(self, cap, originals, batch, image_ids, masks=None):
        """Eq. 5's inter-scene term: every query against pixels of other images (this batch's
        ``originals`` [n, D, H, W] and the memory). ``masks``: the originals' instance masks at
        input size (``batch_masks``; rasterised here without). Returns the weighted loss and this
        batch's samples."""
        cfg = self.iuq_cfg
        emb, num_originals = originals, len(originals)
        if masks is None:
            masks = batch_masks(batch[:num_originals])
        grid = [masks_on_grid(m, emb.shape[-2:], cap.stride).to(emb.device) for m in masks[:num_originals]]
        classes = [d["instances"].gt_classes for d in batch[:num_originals]]
        samples = sample_pixels(
            emb, grid, image_ids[:num_originals], cap.stride, cfg.MEMORY.SAMPLING,
            cfg.MEMORY.PIXELS_PER_INSTANCE, cfg.MEMORY.PIXELS_PER_IMAGE,
            instance_classes=classes, instance_stuff=[stuff_classes_of(c, self.stuff) >= 0 for c in classes],
        )
        queries, query_images, query_meta, query_classes = self.inter_queries(cap, num_originals)
        query_stuff = None if query_classes is None else stuff_classes_of(query_classes, self.stuff)
        # INTER.DETACH_NEGATIVES: the batch's samples as constants (Algorithm 1), the loss's value
        # unchanged; INTER.ALPHA_WEIGHTS: which side ALPHA weighs (the loss's alpha is fvcore's).
        negatives = samples.detach() if cfg.INTER.DETACH_NEGATIVES else samples
        alpha = cfg.INTER.ALPHA if cfg.INTER.ALPHA_WEIGHTS == "positives" else 1.0 - cfg.INTER.ALPHA
        loss = inter_scene_loss(
            queries, image_ids[query_images], [negatives, self.memory.samples()],
            decode=self.adapter.decode_samples, query_meta=query_meta,
            loss=cfg.INTER.LOSS, alpha=alpha, gamma=cfg.INTER.GAMMA,
            chunk_size=cfg.INTER.CHUNK_SIZE, query_stuff_classes=query_stuff,
        )
        if not loss.requires_grad:  # no query in the batch (no instances): a zero still on the graph
            loss = cap.embeddings.sum().float() * 0.0
        return loss * cfg.INTER.WEIGHT, samples

    def replay_inter_loss(self, cap, image_ids, num_originals):
        """Eq. 5 for adapters whose decode is a replay (``memory_kind`` "images"): every query
        replayed on the batch's other originals and on the memory's images (own image excluded),
        against zero (``iuq.inter.images.image_inter_loss``). Returns the weighted loss and this
        batch's scenes for the memory."""
        cfg = self.iuq_cfg
        scenes = self.adapter.batch_scenes(cap, image_ids, num_originals)
        queries, query_images, query_meta, _ = self.inter_queries(cap, num_originals)
        negatives = scenes.detach() if cfg.INTER.DETACH_NEGATIVES else scenes
        alpha = cfg.INTER.ALPHA if cfg.INTER.ALPHA_WEIGHTS == "positives" else 1.0 - cfg.INTER.ALPHA
        loss = image_inter_loss(self.adapter.replay_logits, queries, query_meta, image_ids[query_images],
                                list(negatives) + self.memory.scenes(), cfg.INTER.LOSS, alpha, cfg.INTER.GAMMA)
        return loss * cfg.INTER.WEIGHT, scenes

    def inter_queries(self, cap, num_originals):
        """(queries, query_images, query_meta, query_classes) of the queries ``loss_inter`` takes
        (``MODEL.IUQ.INTER.QUERIES``): "all", every captured query (views' included); or
        "matched_originals", one per ground-truth instance of the original images
        (``one_query_per_instance`` on the adapter's ``query_instances``, the highest
        ``query_quality`` kept)."""
        if self.iuq_cfg.INTER.QUERIES == "all":
            return cap.queries, cap.query_images, cap.query_meta, cap.query_classes
        keep = one_query_per_instance(self.adapter.query_instances(cap), cap.query_images < num_originals,
                                      cap.query_quality)
        classes = None if cap.query_classes is None else cap.query_classes[keep]
        return cap.queries[keep], cap.query_images[keep], {k: v[keep] for k, v in cap.query_meta.items()}, classes

    def equi_loss(self, cap, views, num_originals, regions):
        """Eq. 8: the view's queries on g(F) of the original must give the view's ground truth
        (mode "full"); or, mode "feature", the view's embeddings must equal g(F). ``regions``: per
        view, (its source's valid cells, its own), as ``read_embeddings`` gives them.

        Each view is decoded on its own valid region only (the rest of the padded batch map is
        outside every dice term, and neither decode reads past the region for the cells in it:
        CondInst's x2 upsampling of cell j only looks at cell j + 1 for outputs past 2j + 1), in
        chunks of ``EQUI_QUERY_CHUNK`` queries, each differentiated as soon as it is computed
        (``chunked_sum``): the loss holds no per-query map for backward.
        ``tests/test_integration_adelaidet.py`` checks it against the whole-map computation.
        """
        weight = self.iuq_cfg.EQUI.WEIGHT
        if self.memory_kind == "images":  # replayed queries on g of every encoder level (iuq.equi.replay)
            return replay_equi_loss(self.adapter, cap, views, num_originals, self.iuq_cfg.EQUI.MODE) * weight
        if self.iuq_cfg.EQUI.MODE == "feature":  # g(F) and the view's F, on the view's valid cells
            diffs = [(own - v.g.apply_features(source)).pow(2).mean() for v, (source, own) in zip(views, regions)]
            return torch.stack(diffs).mean() * weight
        is_view = cap.query_images >= num_originals
        queries, images, meta, targets = cap.select_queries(is_view)
        if len(queries) == 0:
            return cap.embeddings.sum() * 0.0
        adapter, total = self.adapter, 0.0
        for k, (v, (source, _)) in enumerate(zip(views, regions)):
            mine = (images == num_originals + k).nonzero(as_tuple=True)[0]
            if len(mine) == 0:
                continue
            moved = v.g.apply_features(source)  # g(F), on the view's valid cells
            hm, wm = valid_cells(v.g.out_size, cap.mask_stride)
            chunks = mine.split(EQUI_QUERY_CHUNK)

            def dice_sum(i, view_queries, view_features, chunks=chunks, hm=hm, wm=wm):
                idx = chunks[i]
                logits = adapter.decode_map(
                    view_queries[idx], {key: m[idx] for key, m in meta.items()},
                    torch.zeros_like(idx), view_features[None],
                )[:, :hm, :wm]
                return adapter.mask_loss(logits, targets[idx, :hm, :wm]) * len(idx)

            total = total + chunked_sum(dice_sum, len(chunks), queries, moved)
        return total / len(queries) * weight

