#!/usr/bin/env python3
"""The studies' schedule rule (docs/study.md, "The protocol"), applied to a pilot run: print the
overrides that fix the study's schedule, ``SOLVER.MAX_ITER N SOLVER.STEPS (0.8 N,)``, where N is
the first evaluation at 2 AP or more whose segm AP gained less than 10% of its value over the
previous one (the baseline has levelled off), else the last one, capped by the CPU budget.

    python tools/pilot_schedule.py studies/copy_paste_condinst/pilot --cap 1000
    # -> SOLVER.MAX_ITER 1000 SOLVER.STEPS (800,)     (and the pilot's evaluations on stderr)
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "projects"))

from iuq import study  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pilot", help="the pilot's OUTPUT_DIR (its metrics.json)")
    parser.add_argument("--cap", type=int, help="the most iterations the budget allows")
    parser.add_argument("--rel-gain", type=float, default=0.1)
    parser.add_argument("--floor", type=float, default=2.0,
                        help="an evaluation below this AP never counts as levelled (noise, not a plateau)")
    parser.add_argument("--require", type=int, metavar="N",
                        help="fail unless the pilot has an evaluation at N iterations (it has finished)")
    parser.add_argument("--decay-at", type=float, default=0.8, help="the lr / 10 step, as a fraction of N")
    args = parser.parse_args(argv)
    if not os.path.isfile(os.path.join(args.pilot, "metrics.json")):
        parser.error(f"{args.pilot}/metrics.json does not exist: train the pilot first")
    evaluations = study.pilot_evaluations(args.pilot)
    if args.require and args.require not in dict(evaluations):
        print(f"{args.pilot}: no evaluation at {args.require} iterations yet", file=sys.stderr)
        return 1
    n = study.schedule_from_pilot(evaluations, args.rel_gain, args.cap, args.floor)
    print("pilot: " + ", ".join(f"{it}: {ap:.2f}" for it, ap in evaluations) + f" -> N = {n}", file=sys.stderr)
    print(f"SOLVER.MAX_ITER {n} SOLVER.STEPS ({int(round(args.decay_at * n))},)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
