"""vitrain's models. Importing this package registers every variant."""

from vitrain.models import vit  # noqa: F401  (registers the ViT variants)
from vitrain.models.registry import create_model, list_models, register_model
from vitrain.models.vit import VisionTransformer

__all__ = ["VisionTransformer", "create_model", "list_models", "register_model"]
