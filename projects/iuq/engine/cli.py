"""train_net.py's command line: detectron2's ``default_argument_parser`` plus ``--dataset`` (your
own COCO data) and ``--check-data``, and the launcher flags written among the overrides named.

detectron2's parser gives everything after the first override to ``opts`` (argparse.REMAINDER),
so ``--resume`` written after ``KEY VALUE`` pairs becomes an override and fails as "Override list
has odd length", naming neither the flag nor the fix; :func:`parse_args` says it in one line.
"""
import shlex
import sys

from ..data.custom import FLAG as DATASET_FLAG


def add_dataset_argument(parser):
    """``--dataset NAME=JSON:IMAGE_ROOT`` (repeatable): register a COCO-format dataset."""
    parser.add_argument(
        DATASET_FLAG, action="append", default=[], metavar="NAME=JSON:IMAGE_ROOT",
        help="register a COCO instances dataset as NAME (detectron2's register_coco_instances) for "
             "DATASETS.TRAIN / DATASETS.TEST; repeatable",
    )
    return parser


def argument_parser(epilog=None):
    """detectron2's ``default_argument_parser`` with ``--dataset`` and ``--check-data``."""
    from detectron2.engine import default_argument_parser

    parser = add_dataset_argument(default_argument_parser(epilog))
    parser.add_argument(
        "--check-data", action="store_true",
        help="check DATASETS.TRAIN and DATASETS.TEST first (every image read, every annotation; "
             "tools/check_dataset.py) and stop before training if there are errors",
    )
    return parser


def _takes_value(action):
    return action.nargs != 0  # store_true / store_false / count: nargs 0


def flag_of(parser, token):
    """The parser action ``token`` (``--resume``, ``--num-gpus=8``, an unambiguous prefix such as
    ``--eval``) is an option of, or None."""
    if not token.startswith("--") or token == "--":
        return None
    name = token.split("=", 1)[0]
    options = parser._option_string_actions  # argparse's own table of option strings
    if name in options:
        return options[name]
    matches = {options[o] for o in options if o.startswith(name) and o.startswith("--")}
    return matches.pop() if len(matches) == 1 else None


def flags_among_overrides(parser, argv):
    """(the option tokens found in ``argv``'s overrides, ``argv`` with them and their values moved
    before the overrides), or None when there is none. ``argv``: the arguments, no program name."""
    opts = parser.parse_args(argv).opts or []
    head, tail = list(argv[: len(argv) - len(opts)]), list(opts)
    found, moved, rest, i = [], [], [], 0
    while i < len(tail):
        action = flag_of(parser, tail[i])
        if action is None:
            rest.append(tail[i])
            i += 1
            continue
        found.append(tail[i].split("=", 1)[0])
        take = 2 if _takes_value(action) and "=" not in tail[i] and i + 1 < len(tail) else 1
        moved += tail[i : i + take]
        i += take
    return (found, head + moved + rest) if found else None


def parse_args(parser, argv=None, prog="train_net.py"):
    """``parser.parse_args(argv)``, exiting with one line when a flag of the parser (``--resume``,
    ``--eval-only``, ``--num-gpus``, ``--dataset``, ...) comes after the overrides, the command
    with the flags moved given as the fix."""
    argv = sys.argv[1:] if argv is None else list(argv)
    slip = flags_among_overrides(parser, argv)
    if slip:
        found, fixed = slip
        flags = " and ".join(dict.fromkeys(found))
        sys.exit(f"{prog}: {flags} must come before the overrides (everything after the first KEY VALUE is an "
                 f"override): python {prog} {shlex.join(fixed)}")
    return parser.parse_args(argv)

