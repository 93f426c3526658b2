"""IUQTrainer: detectron2's DefaultTrainer whose ``run_step`` adds the two IUQ losses.

Read ``run_step`` top to bottom: views in, one forward of the stock model with its calls
captured, the base losses as the model defines them, ``loss_inter`` against the memory,
``loss_equi`` against the transformed embeddings, backward, memory update, step.
Nothing of IUQ lives in the model: its weights are the stock model's.
"""
import hashlib
import logging
import numbers
import random
import resource
import time
from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F
from detectron2.data import DatasetCatalog, DatasetMapper, MetadataCatalog, build_detection_train_loader, get_detection_dataset_dicts
from detectron2.engine import AMPTrainer, DefaultTrainer, HookBase
from detectron2.engine import defaults as d2_defaults
from detectron2.structures import BitMasks, Instances
from detectron2.utils import comm
from detectron2.utils.events import get_event_storage

from .adapters import adapter_class, adapter_class_or_none, build_adapter
from .chunked import chunked_sum
from .config import validate_iuq_config
from .crops import crops
from .equivariance import valid_cells
from .losses import inter_scene_loss
from .memory import PixelMemory
from .models import check_num_classes
from .samples import sample_pixels
from .stuff import stuff_classes_of, stuff_flags
from .views import add_views, instance_bitmasks

logger = logging.getLogger(__name__)

# Queries of a view decoded at once by the equivariance loss: bounds its transient memory (CondInst:
# ~10 maps of the view's size per query) while keeping the per-chunk overhead small.
EQUI_QUERY_CHUNK = 32

# Dead-mask monitor: a step is "dead" when none of (up to) DEAD_MASK_QUERIES matched queries of the
# batch's originals has a mean sigmoid above DEAD_MASK_P on its own instance; DEAD_MASK_STEPS dead
# steps in a row log a warning (the mask losses have almost no gradient left there: SOLOv2's masks
# never came back in our runs; one CondInst quickstart run's did, after ~140 steps), and a warning
# that they are back if they return.
DEAD_MASK_P = 1e-3
DEAD_MASK_STEPS = 20
DEAD_MASK_QUERIES = 8


def dataset_image_id(d):
    """The dataset-level image id as an int64: integer ids as they are; any other id (a file name,
    a UUID) by a 64-bit hash of its text (BLAKE2b), so that at 10^6 images two images share an id
    with probability ~3e-8 (a 32-bit hash makes that near certain at COCO's 10^5): two images
    sharing an id would stop being each other's negatives."""
    if "image_id" not in d:
        raise ValueError(
            f"IUQ needs an 'image_id' in every dataset dict (to keep a query's own image out of "
            f"its negatives); {d.get('file_name', 'an image')} has none"
        )
    image_id = d["image_id"]
    if isinstance(image_id, numbers.Integral):
        return int(image_id)
    digest = hashlib.blake2b(str(image_id).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def iuq_on(cfg):
    """Whether ``cfg`` trains with either IUQ loss (``MODEL.IUQ.ENABLED`` and INTER or EQUI)."""
    iuq = cfg.MODEL.IUQ
    return bool(iuq.ENABLED and (iuq.INTER.ENABLED or iuq.EQUI.ENABLED))


class IUQTrainer(DefaultTrainer):
    def __init__(self, cfg):
        validate_iuq_config(cfg)
        iuq = cfg.MODEL.IUQ
        self.iuq_on = iuq_on(cfg)
        if self.iuq_on:
            adapter_class(cfg)  # fail before building anything if the model has no adapter
        with cpu_ddp_support(cfg):
            super().__init__(cfg)
        self.iuq_cfg = iuq
        # Installed with IUQ off too, where the model has one: an adapter also carries its model
        # through batches the model's own code fails on (images without instances), and the IUQ-off
        # twin must train on the same data. Without an open capture it records nothing.
        self.adapter = build_adapter(cfg, self.model) if self.iuq_on or adapter_class_or_none(cfg) else None
        self.memory = PixelMemory(iuq.MEMORY.SIZE, dtype=getattr(torch, iuq.MEMORY.DTYPE), device=cfg.MODEL.DEVICE)
        # The memory is training state: saved with the optimizer in checkpoints, never in the model.
        self.checkpointer.add_checkpointable("iuq_memory", self.memory)
        self.pixel_mean = torch.tensor(cfg.MODEL.PIXEL_MEAN).view(-1, 1, 1)
        # Views are drawn per rank (like the data), reproducibly when SEED is set.
        self.view_rng = random.Random((cfg.SEED if cfg.SEED >= 0 else random.getrandbits(32)) + comm.get_rank())
        self.dead_steps = 0  # consecutive steps whose masks are all off (see own_mask_probability)
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
        # The dicts as detectron2's loader would read them, read here once so that their masks are
        # checked before the first step.
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
        from .evaluation import build_evaluator

        return build_evaluator(cfg, dataset_name, output_folder)

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        """detectron2's test, with the IUQ measures next to each dataset's evaluator when
        ``MODEL.IUQ.MEASURES.ENABLED`` (they need the model, which ``build_evaluator`` is not given)."""
        if evaluators is None and cfg.MODEL.IUQ.MEASURES.ENABLED:
            from detectron2.evaluation import DatasetEvaluators

            from .measures import IUQMeasures

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
        if views_on:  # originals, then one transformed view of each
            batch, views = add_views(batch, self.adapter.stride, self.iuq_cfg.EQUI, self.pixel_mean, self.view_rng)

        with self.adapter.capture() if inter or equi else nullcontext() as captured:
            loss_dict = self.model(batch)  # the base model's own losses (originals and views)
        if inter or equi:
            originals, regions = self.read_embeddings(captured, views if equi else [], num_originals)
            self.watch_dead_masks(captured, num_originals)
        ramp = self.iuq_weight_factor()  # MODEL.IUQ.WARMUP_ITERS; 1 without
        if inter:
            image_ids = torch.tensor([dataset_image_id(d) for d in batch], device=self.memory.device)
            loss_dict["loss_inter"], samples = self.inter_loss(captured, originals, batch, image_ids)
            loss_dict["loss_inter"] = loss_dict["loss_inter"] * ramp
        if equi:
            loss_dict["loss_equi"] = self.equi_loss(captured, views, num_originals, regions) * ramp
        return loss_dict, samples

    def iuq_weight_factor(self):
        """MODEL.IUQ.WARMUP_ITERS: min(1, (iter + 1) / WARMUP_ITERS), 1 without warm-up."""
        n = self.iuq_cfg.WARMUP_ITERS
        return 1.0 if n <= 0 else min(1.0, (getattr(self, "iter", 0) + 1) / n)

    @torch.no_grad()
    def own_mask_probability(self, cap, num_originals):
        """For up to DEAD_MASK_QUERIES matched queries of the originals (evenly spaced), the mean
        sigmoid of the query's mask on its own instance [q]; None if there is none."""
        mine = (cap.query_images < num_originals).nonzero(as_tuple=True)[0]
        if len(mine) == 0:
            return None
        keep = mine[torch.linspace(0, len(mine) - 1, min(len(mine), DEAD_MASK_QUERIES)).long()]
        queries, images, meta, targets = cap.select_queries(keep)
        logits = self.adapter.decode_map(queries.detach(), meta, images, cap.embeddings.detach())
        hm, wm = min(logits.shape[-2], targets.shape[-2]), min(logits.shape[-1], targets.shape[-1])
        inside = targets[:, :hm, :wm] > 0.5
        p = logits[:, :hm, :wm].float().sigmoid() * inside
        return p.flatten(1).sum(1) / inside.flatten(1).sum(1).clamp(min=1)

    def watch_dead_masks(self, cap, num_originals):
        """Log ``iuq/own_mask_p`` (mean over queries) and warn once when every matched query's mask
        has been off (mean sigmoid < DEAD_MASK_P on its own instance) for DEAD_MASK_STEPS steps."""
        p = self.own_mask_probability(cap, num_originals)
        if p is None:
            return
        try:
            get_event_storage().put_scalar("iuq/own_mask_p", float(p.mean()))
        except AssertionError:  # outside train(): no event storage
            pass
        dead = float(p.max()) < DEAD_MASK_P
        if not dead and self.dead_steps >= DEAD_MASK_STEPS:
            logger.warning(f"IUQ: the masks are alive again after {self.dead_steps} dead steps")
        self.dead_steps = self.dead_steps + 1 if dead else 0
        if self.dead_steps == DEAD_MASK_STEPS:
            logger.warning(
                f"IUQ: every mask has been off for {DEAD_MASK_STEPS} steps (no matched query has a "
                f"mean sigmoid >= {DEAD_MASK_P} on its own instance): the masks are dead, and the mask "
                "losses have almost no gradient left to revive them. Seen with SOLOv2, whose ReLU mask "
                "features give all its kernels' logits a common part that IUQ's losses push down at "
                "once while the logits are large, and whose masks came back once in our runs (from a "
                "trained trunk, after ~160 steps); a CondInst quickstart run's after ~140 steps "
                "(docs/study.md, 'SOLOv2's dead masks'). Watch iuq/own_mask_p; if it stays at 0, train "
                "again (from scratch, or MODEL.WEIGHTS of a checkpoint saved before they died: not "
                "--resume, which would skip the ramps) with IUQ's weights ramped in "
                "(MODEL.IUQ.WARMUP_ITERS, e.g. 1000) over the learning rate's warm-up "
                "(SOLVER.WARMUP_ITERS the same, SOLVER.WARMUP_FACTOR 0.01) to a learning rate scaled "
                "to the batch, as the SOLOv2 and SOTR recipes do: that kept the masks alive on every "
                "seed of our runs, from random initialisation and from a trained trunk."
            )

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

    def inter_loss(self, cap, originals, batch, image_ids):
        """Eq. 5's inter-scene term: every query against pixels of other images (this batch's
        ``originals`` [n, D, H, W] and the memory). Returns the weighted loss and this batch's
        samples."""
        cfg = self.iuq_cfg
        emb, num_originals = originals, len(originals)
        grid, classes = [], []
        for d in batch[:num_originals]:
            masks = instance_bitmasks(d["instances"], tuple(d["image"].shape[-2:]))
            grid.append(masks_on_grid(masks, emb.shape[-2:], cap.stride).to(emb.device))
            classes.append(d["instances"].gt_classes)
        samples = sample_pixels(
            emb, grid, image_ids[:num_originals], cap.stride, cfg.MEMORY.SAMPLING,
            cfg.MEMORY.PIXELS_PER_INSTANCE, cfg.MEMORY.PIXELS_PER_IMAGE,
            instance_classes=classes, instance_stuff=[stuff_classes_of(c, self.stuff) >= 0 for c in classes],
        )
        query_stuff = None if cap.query_classes is None else stuff_classes_of(cap.query_classes, self.stuff)
        loss = inter_scene_loss(
            cap.queries, image_ids[cap.query_images], [samples, self.memory.samples()],
            decode=self.adapter.decode_samples, query_meta=cap.query_meta,
            loss=cfg.INTER.LOSS, alpha=cfg.INTER.ALPHA, gamma=cfg.INTER.GAMMA,
            chunk_size=cfg.INTER.CHUNK_SIZE, query_stuff_classes=query_stuff,
        )
        if not loss.requires_grad:  # no query in the batch (no instances): a zero still on the graph
            loss = cap.embeddings.sum().float() * 0.0
        return loss * cfg.INTER.WEIGHT, samples

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


def loader_config(cfg):
    """``cfg`` with the images the loader reads per step: SOLVER.IMS_PER_BATCH, or half of it when
    the views count toward it (``MODEL.IUQ.EQUI.VIEWS_IN_BATCH``: a step then holds the loaded
    images and their views, IMS_PER_BATCH in all)."""
    iuq = cfg.MODEL.IUQ
    if not (iuq.ENABLED and iuq.EQUI.ENABLED and iuq.EQUI.VIEWS_IN_BATCH):
        return cfg
    total, world = cfg.SOLVER.IMS_PER_BATCH, comm.get_world_size()
    if total % (2 * world):
        raise ValueError(
            f"MODEL.IUQ.EQUI.VIEWS_IN_BATCH True needs SOLVER.IMS_PER_BATCH ({total}) divisible by 2 x "
            f"the number of processes ({world}): each process reads half its share and adds a view of each"
        )
    cfg = cfg.clone()
    cfg.defrost()
    cfg.SOLVER.IMS_PER_BATCH = total // 2
    cfg.freeze()
    return cfg


class PeakMemory(HookBase):
    """Logs ``peak_mem_mb`` every 20 iterations: on CUDA the peak of allocated tensor memory
    (``torch.cuda.max_memory_allocated``), on CPU the process's peak resident set (which also
    counts the data, the code and the allocator's cache). Per process; the main one's is logged."""

    def after_step(self):
        if (self.trainer.iter + 1) % 20 and self.trainer.iter + 1 != self.trainer.max_iter:
            return
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            peak = torch.cuda.max_memory_allocated() / 2**20
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        self.trainer.storage.put_scalar("peak_mem_mb", peak, smoothing_hint=False)


@contextmanager
def cpu_ddp_support(cfg):
    """Let DefaultTrainer wrap a CPU model in DDP (Gloo): detectron2 always passes
    ``device_ids=[local_rank]``, which DDP rejects for CPU modules. Scoped to the constructor."""
    if torch.device(cfg.MODEL.DEVICE).type != "cpu":
        yield
        return
    create = d2_defaults.create_ddp_model
    d2_defaults.create_ddp_model = lambda model, **kw: create(model, **{"device_ids": None, **kw})
    try:
        yield
    finally:
        d2_defaults.create_ddp_model = create


def check_dataset_masks(dataset_dicts, names):
    """Fail before training, naming the dataset and an image, if an instance annotation (not a crowd
    region, which the mapper drops) carries no ``segmentation``: IUQ needs every instance's mask.
    Images without annotations are fine (``DATALOADER.FILTER_EMPTY_ANNOTATIONS False`` keeps them).
    ``names``: the DATASETS.TRAIN the dicts were read from."""
    missing, total, first = 0, 0, None
    for d in dataset_dicts:
        for a in d.get("annotations", ()):
            if a.get("iscrowd", 0):
                continue
            total += 1
            if not a.get("segmentation"):
                missing += 1
                first = first or d
    if not missing:
        return
    name = next((n for n in names if any(d.get("file_name") == first.get("file_name") for d in DatasetCatalog.get(n))),
                " / ".join(names)) if len(names) > 1 else names[0]
    raise ValueError(
        f"MODEL.IUQ needs instance masks, but {missing} of the {total} instance annotations of dataset "
        f"{name!r} (DATASETS.TRAIN) have no segmentation, e.g. in image {first.get('image_id', '?')} "
        f"({first.get('file_name', 'no file name')}): train on a dataset with segmentation annotations"
    )


def with_empty_masks(batch, require=True):
    """``batch`` with an empty ``gt_masks`` (bitmasks [0, H, W]) on each image without instances.

    detectron2 gives an image with no annotation, or only crowd regions, no mask field at all; the
    base models then fail on it (CondInst reads ``gt_bitmasks`` of every image) and IUQ cannot tell
    it from an image whose dataset has no masks. With the empty field it is an image with nothing
    in it everywhere: no queries, no pixel samples, a view like any other. With ``require``, an
    image that *has* instances but no masks is an error naming it (``check_dataset_masks`` names
    the dataset before training; this catches a dataset with masks on some annotations only).
    """
    out = []
    for d in batch:
        instances = d["instances"]
        if not instances.has("gt_masks"):
            if len(instances):
                if require:
                    raise ValueError(
                        f"MODEL.IUQ needs instance masks, but image {d.get('image_id', '?')} "
                        f"({d.get('file_name', 'no file name')}) has {len(instances)} instances "
                        "without masks: train on a dataset with segmentation annotations (DATASETS.TRAIN)"
                    )
            else:
                instances = Instances(instances.image_size, **instances.get_fields())
                instances.gt_masks = BitMasks(torch.zeros(0, *instances.image_size, dtype=torch.bool))
                d = {**d, "instances": instances}
        out.append(d)
    return out


def masks_on_grid(masks, grid_size, stride):
    """Instance masks [N, h, w] at input resolution -> [N, H, W] on a stride-``stride`` grid,
    read at each cell's centre pixel (the cell's location in ``grid_locations``)."""
    hh, ww = grid_size
    padded = F.pad(masks, (0, ww * stride - masks.shape[-1], 0, hh * stride - masks.shape[-2]))
    return padded[:, stride // 2 :: stride, stride // 2 :: stride]
