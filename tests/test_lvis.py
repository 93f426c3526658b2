"""SOLOv2's LVIS v1 recipe (``configs/IUQ/SOLOv2/R50_3x_lvis.yaml``, paper Table 2) end to end on
the real AdelaiDet SOLOv2, on the CPU, on an LVIS v1 sample made from the real COCO sample
(``iuq.data.lvis_sample``: 1203 categories, federated annotations, read by detectron2's LVIS
loader and LVIS's API; JSON written to a tmp dir, images read where they are). CondInst trains on
the same data.

Skipped (with the reason) where detectron2 / AdelaiDet, the LVIS API or ../shared/datasets are
missing."""
import json
import math
import os

import numpy as np
import pytest
import torch

from adelaidet_support import COCO, CONFIGS, SMALL, require_adelaidet, small_cfg

require_adelaidet()
pytest.importorskip("lvis", reason="the LVIS API (pip install lvis==0.5.3, in requirements/tested.txt) is not installed")

import train_net  # noqa: E402
from iuq.data import register_lvis_sample  # noqa: E402
from iuq.engine.trainer import IUQTrainer  # noqa: E402

RECIPE = CONFIGS["SOLOv2"].parent / "R50_3x_lvis.yaml"
TRAIN, VAL = "lvis_v1_sample_train", "lvis_v1_sample_val"
# The recipe's REPEAT_THRESHOLD 0.001 repeats categories in < 0.1% of LVIS's ~100K training images
# (fewer than ~100: rare and common). The sample's 96 training images need a threshold for their
# size: at 0.05 a category in 1 image (rare here) repeats its images sqrt(0.05 * 96) = 2.2 times,
# one in 5 images (frequent here) not at all.
SAMPLE_REPEAT_THRESHOLD = "0.05"


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    """The LVIS v1 sample's two JSON files, made from the COCO sample ($DETECTRON2_DATASETS/coco,
    the default source) in a tmp dir and registered under their names. Returns its root. The
    tmp dir is also $IUQ_LVIS_SAMPLE_ROOT meanwhile, so that train_net's registration of the names
    finds these files (nothing is written to ./datasets)."""
    root = tmp_path_factory.mktemp("lvis_v1_sample")
    env = pytest.MonkeyPatch()
    env.setenv("IUQ_LVIS_SAMPLE_ROOT", str(root))
    register_lvis_sample()
    yield root
    env.undo()


def load_json(sample, split):
    return json.loads((sample / f"lvis_v1_sample_{split}.json").read_text())


def test_the_sample_is_lvis_v1_as_lvis_and_detectron2_read_it(sample):
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from lvis import LVIS

    assert sorted(os.listdir(sample)) == ["lvis_v1_sample_train.json", "lvis_v1_sample_val.json"]  # no image copied
    source = json.loads((COCO / "annotations" / "instances_val2017.json").read_text())
    splits = {}
    for split, name in (("train", TRAIN), ("val", VAL)):
        data = load_json(sample, split)
        api = LVIS(str(sample / f"lvis_v1_sample_{split}.json"))
        cats = data["categories"]
        assert [c["id"] for c in cats] == list(range(1, 1204))
        assert all({"name", "synonyms", "synset", "def", "frequency", "image_count", "instance_count"} <= set(c)
                   for c in cats)
        for c in cats:  # the counts are this file's
            ann_ids = api.get_ann_ids(cat_ids=[c["id"]])
            assert c["instance_count"] == len(ann_ids)
            assert c["image_count"] == len({api.anns[i]["image_id"] for i in ann_ids})
        present = {}
        for a in data["annotations"]:
            present.setdefault(a["image_id"], set()).add(a["category_id"])
            assert {"id", "image_id", "category_id", "segmentation", "bbox", "area"} <= set(a)
            assert all(len(p) >= 6 and len(p) % 2 == 0 for p in a["segmentation"])
        for im in data["images"]:
            assert {"id", "height", "width", "coco_url", "neg_category_ids", "not_exhaustive_category_ids"} <= set(im)
            assert im["coco_url"].split("/")[-2] == "val2017"
            pos = present.get(im["id"], set())
            assert not set(im["neg_category_ids"]) & (pos | set(im["not_exhaustive_category_ids"]))
            assert 1 <= len(im["neg_category_ids"]) <= 8  # a sample of the absent mapped classes
        # detectron2's LVIS loader: files resolve to the COCO sample, ids are LVIS's, 1203 classes.
        dicts = DatasetCatalog.get(name)
        assert [d["image_id"] for d in dicts] == sorted(api.imgs)
        assert all(os.path.isfile(d["file_name"]) and d["file_name"].startswith(str(COCO / "val2017")) for d in dicts)
        assert all(0 <= a["category_id"] < 1203 for d in dicts for a in d["annotations"])
        assert len(MetadataCatalog.get(name).thing_classes) == 1203
        assert MetadataCatalog.get(name).evaluator_type == "lvis"
        splits[split] = data
    train, val = splits["train"], splits["val"]
    assert len(train["images"]) == 96 and len(val["images"]) == 32
    assert not {im["id"] for im in train["images"]} & {im["id"] for im in val["images"]}
    # Federated annotations: COCO's crowd regions became not-exhaustive categories (no crowd kept).
    crowd_images = {a["image_id"] for a in source["annotations"] if a["iscrowd"]}
    marked = {im["id"] for s in splits.values() for im in s["images"] if im["not_exhaustive_category_ids"]}
    assert marked == crowd_images and len(marked) >= 2
    assert any(im["not_exhaustive_category_ids"] for im in val["images"])
    # The same frequency in both files; every tier has categories with instances in both splits.
    assert [c["frequency"] for c in train["categories"]] == [c["frequency"] for c in val["categories"]]
    for tier in "rcf":
        for data in (train, val):
            assert any(c["frequency"] == tier and c["instance_count"] for c in data["categories"]), tier
    for c in train["categories"]:
        if c["image_count"]:
            assert c["frequency"] == ("r" if c["image_count"] <= 1 else "c" if c["image_count"] <= 4 else "f")


def test_writing_the_sample_again_is_a_no_op(sample):
    from iuq.data import generate_lvis_sample

    before = {p.name: p.stat().st_mtime_ns for p in sample.iterdir()}
    generate_lvis_sample()  # the same root (the env) and source: nothing to write
    assert {p.name: p.stat().st_mtime_ns for p in sample.iterdir()} == before


def ground_truth_predictions(d, extra=()):
    """Instances predicting every ground-truth mask of dataset dict ``d`` (score 0.5), plus
    ``extra`` (mask, contiguous class, score) triples."""
    from detectron2.structures import Instances
    from pycocotools import mask as mask_util

    h, w = d["height"], d["width"]
    masks = [mask_util.decode(mask_util.merge(mask_util.frPyObjects(a["segmentation"], h, w)))
             for a in d["annotations"]]
    classes = [a["category_id"] for a in d["annotations"]]
    scores = [0.5] * len(masks)
    for m, c, s in extra:
        masks.append(m), classes.append(c), scores.append(s)
    inst = Instances((h, w))
    inst.pred_masks = torch.as_tensor(np.stack(masks)).bool() if masks else torch.zeros(0, h, w, dtype=torch.bool)
    inst.pred_classes = torch.tensor(classes, dtype=torch.int64)
    inst.scores = torch.tensor(scores, dtype=torch.float32)
    return {"instances": inst}


def test_lvis_evaluator_reads_the_federated_annotations(sample, tmp_path):
    """detectron2's LVISEvaluator (as ``iuq.evaluation`` builds it for an "lvis" dataset) on the
    sample's val split: the ground truth scores 100 in every tier; a confident false positive
    counts against AP only where LVIS says it should (a verified-absent category), not for a
    category the image has no label for, nor for one whose instances are not all annotated."""
    from detectron2.data import DatasetCatalog
    from detectron2.evaluation import LVISEvaluator

    from iuq.evaluation import BoxesFromMasks, build_evaluator

    cfg = small_cfg("SOLOv2", "OUTPUT_DIR", str(tmp_path))
    dicts = DatasetCatalog.get(VAL)
    evaluator = build_evaluator(cfg, VAL)
    assert isinstance(evaluator, BoxesFromMasks) and isinstance(evaluator.evaluator, LVISEvaluator)

    def evaluate(false_positive=lambda d: None):
        evaluator.reset()
        for d in dicts:
            fp = false_positive(d)
            extra = [] if fp is None else [(np.ones((d["height"], d["width"]), np.uint8), fp, 0.9)]
            evaluator.process([d], [ground_truth_predictions(d, extra)])
        return evaluator.evaluate()["segm"]

    keys = ("AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf")
    exact = evaluate()
    assert set(exact) == set(keys) and all(exact[k] == pytest.approx(100) for k in keys)
    # A verified-absent (negative) category: an error.
    assert evaluate(lambda d: d["neg_category_ids"][0] - 1 if d["neg_category_ids"] else None)["AP"] < 95
    # A category the image has neither positive nor negative labels for: not evaluated there.
    unlabeled = lambda d: next(c for c in range(1203) if c + 1 not in d["neg_category_ids"]  # noqa: E731
                               and all(a["category_id"] != c for a in d["annotations"]))
    assert evaluate(unlabeled)["AP"] == pytest.approx(100)
    # A positive category whose instances are not all annotated: an unmatched detection is ignored;
    # the same detection in an image where that category is annotated exhaustively: an error.
    image, cat = next((d["image_id"], c) for d in dicts for c in d["not_exhaustive_category_ids"]
                      if any(a["category_id"] == c - 1 for a in d["annotations"]))
    other = next(d["image_id"] for d in dicts if d["image_id"] != image and cat not in d["not_exhaustive_category_ids"]
                 and any(a["category_id"] == cat - 1 for a in d["annotations"]))
    assert evaluate(lambda d: cat - 1 if d["image_id"] == image else None)["AP"] == pytest.approx(100)
    assert evaluate(lambda d: cat - 1 if d["image_id"] == other else None)["AP"] < 100


def training_dicts(cfg):
    """The sample's training dicts as the loader's sampler indexes them (images without
    annotations filtered out, as ``DATALOADER.FILTER_EMPTY_ANNOTATIONS`` says)."""
    from detectron2.data import get_detection_dataset_dicts

    return get_detection_dataset_dicts([TRAIN], filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS)


def find_sampler(loader):
    """The index sampler under detectron2's training loader (its wrappers' ``dataset``s)."""
    from detectron2.data.samplers import RepeatFactorTrainingSampler, TrainingSampler

    seen, todo = set(), [loader]
    while todo:
        obj = todo.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, (RepeatFactorTrainingSampler, TrainingSampler)):
            return obj
        todo += [getattr(obj, k) for k in ("sampler", "dataset") if hasattr(obj, k)]
    raise AssertionError(f"no sampler found under {loader!r}")


def recipe_trainer(out):
    """The LVIS recipe at small scale on the sample, set up as ``train_net.py`` sets it up: a
    trainer (random initialisation) for 2 steps."""
    args = train_net.default_argument_parser().parse_args(["--config-file", str(RECIPE)])
    args.opts = SMALL + [
        "OUTPUT_DIR", str(out), "DATASETS.TRAIN", f"('{TRAIN}',)", "DATASETS.TEST", "()",
        "DATALOADER.REPEAT_THRESHOLD", SAMPLE_REPEAT_THRESHOLD, "SOLVER.MAX_ITER", "2"]
    trainer = IUQTrainer(train_net.setup(args))
    trainer.resume_or_load(resume=False)
    return trainer


@pytest.fixture(scope="module")
def recipe(sample, tmp_path_factory):
    """The recipe's trainer after its 2 steps, and its output folder."""
    out = tmp_path_factory.mktemp("lvis_recipe")
    trainer = recipe_trainer(out)
    trainer.train()
    return trainer, out


@pytest.fixture(scope="module")
def untrained(sample, tmp_path_factory):
    """The recipe's trainer before any step. Two steps from random initialisation leave SOLOv2's
    masks dead (``loss_ins`` = its dice weight 3 x 1; docs/study.md, "SOLOv2's dead masks"), and
    dead masks give ``loss_inter`` ~0 against any image: tests that need live masks use this one."""
    return recipe_trainer(tmp_path_factory.mktemp("lvis_untrained"))


def test_lvis_recipe_trains_with_iuq(recipe, sample):
    from detectron2.data.samplers import RepeatFactorTrainingSampler

    from detectron2.data import MetadataCatalog

    trainer, out = recipe
    cfg = trainer.cfg
    assert MetadataCatalog.get(TRAIN).json_file == str(sample / "lvis_v1_sample_train.json")
    assert cfg.MODEL.SOLOV2.NUM_CLASSES == 1203 and cfg.MODEL.IUQ.ENABLED
    assert trainer.model.ins_head.cate_pred.out_channels == 1203
    # Repeat-factor sampling on: the sampler repeats the images of the sample's rare categories.
    sampler = find_sampler(trainer.data_loader)
    assert isinstance(sampler, RepeatFactorTrainingSampler)
    factors = sampler._int_part + sampler._frac_part
    dicts = training_dicts(cfg)
    assert len(factors) == len(dicts) == 94 and factors.min() == 1  # the sample's 2 empty images filtered
    # The largest factor: an image with a category found in no other training image.
    assert factors.max() == pytest.approx(math.sqrt(float(SAMPLE_REPEAT_THRESHOLD) * len(dicts)), rel=1e-5)
    images_of = {c["id"] - 1: c["image_count"] for c in load_json(sample, "train")["categories"]}
    assert min(images_of[a["category_id"]] for a in dicts[int(factors.argmax())]["annotations"]) == 1
    # Two steps, IUQ's losses finite in the logged metrics next to SOLOv2's own.
    metrics = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    assert metrics[-1]["iteration"] == 1
    for key in ("loss_inter", "loss_equi", "loss_ins", "loss_cate"):
        assert all(math.isfinite(m[key]) for m in metrics if key in m) and any(key in m for m in metrics), key
    assert (out / "model_final.pth").is_file()


def test_lvis_image_ids_reach_the_memory(recipe, sample):
    trainer, _ = recipe
    train_ids = {im["id"] for im in load_json(sample, "train")["images"]}
    stored = set(trainer.memory.samples().image_ids.tolist())
    assert len(trainer.memory) > 0 and stored <= train_ids
    assert 1 <= len(stored) <= 4  # two steps of two images


def mapped(trainer, d):
    """``d`` as the training loader maps it (random flip, resize)."""
    from detectron2.data import DatasetMapper

    cfg = trainer.cfg
    return DatasetMapper(**{**DatasetMapper.from_config(cfg, is_train=True), "use_instance_mask": True})(d)


def test_an_image_seen_again_is_never_its_own_negative(untrained, sample):
    """Repeat-factor sampling shows a rare image several times per epoch: twice in one batch, or
    again while its samples are in the memory. Its queries must then have no negative from it:
    with nothing else to contrast with, loss_inter is exactly 0; the same pixels under another
    image's id are negatives."""
    from iuq.inter.memory import PixelMemory
    from iuq.inter.samples import PixelSamples

    trainer = untrained
    dicts = training_dicts(trainer.cfg)
    sampler = find_sampler(trainer.data_loader)
    rarest = int((sampler._int_part + sampler._frac_part).argmax())
    assert sampler._int_part[rarest] >= 2  # drawn at least twice in every epoch
    epoch = sampler._get_epoch_indices(torch.Generator().manual_seed(0))
    assert int((epoch == rarest).sum()) >= 2
    d = dicts[rarest]
    frequency = {c["id"] - 1: c["frequency"] for c in load_json(sample, "train")["categories"]}
    assert "r" in {frequency[a["category_id"]] for a in d["annotations"]}  # an image of a rare category
    image_id = d["image_id"]
    other = next(x for x in dicts if x["annotations"] and x["image_id"] != image_id)

    trainer.memory = PixelMemory(trainer.memory.capacity)
    # The same image twice in a batch (and each copy's view): no negative at all.
    losses, samples = trainer.forward_losses([mapped(trainer, d), mapped(trainer, d)])
    assert losses["loss_ins"] > 0  # it has matched queries
    assert set(samples.image_ids.tolist()) == {image_id} and len(samples) > 0
    assert losses["loss_inter"].item() == 0 and losses["loss_inter"].requires_grad
    # Seen again while the memory holds only its own samples: still none.
    trainer.memory.enqueue(samples.detach())
    assert trainer.forward_losses([mapped(trainer, d)])[0]["loss_inter"].item() == 0
    # The same pixels under another image's id are negatives: the zero came from the id alone.
    trainer.memory = PixelMemory(trainer.memory.capacity)
    trainer.memory.enqueue(PixelSamples(samples.embeddings.detach(), samples.locations,
                                        samples.image_ids + 10**9))
    assert trainer.forward_losses([mapped(trainer, d)])[0]["loss_inter"].item() > 0
    # And with another image in the batch, the copies' queries have negatives again.
    trainer.memory = PixelMemory(trainer.memory.capacity)
    assert trainer.forward_losses([mapped(trainer, d), mapped(trainer, other)])[0]["loss_inter"].item() > 0


def test_eval_only_reports_lvis_segm_ap_with_frequency_tiers(untrained, tmp_path):
    """``--eval-only`` on the sample's val split through train_net.main: SOLOv2's predictions go
    through LVISEvaluator, which reports segm AP with APr / APc / APf.

    A model trained here for a few steps predicts nothing (its class scores stay near the 0.01
    prior, below SOLOv2's 0.1 threshold, and its masks are dead: see ``untrained``), and LVIS's
    AP of no prediction is NaN. The recipe's model at initialisation is evaluated instead, with one
    class made confident everywhere (its category-branch bias), so that SOLOv2's masks, matrix NMS
    and LVIS's evaluation all run on real predictions."""
    from detectron2.data import MetadataCatalog

    model = {k: v.detach().clone() for k, v in untrained.model.state_dict().items()}
    person = MetadataCatalog.get(VAL).thing_classes.index("person")  # LVIS v1 id 793
    model["ins_head.cate_pred.weight"].zero_()
    model["ins_head.cate_pred.bias"].fill_(-20.0)
    model["ins_head.cate_pred.bias"][person] = 0.0  # score 0.5 at every grid cell
    weights = tmp_path / "confident_person.pth"
    torch.save({"model": model}, weights)
    args = train_net.default_argument_parser().parse_args(["--config-file", str(RECIPE), "--eval-only"])
    args.opts = SMALL + ["MODEL.WEIGHTS", str(weights), "OUTPUT_DIR", str(tmp_path / "eval"),
                         "DATASETS.TEST", f"('{VAL}',)"]
    results = train_net.main(args)
    segm = results["segm"]
    assert set(segm) == {"AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf"}
    assert all(0 <= segm[k] <= 100 for k in segm), segm  # numbers, not NaN: predictions were evaluated
    print("LVIS sample val, segm:", {k: round(v, 3) for k, v in segm.items()})
    predictions = json.loads((tmp_path / "eval" / "inference" / "lvis_instances_results.json").read_text())
    assert predictions and {p["category_id"] for p in predictions} == {person + 1}


def test_condinst_trains_on_the_lvis_sample(sample, tmp_path):
    """No recipe: CondInst's R50 config with 1203 classes and repeat-factor sampling on the sample."""
    from detectron2.data import DatasetCatalog
    from detectron2.data.samplers import RepeatFactorTrainingSampler

    cfg = small_cfg("CondInst", "OUTPUT_DIR", str(tmp_path), "MODEL.FCOS.NUM_CLASSES", "1203",
                    "DATASETS.TRAIN", f"('{TRAIN}',)", "DATASETS.TEST", "()",
                    "DATALOADER.SAMPLER_TRAIN", "RepeatFactorTrainingSampler",
                    "DATALOADER.REPEAT_THRESHOLD", SAMPLE_REPEAT_THRESHOLD, "SOLVER.MAX_ITER", "2")
    trainer = IUQTrainer(cfg)
    assert isinstance(find_sampler(trainer.data_loader), RepeatFactorTrainingSampler)
    trainer.train()
    metrics = [json.loads(line) for line in (tmp_path / "metrics.json").read_text().splitlines()]
    for key in ("loss_inter", "loss_equi", "loss_mask", "loss_fcos_cls"):
        assert any(key in m for m in metrics) and all(math.isfinite(m[key]) for m in metrics if key in m), key
    train_ids = {d["image_id"] for d in DatasetCatalog.get(TRAIN)}
    assert set(trainer.memory.samples().image_ids.tolist()) <= train_ids and len(trainer.memory) > 0


@pytest.mark.parametrize("name,key", [("SOLOv2", "MODEL.SOLOV2.NUM_CLASSES"), ("CondInst", "MODEL.FCOS.NUM_CLASSES")])
def test_a_class_count_short_of_lvis_fails_before_training(name, key, sample, tmp_path):
    """A config left at COCO's 80 classes on LVIS's 1203 (the IUQ authors' own LVIS YAML did)
    stops at start-up naming the key and the count, not at the first step's index error."""
    with pytest.raises(ValueError, match=rf"{key} is 80, but DATASETS.TRAIN \('{TRAIN}',\) uses class ids up "
                                         rf"to \d+ \('{TRAIN}': 1203 classes\): set {key} 1203"):
        IUQTrainer(small_cfg(name, "OUTPUT_DIR", str(tmp_path), "DATASETS.TRAIN", f"('{TRAIN}',)",
                             "DATASETS.TEST", "()"))
