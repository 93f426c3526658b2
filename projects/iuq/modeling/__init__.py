"""Meta-architectures of ours for base models that have no detectron2 port (SOLQ: ``iuq.modeling.solq``,
which needs SOLQ installed; its config keys, ``iuq.modeling.solq_config``, do not)."""
