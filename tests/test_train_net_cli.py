"""train_net.py as a user runs it, on the real AdelaiDet models and real COCO images (CPU):
train, --resume with the memory, stock-loadable weights, --eval-only segm AP, a test-dev
submission zip, a two-process Gloo run, and clear errors for bad input."""
import json
import socket
import sys
import zipfile

import pytest
import torch

from adelaidet_support import CONFIGS, COCO, REPO, SMALL, register_subset, require_adelaidet

require_adelaidet()
sys.path.insert(0, str(REPO))

import train_net  # noqa: E402
from detectron2.engine import launch  # noqa: E402
from iuq.engine.trainer import IUQTrainer  # noqa: E402

# Score thresholds at 0: a randomly initialised model then still emits masks to evaluate.
LOW_THRESHOLDS = {
    "CondInst": ["MODEL.FCOS.INFERENCE_TH_TEST", "0.0"],
    "SOLOv2": ["MODEL.SOLOV2.SCORE_THR", "0.0", "MODEL.SOLOV2.UPDATE_THR", "0.0", "MODEL.SOLOV2.MASK_THR", "0.0"],
}


def args_for(model, out, *opts, eval_only=False, resume=False):
    argv = ["--config-file", str(CONFIGS[model])]
    argv += ["--eval-only"] * eval_only + ["--resume"] * resume
    return train_net.default_argument_parser().parse_args(argv + SMALL + ["OUTPUT_DIR", str(out)] + list(opts))


@pytest.fixture(scope="module", params=["CondInst", "SOLOv2"])
def run(request, tmp_path_factory):
    """Two training iterations through train_net.main, checkpointing after each."""
    model, out = request.param, tmp_path_factory.mktemp(f"cli_{request.param}")
    # Mixed override styles: KEY VALUE pairs and KEY=VALUE.
    train_net.main(args_for(model, out, "SOLVER.MAX_ITER=2", "SOLVER.CHECKPOINT_PERIOD", "1", "DATASETS.TEST", "()"))
    return model, out


def test_config_written_to_output_shows_the_overrides(run):
    _, out = run
    text = (out / "config.yaml").read_text()
    assert "MAX_ITER: 2" in text and "CHECKPOINT_PERIOD: 1" in text


def test_final_weights_load_into_the_stock_model_exactly(run):
    model_name, out = run
    from detectron2.modeling import build_model

    cfg = train_net.setup(args_for(model_name, out))
    stock = build_model(cfg)  # the plain AdelaiDet model: no IUQ adapter installed
    ckpt = torch.load(out / "model_final.pth", map_location="cpu", weights_only=False)
    result = stock.load_state_dict(ckpt["model"], strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert "iuq_memory" in ckpt and len(ckpt["iuq_memory"]["embeddings"]) > 0


def test_resume_continues_with_the_saved_memory(run):
    model_name, out = run
    saved = torch.load(out / "model_final.pth", map_location="cpu", weights_only=False)["iuq_memory"]
    cfg = train_net.setup(args_for(model_name, out, "SOLVER.MAX_ITER", "3", "DATASETS.TEST", "()", resume=True))
    trainer = IUQTrainer(cfg)
    trainer.resume_or_load(resume=True)
    assert trainer.start_iter == 2
    restored = trainer.memory.state_dict()
    for key in ("embeddings", "locations", "image_ids"):
        assert torch.equal(restored[key], saved[key]), key
    assert restored["ptr"] == saved["ptr"]
    before = len(trainer.memory)
    trainer.train()  # one more iteration, from the restored memory
    assert trainer.iter == 3 and len(trainer.memory) > before


def test_eval_only_reports_segm_ap(run, tmp_path):
    model_name, out = run
    register_subset("iuq_test_coco_val4", 4, tmp_path)
    results = train_net.main(args_for(
        model_name, tmp_path / "eval", "MODEL.WEIGHTS", str(out / "model_final.pth"),
        "DATASETS.TEST", "('iuq_test_coco_val4',)", *LOW_THRESHOLDS[model_name], eval_only=True,
    ))
    ap = results["segm"]["AP"]
    assert isinstance(ap, float) and 0.0 <= ap <= 100.0


def test_eval_only_on_a_split_without_annotations_writes_a_submission(run, tmp_path):
    model_name, out = run
    from pycocotools.coco import COCO as CocoApi

    register_subset("iuq_test_coco_testdev4", 4, tmp_path, with_annotations=False)
    results = train_net.main(args_for(
        model_name, tmp_path / "sub", "MODEL.WEIGHTS", str(out / "model_final.pth"),
        "DATASETS.TEST", "('iuq_test_coco_testdev4',)", *LOW_THRESHOLDS[model_name], eval_only=True,
    ))
    assert results == {}  # nothing to score locally: the server does it
    zips = list((tmp_path / "sub").rglob("detections_*_results.zip"))
    assert len(zips) == 1
    with zipfile.ZipFile(zips[0]) as z:
        [inner] = z.namelist()
        assert inner == zips[0].name.replace(".zip", ".json")
        detections = json.loads(z.read(inner))
    assert detections and {"image_id", "category_id", "segmentation", "score"} <= set(detections[0])
    path = tmp_path / inner
    path.write_text(json.dumps(detections))
    gt = CocoApi(str(COCO / "annotations" / "instances_val2017.json"))
    gt.loadRes(str(path))  # raises if image ids or the format are off


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_and_dump(args, out_dir):
    """One rank of a distributed run: train, then save this rank's memory."""
    from detectron2.utils import comm

    trainer = IUQTrainer(train_net.setup(args))
    trainer.resume_or_load(resume=False)
    trainer.train()
    torch.save(trainer.memory.state_dict(), f"{out_dir}/memory_rank{comm.get_rank()}.pth")


@pytest.mark.parametrize("model_name", ["CondInst"])
def test_two_process_cpu_run_leaves_identical_memories(model_name, tmp_path):
    args = args_for(model_name, tmp_path / "ddp", "SOLVER.MAX_ITER", "2", "DATASETS.TEST", "()")
    launch(_train_and_dump, 2, dist_url=f"tcp://127.0.0.1:{_free_port()}", args=(args, str(tmp_path)))
    states = [torch.load(tmp_path / f"memory_rank{r}.pth", weights_only=False) for r in range(2)]
    assert len(states[0]["embeddings"]) > 0
    for key in ("embeddings", "locations", "image_ids", "ptr"):
        a, b = states[0][key], states[1][key]
        assert torch.equal(a, b) if torch.is_tensor(a) else a == b, key
    # Both ranks' images are in it: 2 steps x 2 ranks x 1 image each.
    assert len(set(states[0]["image_ids"].tolist())) >= 3


def test_unknown_base_model_is_named():
    cfg = train_net.setup(args_for("CondInst", "/tmp/iuq_unused", "MODEL.META_ARCHITECTURE", "GeneralizedRCNN"))
    with pytest.raises(ValueError, match="GeneralizedRCNN.*no IUQ adapter"):
        IUQTrainer(cfg)


def test_invalid_iuq_key_is_named():
    with pytest.raises(ValueError, match=r"MODEL.IUQ.EQUI.MODE = 'sideways'"):
        train_net.setup(args_for("CondInst", "/tmp/iuq_unused", "MODEL.IUQ.EQUI.MODE", "sideways"))


def test_amp_and_gradient_clipping_step(tmp_path):
    """SOLVER.AMP.ENABLED (bf16 autocast on CPU, fp16 + GradScaler on CUDA) with clipping."""
    out = tmp_path / "amp"
    # small images: bf16 on a CPU without bf16 units is slow (one step at 256 px took ~6 minutes)
    train_net.main(args_for("CondInst", out, "SOLVER.MAX_ITER", "1", "SOLVER.AMP.ENABLED", "True",
                            "SOLVER.CLIP_GRADIENTS.ENABLED", "True", "DATASETS.TEST", "()",
                            "INPUT.MIN_SIZE_TRAIN", "(96,)", "INPUT.MAX_SIZE_TRAIN", "128"))
    metrics = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    last = metrics[-1]
    for key in ("loss_inter", "loss_equi", "loss_mask"):
        assert key in last and 0 < last[key] < float("inf"), (key, last.get(key))
