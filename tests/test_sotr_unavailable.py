"""A SOTR config where SOTR's package is not installed (e.g. AdelaiDet's environment: both are
the package `adet`) fails at start-up with an error naming the package and saying it needs its
own environment, not with yacs' "Non-existent config key" or detectron2's registry KeyError.

Skipped where SOTR is installed (there, test_configs_sotr.py and test_integration_sotr.py run)."""
import sys

import pytest

pytest.importorskip("detectron2", reason="detectron2 is not installed (not on PyPI; see README)")

from adelaidet_support import CONFIGS, REPO, adet_provides  # noqa: E402

if adet_provides("sotr"):
    pytest.skip("SOTR is installed here: the error for its absence cannot occur", allow_module_level=True)

sys.path.insert(0, str(REPO))
import train_net  # noqa: E402
from iuq.engine.models import BaseModelUnavailable, register_base_models  # noqa: E402

# The package, and that it cannot share an environment with AdelaiDet.
NAMED = (r"SOTR meta-architecture, provided by SOTR \(github\.com/easton-cau/SOTR; "
         r"its package is also named `adet`, so it needs its own environment\)")


def args_for(config, *opts):
    argv = ["--config-file", str(config), "MODEL.DEVICE", "cpu", "OUTPUT_DIR", "/tmp/iuq_unused"]
    return train_net.default_argument_parser().parse_args(argv + list(opts))


@pytest.mark.parametrize("recipe", ["R50", "R101_baseline", "R_101_DCN"])
def test_sotr_recipe_names_the_missing_package(recipe):
    with pytest.raises(BaseModelUnavailable, match="MODEL.META_ARCHITECTURE='SOTR' needs the " + NAMED):
        train_net.setup(args_for(CONFIGS["SOTR"].parent / f"{recipe}.yaml"))


def test_a_yaml_based_on_a_sotr_recipe_names_the_missing_package(tmp_path):
    # Its META_ARCHITECTURE (from the _BASE_ chain) is checked before anything is merged.
    config = tmp_path / "sotr_custom.yaml"
    config.write_text(f'_BASE_: "{CONFIGS["SOTR"]}"\nMODEL:\n  SOTR:\n    NUM_CLASSES: 20\n')
    with pytest.raises(BaseModelUnavailable, match="MODEL.META_ARCHITECTURE='SOTR' needs the " + NAMED):
        train_net.setup(args_for(config))


def test_sotr_config_keys_in_a_yaml_name_the_missing_package(tmp_path):
    # SOTR's own keys in a YAML whose model is another: yacs alone says "Non-existent config key".
    config = tmp_path / "sotr_keys.yaml"
    config.write_text('MODEL:\n  META_ARCHITECTURE: "GeneralizedRCNN"\n  SOTR:\n    NUM_CLASSES: 20\n')
    with pytest.raises(BaseModelUnavailable, match="Config key MODEL.SOTR needs the " + NAMED) as info:
        train_net.setup(args_for(config))
    assert "Non-existent config key: MODEL.SOTR" in str(info.value.__cause__)


@pytest.mark.parametrize("override", [["MODEL.SOTR.SCORE_THR", "0.0"], ["MODEL.SOTR.SCORE_THR=0.0"]])
def test_sotr_override_names_the_missing_package(override, tmp_path):
    config = tmp_path / "rcnn.yaml"
    config.write_text('MODEL:\n  META_ARCHITECTURE: "GeneralizedRCNN"\n')
    with pytest.raises(BaseModelUnavailable, match=r"Config key MODEL.SOTR.SCORE_THR needs the " + NAMED):
        train_net.setup(args_for(config, *override))


def test_register_base_models_checks_the_configs_model():
    from iuq.config import get_iuq_cfg

    cfg = get_iuq_cfg()
    cfg.MODEL.META_ARCHITECTURE = "SOTR"
    with pytest.raises(BaseModelUnavailable, match=NAMED):
        register_base_models(cfg)
    cfg.MODEL.META_ARCHITECTURE = "GeneralizedRCNN"  # detectron2's own: fine
    register_base_models(cfg)


def test_sotr_adapter_names_the_missing_package():
    from iuq.adapters import adapter_class
    from iuq.config import get_iuq_cfg

    cfg = get_iuq_cfg()
    cfg.MODEL.META_ARCHITECTURE = "SOTR"
    with pytest.raises(ImportError, match=r"MODEL.META_ARCHITECTURE='SOTR' needs SOTR \(github\.com/easton-cau/SOTR"):
        adapter_class(cfg)


def test_a_typo_in_an_existing_model_node_stays_yacs_error():
    if not adet_provides("condinst"):
        pytest.skip("needs AdelaiDet's MODEL.SOLOV2 keys")
    with pytest.raises(AssertionError, match="Non-existent key: MODEL.SOLOV2.SCORE_THRR"):
        train_net.setup(args_for(CONFIGS["SOLOv2"], "MODEL.SOLOV2.SCORE_THRR", "0.0"))


def test_train_net_names_the_installer_without_a_traceback():
    """As a user runs it: one message naming the package and the command that installs it."""
    import subprocess

    result = subprocess.run([sys.executable, "train_net.py", "--config-file", str(CONFIGS["SOTR"])],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "MODEL.META_ARCHITECTURE='SOTR' needs the SOTR meta-architecture" in result.stderr
    assert "python tools/install_frameworks.py sotr" in result.stderr
