"""SCALE: width upscaling for continual pre-training, as a PEFT method.

``import peft_scale`` registers the PEFT type ``"SCALE"``, after which ``get_peft_model``,
``PeftModel.from_pretrained``, ``AutoPeftModel*`` and transformers' ``load_adapter`` work with
``ScaleConfig`` like with any built-in method.
"""

from .architectures import FFN_LAYOUTS, FfnLayout
from .config import RouterConfig, ScaleConfig
from .confusion import routing_confusion
from .forgetting import ForgettingCallback, ForgettingReport, forgetting
from .layer import ScaleLayer
from .mer import MERCallback
from .model import ScaleModel
from .model_card import install_model_card_hook
from .optim import create_scale_optimizer, scale_optimizer_param_groups
from .registration import register_scale
from .router_fitting import BaseModelSamples, RouterFitCallback, RouterReport, fit_router

register_scale()
install_model_card_hook()  # save_pretrained's README.md names the method and shows how to load it

__version__ = "0.2.0"

__all__ = [
    "BaseModelSamples",
    "FFN_LAYOUTS",
    "FfnLayout",
    "ForgettingCallback",
    "ForgettingReport",
    "MERCallback",
    "RouterConfig",
    "RouterFitCallback",
    "RouterReport",
    "ScaleConfig",
    "ScaleLayer",
    "ScaleModel",
    "create_scale_optimizer",
    "fit_router",
    "forgetting",
    "register_scale",
    "routing_confusion",
    "scale_optimizer_param_groups",
    "__version__",
]
