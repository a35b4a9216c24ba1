"""morphkit: edit and morph single images with Stable Diffusion 1.5 and LoRA."""

__version__ = "0.1.0"

from .errors import ConfigError, InputError, LoRAError, ModelNotFoundError, MorphkitError, OutputExistsError  # noqa: E402
from .images import load_image  # noqa: E402
from .inversion import InversionResult, invert  # noqa: E402
from .metrics import EvalResult, evaluate  # noqa: E402
from .models import load_controlnet, load_pipeline  # noqa: E402
from .morph import (MorphResult, MorphSettings, PreparedKeyframes, PreparedPair, export_morph, morph,  # noqa: E402
                    morph_chain, prepare_keyframes, prepare_pair, render_chain, render_morph)
from .stylize import Stylized, StylizeResult, stylize  # noqa: E402
from .train import TrainResult, TrainSettings, train_lora  # noqa: E402

__all__ = [
    "__version__",
    "ConfigError",
    "EvalResult",
    "InputError",
    "LoRAError",
    "ModelNotFoundError",
    "MorphkitError",
    "OutputExistsError",
    "InversionResult",
    "MorphResult",
    "MorphSettings",
    "PreparedKeyframes",
    "PreparedPair",
    "Stylized",
    "StylizeResult",
    "TrainResult",
    "TrainSettings",
    "evaluate",
    "load_controlnet",
    "load_image",
    "invert",
    "load_pipeline",
    "morph",
    "morph_chain",
    "prepare_keyframes",
    "render_chain",
    "prepare_pair",
    "render_morph",
    "export_morph",
    "stylize",
    "train_lora",
]
