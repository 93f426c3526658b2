#!/usr/bin/env python3
"""Look at what IUQ changes (the paper's Fig. 3): two models' predictions side by side on
held-out images, and a few queries' response maps on *other* images (what Eq. 5 penalises).

    python tools/visualize.py --config-file configs/quickstart.yaml \\
        --weights output/ablation/runs/baseline/seed0/model_final.pth \\
        --weights-b output/ablation/runs/both/seed0/model_final.pth --names baseline IUQ \\
        --num-images 4 --output-dir output/vis

Writes ``predictions_<k>.png`` (ground truth | model A | model B, detectron2's Visualizer,
instances above ``--score`` only) for the first ``--num-images`` annotated images of
``--dataset`` (default: the config's first test set), and ``responses_<name>.png`` per model: for
``--queries`` matched queries of the first image (one per instance), the query's own mask, then
its probability map sigmoid(<q, F'>) on each of the other images. A model whose queries are
instance-unique is dark everywhere right of the first column.
"""
import argparse
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--config-file", required=True)
    p.add_argument("--weights", required=True, help="model A's checkpoint")
    p.add_argument("--weights-b", help="model B's checkpoint (side by side with A)")
    p.add_argument("--names", nargs=2, default=["A", "B"])
    p.add_argument("--dataset", help="a registered dataset with annotations (default: DATASETS.TEST[0])")
    p.add_argument("--num-images", type=int, default=4)
    p.add_argument("--queries", type=int, default=4)
    p.add_argument("--score", type=float, default=0.3)
    p.add_argument("--output-dir", required=True)
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides, KEY VALUE or KEY=VALUE")
    return p.parse_args(argv)


def load_model(cfg, weights):
    from detectron2.checkpoint import DetectionCheckpointer

    from iuq.engine.trainer import IUQTrainer

    if not os.path.isfile(weights):
        raise FileNotFoundError(f"--weights: {weights} does not exist")
    model = IUQTrainer.build_model(cfg)
    DetectionCheckpointer(model).load(weights)
    model.eval()
    return model


def predictions_figure(cfg, models, names, dicts, mapper, score, path):
    """One row per image: ground truth, then each model's instances above ``score``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch
    from detectron2.data import MetadataCatalog
    from detectron2.utils.visualizer import Visualizer

    meta = MetadataCatalog.get(dicts[0]["_dataset"])
    names_of = meta.get("thing_classes", None)
    fig, axes = plt.subplots(len(dicts), 1 + len(models), figsize=(4.2 * (1 + len(models)), 3.4 * len(dicts)),
                             squeeze=False)
    for row, d in enumerate(dicts):
        mapped = mapper(d)  # resized as at test time; ground truth moved with it
        image, truth = mapped["image"], mapped["instances"]
        rgb = image.permute(1, 2, 0).numpy()
        rgb = rgb[:, :, ::-1] if cfg.INPUT.FORMAT == "BGR" else rgb
        labels = [names_of[c] if names_of else str(c) for c in truth.gt_classes.tolist()]
        gt = Visualizer(rgb, meta).overlay_instances(boxes=truth.gt_boxes, masks=truth.gt_masks, labels=labels)
        axes[row, 0].imshow(gt.get_image())
        axes[row, 0].set_title(f"ground truth ({len(truth)})")
        for col, (model, name) in enumerate(zip(models, names), start=1):
            with torch.no_grad():
                out = model([{"image": image, "height": image.shape[1], "width": image.shape[2]}])[0]["instances"]
            out = out[out.scores > score].to("cpu")
            vis = Visualizer(rgb, meta).draw_instance_predictions(out)
            axes[row, col].imshow(vis.get_image())
            axes[row, col].set_title(f"{name} ({len(out)} above {score})")
        for ax in axes[row]:
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def responses_figure(cfg, model, name, dicts, mapper, num_queries, path):
    """Rows: up to ``num_queries`` matched queries of the first image (one per instance); columns:
    the query's target mask on its own image, then sigmoid(<q, F'>) on each other image."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from iuq.adapters import build_adapter
    from iuq.data.batch import instance_bitmasks
    from iuq.evaluation.measures import assign_instances, pick_per_group, training_forward_with_frozen_statistics
    from iuq.inter.samples import masks_on_grid

    adapter = build_adapter(cfg, model)
    batch = [mapper(d) for d in dicts]
    with training_forward_with_frozen_statistics(model), adapter.capture() as cap:
        model(batch)
    with torch.no_grad():
        mine = (cap.query_images == 0).nonzero(as_tuple=True)[0]
        d0 = batch[0]
        inst = instance_bitmasks(d0["instances"], tuple(d0["image"].shape[-2:]))
        owner = assign_instances(cap.gt_masks[cap.gt_index[mine]], masks_on_grid(inst, cap.gt_masks.shape[-2:], cap.mask_stride))
        chosen = mine[pick_per_group(owner, 1, torch.Generator().manual_seed(0))][:num_queries]
        meta = {k: v[chosen] for k, v in cap.query_meta.items()}
        fig, axes = plt.subplots(max(len(chosen), 1), len(batch), figsize=(2.6 * len(batch), 2.2 * max(len(chosen), 1)),
                                 squeeze=False)
        for r, q in enumerate(chosen.tolist()):
            axes[r, 0].imshow(cap.gt_masks[cap.gt_index[q]].float().numpy(), cmap="gray", vmin=0, vmax=1)
            axes[r, 0].set_title("query's own mask", fontsize=8)
            for j in range(1, len(batch)):
                h, w = batch[j]["image"].shape[-2:]
                logits = adapter.decode_map(cap.queries[[q]], {k: v[[r]] for k, v in meta.items()},
                                            torch.zeros(1, dtype=torch.long), cap.embeddings[[j]])
                prob = logits.sigmoid()[0, : h // cap.mask_stride, : w // cap.mask_stride]
                axes[r, j].imshow(prob.numpy(), cmap="magma", vmin=0, vmax=1)
                axes[r, j].set_title(f"on image {j}: max {float(prob.max()):.2f}", fontsize=8)
        for ax in axes.flat:
            ax.axis("off")
        fig.suptitle(f"{name}: matched queries of image 0 on other images (sigmoid <q, F'>)")
        fig.tight_layout()
        fig.savefig(path, dpi=80)
        plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    import train_net
    from detectron2.data import DatasetCatalog

    from iuq.evaluation.measures import heldout_mapper

    cfg = train_net.setup(train_net.default_argument_parser().parse_args(
        ["--config-file", args.config_file] + list(args.opts)))
    dataset = args.dataset or cfg.DATASETS.TEST[0]
    if dataset not in DatasetCatalog.list():
        raise ValueError(f"--dataset {dataset!r} is not registered; known: {sorted(DatasetCatalog.list())[:20]} ...")
    dicts = [dict(d, _dataset=dataset) for d in DatasetCatalog.get(dataset) if d.get("annotations")][: args.num_images]
    if not dicts:
        raise ValueError(f"--dataset {dataset!r} has no annotated image")
    mapper = heldout_mapper(cfg)  # as the measures see them: test-time size, ground truth kept
    models = [load_model(cfg, args.weights)] + ([load_model(cfg, args.weights_b)] if args.weights_b else [])
    names = args.names[: len(models)]
    os.makedirs(args.output_dir, exist_ok=True)
    written = [os.path.join(args.output_dir, "predictions.png")]
    predictions_figure(cfg, models, names, dicts, mapper, args.score, written[0])
    for model, name in zip(models, names):
        written.append(os.path.join(args.output_dir, f"responses_{name}.png"))
        responses_figure(cfg, model, name, dicts, mapper, args.queries, written[-1])
    for path in written:
        print(f"[visualize] wrote {path}")
    return written


if __name__ == "__main__":
    main()
