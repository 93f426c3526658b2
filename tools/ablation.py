#!/usr/bin/env python3
"""Run the paper's ablation for any config: every (mode, seed) trained and evaluated through this
project's ``train_net.py``, one row per finished run in ``DIR/results.jsonl``, then the table
(mean ± std over seeds, paired differences to ``baseline`` and ``augment`` with 95% confidence
intervals) and ``DIR/ablation.png``.

    python tools/ablation.py --config-file configs/quickstart.yaml \\
        --modes baseline augment inter equi both both_matched --seeds 0 1 2 --output-dir output/ablation
    python tools/ablation.py --config-file configs/IUQ/CondInst/MS_R_50_1x.yaml --num-gpus 8 \\
        --modes baseline both --seeds 0 1 --output-dir output/condinst_r50 SOLVER.MAX_ITER 20000
    python tools/ablation.py ... --sweep MODEL.IUQ.MEMORY.SIZE 0 1000 10000    # Tables 4a-c, 4e
    python tools/ablation.py ... --report              # the table and figure of what has finished
    python tools/ablation.py ... --drop-dead 0 1 2 --modes inter both   # prints the modes not dead on all 3

Modes (``--list-modes`` prints them): baseline, augment, feature, inter, equi, both, and the
compute-matched ``augment_matched`` / ``equi_matched`` / ``both_matched`` (the views count toward
SOLVER.IMS_PER_BATCH: a step holds as many images as the baseline's).

A run is identified by its variant, its seed and the study's fingerprint (the config file's
content, the common overrides, the number of GPUs): one already in results.jsonl is skipped, so a
study can be stopped and resumed, or spread over machines sharing the output directory. A run
killed midway resumes from its last checkpoint (``--resume``). The same SEED gives the same
initialisation and data order in every mode. Every run also computes the IUQ measures
(``MODEL.IUQ.MEASURES``: cross-scene false activation, equivariance error) unless
``--no-measures``.
"""
import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "projects"))  # `iuq` without installing (study needs no detectron2)

from iuq import study  # noqa: E402


def _commit():
    try:
        return subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


COMMIT = _commit()  # the code a run trained with (the study's fingerprint covers the configs only)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--config-file")
    parser.add_argument("--modes", nargs="+", default=["baseline", "augment", "inter", "equi", "both"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--output-dir")
    parser.add_argument("--num-gpus", type=int, default=1)
    parser.add_argument("--sweep", nargs="+", metavar=("KEY", "VALUE"),
                        help="run every mode at each value of one config key")
    parser.add_argument("--jobs", type=int, default=1,
                        help="runs trained at once on this machine (each with cores / jobs threads)")
    parser.add_argument("--no-measures", action="store_true", help="COCO AP only (no MODEL.IUQ.MEASURES)")
    parser.add_argument("--references", nargs="+", default=["baseline", "augment"],
                        help="modes every variant is compared with (paired by seed)")
    parser.add_argument("--report", action="store_true", help="print the table and draw the figure, run nothing")
    parser.add_argument("--drop-dead", nargs="+", type=int, metavar="SEED",
                        help="run nothing: print the --modes whose masks did not die at every one of these seeds "
                             "(a stopping rule: iuq.study.masks_alive)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands of the runs still to do")
    parser.add_argument("--list-modes", action="store_true")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="overrides for every run: KEY VALUE or KEY=VALUE")
    args = parser.parse_args(argv)
    if args.list_modes:
        return args
    for flag in ("config_file", "output_dir"):
        if getattr(args, flag) is None:
            parser.error(f"--{flag.replace('_', '-')} is required")
    if args.sweep is not None and len(args.sweep) < 2:
        parser.error("--sweep needs a config key and at least one value")
    if not os.path.isfile(args.config_file):
        parser.error(f"--config-file {args.config_file}: no such file")
    return args


def common_overrides(args):
    opts = [o for o in args.opts if o != "--"]
    if not args.no_measures:
        opts += ["MODEL.IUQ.MEASURES.ENABLED", "True"]
    return opts


def command(args, run, output_dir, resume):
    cmd = [sys.executable, os.path.join(REPO, "train_net.py"), "--config-file", args.config_file,
           "--num-gpus", str(args.num_gpus)] + ["--resume"] * resume
    return cmd + common_overrides(args) + run.overrides + ["SEED", str(run.seed), "OUTPUT_DIR", output_dir]


def images_per_iter(output_dir):
    """Images a training step holds, from the run's own config.yaml (views included)."""
    import yaml

    with open(os.path.join(output_dir, "config.yaml")) as f:
        cfg = yaml.safe_load(f)
    n = cfg["SOLVER"]["IMS_PER_BATCH"]
    iuq = cfg["MODEL"].get("IUQ", {})
    views = iuq.get("ENABLED") and iuq.get("EQUI", {}).get("ENABLED")
    if views and not iuq["EQUI"].get("VIEWS_IN_BATCH", False):
        return 2 * n
    return n


def run_dir(args, run):
    return os.path.join(args.output_dir, "runs", run.variant, f"seed{run.seed}")


def _owner(out):
    """The pid in ``out/.pid`` while that process runs (the run is being trained: by another runner
    sharing the directory, or by the child of a runner that was stopped), else None."""
    try:
        with open(os.path.join(out, ".pid")) as f:
            pid = int(f.read())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    return pid


def _finished(out):
    """Whether the run in ``out`` trained to the end and was evaluated (its row may be missing: a
    runner stopped between the child's end and the row)."""
    return os.path.exists(os.path.join(out, "model_final.pth")) and bool(study.read_run(out)["metrics"])


def run_all(args, todo, results, fingerprint):
    """Train and evaluate ``todo``, ``args.jobs`` at a time (each with cores / jobs threads);
    append each finished run's row at once. A run another process is training (``out/.pid``) is
    waited for and recorded when it ends; a run that finished without its row is recorded without
    training again; one stopped midway resumes from its last checkpoint. Returns the keys of the
    runs that failed."""
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", str(threads))) if args.jobs > 1 else None
    pending, running, failed, walls, done = list(todo), {}, [], {}, [0]

    def record(run, out, wall):
        info = study.read_run(out)
        row = {"study": fingerprint, "commit": COMMIT, "variant": run.variant, "mode": run.mode, "seed": run.seed,
               "sweep": list(run.sweep) if run.sweep else None, "config_file": args.config_file,
               "overrides": common_overrides(args) + run.overrides, "output_dir": out,
               "wall_s": None if wall is None else round(wall, 1), "images_per_iter": images_per_iter(out), **info}
        study.append_result(results, row)
        done[0] += 1
        if wall is not None:
            walls.setdefault(run.mode, []).append(wall)
        eta = ""
        if walls:
            mean_all = sum(sum(w) for w in walls.values()) / sum(len(w) for w in walls.values())
            left = pending + [r for r, *_ in running.values()]
            seconds = sum(sum(walls[r.mode]) / len(walls[r.mode]) if r.mode in walls else mean_all for r in left)
            eta = f"; ETA {_eta(seconds / args.jobs)}"
        ap = study.value_of(row, "segm/AP")
        took = "recorded" if wall is None else f"{wall:.0f} s"
        print(f"[ablation] {done[0]}/{len(todo)} {run.key}: segm AP {ap if ap is None else round(ap, 2)}, {took}, "
              f"{info['sec_per_iter']} s/iter{eta}", flush=True)

    while pending or running:
        elsewhere = [r for r in pending if _owner(run_dir(args, r))]  # trained by another process here
        for run in [r for r in pending if r not in elsewhere]:
            out = run_dir(args, run)
            if os.path.isdir(out) and _finished(out):  # needs no slot
                pending.remove(run)
                record(run, out, None)
                continue
            if len(running) + len(elsewhere) >= args.jobs:  # those use this machine's cores too
                continue
            pending.remove(run)
            resume = os.path.exists(os.path.join(out, "last_checkpoint"))  # a run stopped midway goes on
            os.makedirs(out, exist_ok=True)
            log = open(os.path.join(out, "log.txt"), "a")
            proc = subprocess.Popen(command(args, run, out, resume), stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env)
            with open(os.path.join(out, ".pid"), "w") as f:
                f.write(str(proc.pid))
            running[proc] = (run, out, log, time.time())
        time.sleep(1.0 if running else 10.0)
        for proc in [p for p in running if p.poll() is not None]:
            run, out, log, start = running.pop(proc)
            log.close()
            os.remove(os.path.join(out, ".pid"))
            if proc.returncode != 0:
                failed.append(run.key)
                done[0] += 1
                print(f"[ablation] {done[0]}/{len(todo)} {run.key} FAILED (exit {proc.returncode}); see {out}/log.txt",
                      flush=True)
                continue
            record(run, out, time.time() - start)
    return failed


def _eta(seconds):
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def main(argv=None):
    args = parse_args(argv)
    if args.list_modes:
        for name, (doc, opts) in study.MODES.items():
            print(f"{name:16s} {doc}\n{'':16s} {' '.join(opts)}")
        return 0
    sweep = (args.sweep[0], args.sweep[1:]) if args.sweep else None
    runs = study.plan_runs(args.modes, args.seeds, sweep)
    results = os.path.join(args.output_dir, "results.jsonl")
    fingerprint = study.study_fingerprint(args.config_file, common_overrides(args), args.num_gpus)
    if args.drop_dead:
        rows = [r for r in study.load_results(results) if r.get("study") == fingerprint]
        print(" ".join(study.modes_alive(rows, args.modes, args.drop_dead)))
        return 0
    done = study.done_keys(study.load_results(results), fingerprint)
    todo = [r for r in runs if r.key not in done]
    failed = []
    if not args.report:
        print(f"[ablation] study {fingerprint}: {len(runs)} runs, {len(runs) - len(todo)} already in {results}, "
              f"{len(todo)} to do" + (f", {args.jobs} at a time" if args.jobs > 1 else ""), flush=True)
        if args.dry_run:
            for run in todo:
                print(" ".join(command(args, run, run_dir(args, run), False)))
        else:
            failed = run_all(args, todo, results, fingerprint)
    if args.dry_run:
        return 0
    rows = study.load_results(results)
    summaries = study.summarise(rows, fingerprint, references=tuple(args.references))
    if not summaries:
        print("[ablation] no finished run yet")
        return 1 if failed else 0
    print(study.format_tables(summaries, tuple(args.references)))
    figure = os.path.join(args.output_dir, "ablation.png")
    study.plot_study(rows, summaries, figure, fingerprint)
    print(f"[ablation] figure: {figure}")
    with open(os.path.join(args.output_dir, "summary.json"), "w") as f:
        json.dump([{"variant": s.variant, "mode": s.mode, "seeds": s.seeds, "stats": s.stats,
                    "diffs": {f"{ref} {m}": d for (ref, m), d in s.diffs.items()}} for s in summaries], f, indent=1)
    if failed:
        print(f"[ablation] {len(failed)} run(s) failed: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
