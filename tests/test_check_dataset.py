"""Your own COCO-format dataset, tried as a new user would (issue 29): datasets built in a temporary
folder from the real COCO sample, with a truncated JPEG, a width that is not the image's, a 2-point
polygon, an unknown category id and a duplicate image id. ``tools/check_dataset.py`` names each
(kind, count, file, ids) and exits 1; a clean dataset exits 0; the training mapper (whichever base
model's) names the bad file and image id; launcher flags among the overrides are named; and after
the fix, ``train_net.py --dataset`` trains and ``--eval-only`` evaluates."""
import json
import logging
import re
import shutil
import subprocess
import sys

import pytest

from adelaidet_support import COCO, REPO, adet_provides, small_cfg

pytest.importorskip("detectron2", reason="detectron2 is not installed (not on PyPI; see README)")
if not (COCO / "annotations" / "instances_val2017.json").is_file():
    pytest.skip(f"the real COCO sample is not at {COCO} (set DETECTRON2_DATASETS)", allow_module_level=True)
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))

import check_dataset  # noqa: E402  (tools/check_dataset.py)
from detectron2.data import DatasetCatalog  # noqa: E402
from iuq.data.check import check_dataset as check_one  # noqa: E402
from iuq.data.check import read_image_size  # noqa: E402
from iuq.data.custom import DatasetSpecError, parse_dataset_spec, register_datasets  # noqa: E402
from iuq.data.mapper import BadRecordError, NamedRecordErrors  # noqa: E402

NEEDS_ADELAIDET = pytest.mark.skipif(not adet_provides("condinst"),
                                     reason="AdelaiDet (package adet) is not installed (not on PyPI; see README)")
CONDINST = str(REPO / "configs/IUQ/CondInst/MS_R_50_1x.yaml")
QUICKSTART = str(REPO / "configs/quickstart.yaml")
# The COCO sample's val json: images 0-5 have instances, image 42 has none (id 250).
FIRST, EMPTY = 6, 42


def build_dataset(root, bad=False, with_empty=False):
    """A COCO-format dataset in ``root`` (``annotations.json``, ``images/``) of the COCO sample's
    first 6 images (+ one without instances). ``bad``: image 0's JPEG truncated (its first half
    written), image 1's width +10 in the JSON, a polygon of image 2 cut to 2 points, an annotation
    with category id 999 on image 3, and a seventh image (a copy of image 5's file) under image 4's
    id. Returns (json path, image root, {what: (file name, image id, annotation id)})."""
    data = json.loads((COCO / "annotations" / "instances_val2017.json").read_text())
    images = [dict(im) for im in data["images"][:FIRST]] + ([dict(data["images"][EMPTY])] if with_empty else [])
    ids = {im["id"] for im in images}
    anns = [dict(a) for a in data["annotations"] if a["image_id"] in ids]
    (root / "images").mkdir(parents=True)
    for im in images:
        shutil.copy(COCO / "val2017" / im["file_name"], root / "images" / im["file_name"])
    bad_records = {}
    if bad:
        f = root / "images" / images[0]["file_name"]
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
        bad_records["truncated"] = (images[0]["file_name"], images[0]["id"], None)
        images[1]["width"] += 10
        bad_records["size"] = (images[1]["file_name"], images[1]["id"], None)
        poly = next(a for a in anns if a["image_id"] == images[2]["id"] and not a["iscrowd"])
        poly["segmentation"] = [poly["segmentation"][0][:4]]
        bad_records["polygon"] = (images[2]["file_name"], images[2]["id"], poly["id"])
        unknown = dict(next(a for a in anns if a["image_id"] == images[3]["id"]), id=999000001, category_id=999)
        anns.append(unknown)
        bad_records["category"] = (images[3]["file_name"], images[3]["id"], unknown["id"])
        twin = dict(images[5], id=images[4]["id"], file_name="twin_" + images[5]["file_name"])
        shutil.copy(COCO / "val2017" / images[5]["file_name"], root / "images" / twin["file_name"])
        images.append(twin)
        bad_records["duplicate"] = (twin["file_name"], twin["id"], None)
    path = root / "annotations.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": data["categories"]}))
    return path, root / "images", bad_records


def run_check(capsys, *argv):
    """tools/check_dataset.py's main on ``argv``: (exit status, stdout)."""
    code = check_dataset.main(list(argv))
    return code, capsys.readouterr().out


def check_argv(name, json_file, image_root, *more):
    return ["--config-file", CONDINST, "--dataset", f"{name}={json_file}:{image_root}", *more,
            "DATASETS.TRAIN", f"('{name}',)", "DATASETS.TEST", "()"]


@pytest.fixture(scope="module")
def bad_dataset(tmp_path_factory):
    return build_dataset(tmp_path_factory.mktemp("bad"), bad=True)


@pytest.fixture(scope="module")
def good_dataset(tmp_path_factory):
    return build_dataset(tmp_path_factory.mktemp("good"), with_empty=True)


def report_line(out, severity, kind, file_name, image_id, annotation_id=None):
    """The report's line for one record: ``<severity> <kind>: <path>/<file> image <id> [annotation <id>]``."""
    ann = "" if annotation_id is None else f" annotation {annotation_id}"
    pattern = rf"^  {severity} {re.escape(kind)}: \S*{re.escape(file_name)} image {image_id}{ann}(:|$)"
    lines = [line for line in out.splitlines() if re.match(pattern, line)]
    assert lines, f"no line {pattern!r} in the report:\n{out}"
    return lines[0]


def count_of(out, kind):
    """The count the report's table gives ``kind``."""
    match = re.search(rf"^\S+\s+{re.escape(kind)}\s+(\d+)\s", out, re.M)
    assert match, f"{kind!r} is not in the report's table:\n{out}"
    return int(match.group(1))


@NEEDS_ADELAIDET
def test_the_check_names_every_bad_record_and_exits_1(capsys, bad_dataset):
    json_file, image_root, bad = bad_dataset
    code, out = run_check(capsys, *check_argv("iuq_test_check_bad", json_file, image_root, "--workers", "1"))
    assert code == 1
    name, image_id, _ = bad["truncated"]
    assert count_of(out, "unreadable image") == 1
    assert "image file is truncated" in report_line(out, "error", "unreadable image", name, image_id)
    name, image_id, _ = bad["size"]
    assert count_of(out, "size mismatch") == 1
    line = report_line(out, "error", "size mismatch", name, image_id)
    assert re.search(r"decoded (\d+)x\d+ \(w x h\), the JSON says (\d+)x", line)
    name, image_id, ann = bad["polygon"]
    assert count_of(out, "degenerate polygon") == 1
    assert "2 points" in report_line(out, "error", "degenerate polygon", name, image_id, ann)
    name, image_id, ann = bad["category"]
    assert count_of(out, "unknown category id") == 1
    assert "category_id 999" in report_line(out, "error", "unknown category id", name, image_id, ann)
    name, image_id, _ = bad["duplicate"]
    assert count_of(out, "duplicate image id") == 2  # both images of the id are named
    report_line(out, "error", "duplicate image id", name, image_id)
    # (The duplicate also gets image 4's annotations, as pycocotools indexes them by id: warnings.)
    assert re.match(r"check: 6 errors, \d+ warnings in 1 dataset: fix or drop", out.rstrip().splitlines()[-1])


@NEEDS_ADELAIDET
def test_a_clean_dataset_exits_0_with_what_iuq_will_see(capsys, good_dataset):
    json_file, image_root, _ = good_dataset
    code, out = run_check(capsys, *check_argv("iuq_test_check_good", json_file, image_root))
    assert code == 0, out
    assert count_of(out, "image without instances") == 1  # information, not an error
    report_line(out, "info", "image without instances", "000000000250.jpg", 250)
    assert re.search(r"^instances per image\s+mean [\d.]+, median [\d.]+, max \d+$", out, re.M)
    assert re.search(r"^instance size, cells \(short side 640 \(max 1333\), stride 8\)\s+median", out, re.M)
    assert re.search(r"^instances smaller than one cell\s+\d+ of \d+ \(", out, re.M)
    assert re.search(r"^memory \(MEMORY.SIZE 100000, instance sampling\)\s+~\d+ samples per image: holds the last "
                     r"~\d+ images, the whole dataset", out, re.M)
    assert out.rstrip().splitlines()[-1] == "check: 0 errors, 0 warnings in 1 dataset"


@NEEDS_ADELAIDET
def test_two_workers_find_what_one_finds(bad_dataset):
    import train_net

    json_file, image_root, _ = bad_dataset
    args = check_dataset.argument_parser().parse_args(check_argv("iuq_test_check_bad", json_file, image_root))
    cfg = train_net.load_config(args)
    lines = [sorted(p.line() for p in check_one("iuq_test_check_bad", cfg, workers=w, progress=False).problems)
             for w in (1, 2)]
    assert lines[0] == lines[1] and sum(line.startswith("error ") for line in lines[0]) == 6


def test_truncation_is_found_at_draft_and_full_decode(tmp_path):
    good = COCO / "val2017" / "000000000139.jpg"
    if not good.is_file():
        good = next((COCO / "val2017").glob("*.jpg"))
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(good.read_bytes()[:-6])  # only the last 6 bytes missing
    from PIL import Image

    assert read_image_size(good) == read_image_size(good, full_decode=True) == Image.open(good).size
    for full in (False, True):
        with pytest.raises(OSError, match="truncated"):
            read_image_size(cut, full_decode=full)


def test_a_catalog_dataset_is_checked_from_its_dicts(tmp_path):
    """A dataset registered as a function (no JSON in its metadata): its dicts are checked, the
    category ids against ``thing_classes``."""
    from detectron2.config import get_cfg
    from detectron2.data import MetadataCatalog

    from iuq.config import add_iuq_config

    json_file, image_root, bad = build_dataset(tmp_path / "d", bad=True)
    from detectron2.data.datasets import load_coco_json

    dicts = load_coco_json(str(json_file), str(image_root))
    for d in dicts:  # load_coco_json without a name keeps COCO's ids (1..90): make them contiguous, one out
        for a in d["annotations"]:
            a["category_id"] = 0 if a["category_id"] != 999 else 80
    name = "iuq_test_check_dicts"
    if name not in DatasetCatalog:
        DatasetCatalog.register(name, lambda: dicts)
        MetadataCatalog.get(name).thing_classes = [f"c{i}" for i in range(80)]
    cfg = get_cfg()
    add_iuq_config(cfg)
    report = check_one(name, cfg, progress=False)
    kinds = {p.kind for p in report.problems}
    assert {"unreadable image", "size mismatch", "unknown category id"} <= kinds
    # load_coco_json dropped the 2-point polygon and merged the two images of one id (pycocotools
    # indexes images by id): only the JSON shows those, which is why a JSON dataset is read from it.
    assert not {"degenerate polygon", "duplicate image id"} & kinds


def test_the_other_kinds_of_bad_record(tmp_path):
    """RLEs, masks and ids the issue's dataset does not hold: each named with its annotation id."""
    from detectron2.config import get_cfg

    from iuq.config import add_iuq_config

    data = json.loads((COCO / "annotations" / "instances_val2017.json").read_text())
    image = data["images"][0]
    (tmp_path / "images").mkdir()
    shutil.copy(COCO / "val2017" / image["file_name"], tmp_path / "images" / image["file_name"])
    h, w = image["height"], image["width"]
    box = [10, 10, 60, 10, 60, 60, 10, 60]
    anns = [
        {"id": 1, "segmentation": {"size": [h + 1, w], "counts": [0, 5]}},  # bad RLE: another size
        {"id": 2, "segmentation": []},  # instance without mask
        {"id": 3, "segmentation": [[w + 50, 0, w + 90, 0, w + 90, 40]]},  # wholly outside: empty mask
        {"id": 4, "segmentation": [[10, 10, 20, 20, 30, 30]]},  # collinear: empty mask
        {"id": 5, "segmentation": [box[:2] + [w + 20, 10] + box[4:]]},  # partly outside: a warning
        {"id": 5, "segmentation": [box]},  # the same annotation id again
        {"id": 6, "segmentation": [box], "image_id": 123456789},  # an image the JSON does not list
        {"id": 7, "segmentation": {"size": [h, w], "counts": [h * w]}},  # an RLE of 0 pixels
    ]
    for a in anns:
        a.setdefault("image_id", image["id"])
        a.update(category_id=1, iscrowd=0, area=1.0, bbox=[10, 10, 50, 50])
    json_file = tmp_path / "a.json"
    json_file.write_text(json.dumps({"images": [image], "annotations": anns, "categories": data["categories"]}))
    register_datasets([f"iuq_test_other_kinds={json_file}:{tmp_path / 'images'}"])
    cfg = get_cfg()
    add_iuq_config(cfg)
    found = {(p.kind, p.annotation_id) for p in check_one("iuq_test_other_kinds", cfg, progress=False).problems}
    assert found == {("bad RLE", 1), ("instance without mask", 2), ("empty mask", 3), ("empty mask", 4),
                     ("polygon outside image", 5), ("duplicate annotation id", 5), ("annotation of no image", 6),
                     ("empty mask", 7)}


def test_dataset_flag_values_and_their_errors(tmp_path, good_dataset):
    json_file, image_root, _ = good_dataset
    assert parse_dataset_spec("a=x/y.json:/im:ages") == ("a", "x/y.json", "/im:ages")
    assert parse_dataset_spec("a=ann:imgs") == ("a", "ann", "imgs")
    with pytest.raises(DatasetSpecError, match=r"--dataset 'mine': expected --dataset NAME=JSON:IMAGE_ROOT"):
        parse_dataset_spec("mine")
    with pytest.raises(DatasetSpecError, match=r"--dataset .*the JSON '.*nope.json' does not exist"):
        register_datasets([f"x=nope.json:{image_root}"])
    with pytest.raises(DatasetSpecError, match=r"the image folder '.*nope' does not exist"):
        register_datasets([f"x={json_file}:{tmp_path / 'nope'}"])
    with pytest.raises(DatasetSpecError, match=r"'coco_2017_train' is already registered .*choose another name"):
        register_datasets([f"coco_2017_train={json_file}:{image_root}"])
    with pytest.raises(DatasetSpecError, match=r"'iuq_quickstart_train_8' is already registered"):
        register_datasets([f"iuq_quickstart_train_8={json_file}:{image_root}"])  # the project's, not yet registered
    # The same name from --dataset again (another train_net.main in this process) re-points it.
    assert register_datasets([f"iuq_test_flag={json_file}:{image_root}"] * 2) == ["iuq_test_flag"] * 2
    assert len(DatasetCatalog.get("iuq_test_flag")) == FIRST + 1


@pytest.mark.parametrize("argv, moved, overrides", [
    (["--config-file", "c.yaml", "MODEL.WEIGHTS", "w.pth", "--resume"], ["--resume"], ["MODEL.WEIGHTS", "w.pth"]),
    (["--config-file", "c.yaml", "SOLVER.MAX_ITER", "2", "--eval-only", "--num-gpus", "8"], ["--eval-only", "--num-gpus"],
     ["SOLVER.MAX_ITER", "2"]),
    (["--config-file", "c.yaml", "SEED=1", "--dataset=a=b.json:c", "--dist-url", "tcp://h:1"], ["--dataset", "--dist-url"],
     ["SEED=1"]),
    (["--config-file", "c.yaml", "SEED", "1", "--eval"], ["--eval"], ["SEED", "1"]),  # argparse's abbreviation
])
def test_launcher_flags_among_the_overrides_are_named_in_one_line(argv, moved, overrides):
    import train_net

    with pytest.raises(SystemExit) as e:
        train_net.parse_args(train_net.argument_parser(), argv)
    message = str(e.value.code)
    assert "\n" not in message
    assert message.startswith(f"train_net.py: {' and '.join(moved)} must come before the overrides")
    fixed = message.split(": python train_net.py ", 1)[1].split()
    args = train_net.argument_parser().parse_args(fixed)  # the command it gives is right
    assert args.config_file == "c.yaml" and args.opts == overrides


def test_flags_before_the_overrides_parse_as_detectron2_would():
    import train_net

    argv = ["--config-file", "c.yaml", "--resume", "--num-gpus", "2", "--dataset", "a=b.json:c", "SEED", "1"]
    args = train_net.parse_args(train_net.argument_parser(), argv)
    assert (args.resume, args.num_gpus, args.dataset, args.opts) == (True, 2, ["a=b.json:c"], ["SEED", "1"])


def test_the_check_tool_names_its_flags_among_the_overrides_too(capsys):
    with pytest.raises(SystemExit) as e:
        check_dataset.main(["--config-file", CONDINST, "SEED", "1", "--workers", "2"])
    assert str(e.value.code).startswith("tools/check_dataset.py: --workers must come before the overrides")


def test_the_wrapped_mapper_names_the_file_and_image_id(bad_dataset, caplog):
    from detectron2.config import get_cfg
    from detectron2.data import DatasetMapper
    from detectron2.data.datasets import load_coco_json

    json_file, image_root, bad = bad_dataset
    dicts = load_coco_json(str(json_file), str(image_root))  # no name: category 999 is kept, not refused
    cfg = get_cfg()
    cfg.MODEL.MASK_ON = True
    by_file = {d["file_name"].rsplit("/", 1)[-1]: d for d in dicts}
    mapper = NamedRecordErrors(DatasetMapper(cfg, is_train=True))
    for what, cause in (("truncated", OSError), ("size", Exception)):
        name, image_id, _ = bad[what]
        with pytest.raises(BadRecordError) as e:
            mapper(by_file[name])
        message = str(e.value)
        assert f"{name} (image {image_id}) could not be read or mapped" in message
        assert "python tools/check_dataset.py" in message and "DATALOADER.FILTER_EMPTY_ANNOTATIONS" in message
        assert "DATALOADER.SKIP_BAD_IMAGES True" in message
        assert isinstance(e.value.__cause__, cause)  # the original exception, chained
    assert "image file is truncated" in str(pytest.raises(BadRecordError, mapper, by_file[bad["truncated"][0]]).value)
    skipping = NamedRecordErrors(mapper.mapper, skip=True)
    with caplog.at_level(logging.WARNING, logger="iuq.data.mapper"):
        assert skipping(by_file[bad["truncated"][0]]) is None  # detectron2's MapDataset takes another image
    assert f"Skipped training image {image_root}/{bad['truncated'][0]} (image {bad['truncated'][1]})" in caplog.text
    good = next(d for n, d in by_file.items() if n not in {b[0] for b in bad.values()})
    assert "instances" in mapper(good)  # a good record passes through unchanged


@pytest.mark.parametrize("model", ["CondInst", "Mask2Former", "SparseInst"])
def test_every_base_models_train_loader_names_the_bad_image(model, tmp_path):
    """The trainer's loader, with each base model's own mapper (detectron2's DatasetMapper for
    CondInst; Mask2Former's and SparseInst's, chosen by their adapters), on a dataset whose only
    image is truncated."""
    package = {"CondInst": "adet", "Mask2Former": "mask2former", "SparseInst": "sparseinst"}[model]
    pytest.importorskip(package, reason=f"{model}'s framework ({package}) is not installed (README: Install)")
    if model == "CondInst" and not adet_provides("condinst"):
        pytest.skip("the `adet` installed here is not AdelaiDet")
    from iuq.engine.trainer import IUQTrainer

    json_file, image_root, bad = build_dataset(tmp_path / "d", bad=True)
    data = json.loads(json_file.read_text())
    name, image_id, _ = bad["truncated"]
    data["images"] = [im for im in data["images"] if im["file_name"] == name]
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] == image_id]
    json_file.write_text(json.dumps(data))
    dataset = f"iuq_test_loader_{model}"
    register_datasets([f"{dataset}={json_file}:{image_root}"])
    cfg = small_cfg(model, "DATASETS.TRAIN", f"('{dataset}',)", "SOLVER.IMS_PER_BATCH", "1")
    loader = IUQTrainer.build_train_loader(cfg)
    with pytest.raises(BadRecordError, match=rf"{re.escape(name)} \(image {image_id}\) could not be read"):
        next(iter(loader))


@NEEDS_ADELAIDET
def test_check_data_stops_train_net_before_training(bad_dataset, tmp_path):
    json_file, image_root, bad = bad_dataset
    result = subprocess.run(
        [sys.executable, "train_net.py", "--check-data", "--dataset", f"mine={json_file}:{image_root}",
         "--config-file", QUICKSTART, "DATASETS.TRAIN", "('mine',)", "DATASETS.TEST", "()",
         "MODEL.FCOS.NUM_CLASSES", "80", "OUTPUT_DIR", str(tmp_path / "out")],
        cwd=REPO, capture_output=True, text=True, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 1
    assert "not training" in result.stderr
    report_line(result.stdout, "error", "unreadable image", *bad["truncated"][:2])
    assert not (tmp_path / "out" / "config.yaml").exists()  # stopped before setup


@NEEDS_ADELAIDET
def test_training_fails_at_the_bad_image_then_trains_and_evaluates_once_fixed(tmp_path):
    """As the issue's user: train_net.py --dataset on data whose JPEG is truncated fails naming the
    file and image id; with the file fixed, 2 iterations train and --eval-only evaluates."""
    import train_net

    json_file, image_root, _ = build_dataset(tmp_path / "mine")
    image = json.loads(json_file.read_text())["images"][0]
    original = (image_root / image["file_name"]).read_bytes()
    (image_root / image["file_name"]).write_bytes(original[: len(original) // 2])
    small = ["MODEL.WEIGHTS", "", "SOLVER.MAX_ITER", "2", "SOLVER.IMS_PER_BATCH", "2", "INPUT.MIN_SIZE_TRAIN", "(128,)",
             "INPUT.MAX_SIZE_TRAIN", "200", "INPUT.MIN_SIZE_TEST", "128", "INPUT.MAX_SIZE_TEST", "200",
             "MODEL.IUQ.MEMORY.SIZE", "1000", "MODEL.DEVICE", "cpu", "DATALOADER.NUM_WORKERS", "0",
             "MODEL.FCOS.NUM_CLASSES", "80"]

    def args(*more, eval_only=False):
        argv = ["--dataset", f"mine={json_file}:{image_root}", "--config-file", QUICKSTART] + ["--eval-only"] * eval_only
        return train_net.parse_args(train_net.argument_parser(), argv + small + ["OUTPUT_DIR", str(tmp_path / "out"),
                                                                                 *more])

    # 3 steps of 2 images map at least 6 images: the whole first epoch, the bad image with it.
    with pytest.raises(BadRecordError, match=rf"{image['file_name']} \(image {image['id']}\) could not be read or "
                                             r"mapped: OSError: image file is truncated"):
        train_net.main(args("DATASETS.TRAIN", "('mine',)", "DATASETS.TEST", "()", "SOLVER.MAX_ITER", "3"))
    (image_root / image["file_name"]).write_bytes(original)  # fixed
    train_net.main(args("DATASETS.TRAIN", "('mine',)", "DATASETS.TEST", "()"))
    assert (tmp_path / "out" / "model_final.pth").is_file()
    results = train_net.main(args("DATASETS.TEST", "('mine',)", "MODEL.WEIGHTS", str(tmp_path / "out" / "model_final.pth"),
                                  "MODEL.FCOS.INFERENCE_TH_TEST", "0.0", eval_only=True))
    assert 0.0 <= results["segm"]["AP"] <= 100.0
