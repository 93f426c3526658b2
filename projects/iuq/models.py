"""Make detectron2's META_ARCH_REGISTRY know the base models IUQ trains."""
import logging

logger = logging.getLogger(__name__)


def register_base_models():
    """Import AdelaiDet's models (CondInst, SOLOv2) where AdelaiDet is installed."""
    try:
        import adet.modeling  # noqa: F401  (registers its meta-architectures)
    except ImportError as e:
        logger.info("AdelaiDet is not importable (%s): its meta-architectures are unavailable", e)
