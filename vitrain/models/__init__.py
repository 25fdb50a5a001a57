"""vitrain's models. Importing this package registers every variant."""

from vitrain.models import deit, deit3, swin, vit  # noqa: F401  (register the variants)
from vitrain.models.deit import DistilledVisionTransformer
from vitrain.models.factory import create_model
from vitrain.models.heads import classifier_names, init_linear, new_classifier, reset_classifier
from vitrain.models.registry import list_models, register_model
from vitrain.models.swin import SwinTransformer
from vitrain.models.vit import VisionTransformer

__all__ = ["DistilledVisionTransformer", "SwinTransformer", "VisionTransformer", "classifier_names", "create_model",
           "init_linear", "list_models", "new_classifier", "register_model", "reset_classifier"]
