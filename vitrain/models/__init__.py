"""vitrain's models. Importing this package registers every variant."""

from vitrain.models import deit, swin, vit  # noqa: F401  (register the variants)
from vitrain.models.deit import DistilledVisionTransformer
from vitrain.models.factory import create_model
from vitrain.models.registry import list_models, register_model
from vitrain.models.swin import SwinTransformer
from vitrain.models.vit import VisionTransformer

__all__ = ["DistilledVisionTransformer", "SwinTransformer", "VisionTransformer", "create_model", "list_models",
           "register_model"]
