"""Helpers shared by the recipe tests (tests/test_configs*.py)."""
import yaml


def norm(value):
    """Lists and tuples alike (YAML gives lists, CfgNode defaults tuples)."""
    return tuple(norm(v) for v in value) if isinstance(value, (list, tuple)) else value


def flat(node, prefix=""):
    """A nested config as {"A.B.C": value}."""
    out = {}
    for key, value in node.items():
        if isinstance(value, dict):
            out.update(flat(value, prefix + key + "."))
        else:
            out[prefix + key] = norm(value)
    return out


def raw(path):
    """A YAML file as written (no _BASE_ resolution)."""
    with open(path) as f:
        return yaml.safe_load(f)
