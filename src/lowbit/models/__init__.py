"""Models: loading real models offline (loader) and their structure for calibration (blocks)."""
from .loader import (PACKAGED_MODELS, SUPPORTED_CAUSAL_LM, SUPPORTED_ENCODER_TYPES, LoadedModel,
                     MissingModelPackageError, ModelLoadError, ModelNotFoundError,
                     UnsupportedArchitectureError, load_model, save_pretrained_copy)

__all__ = ["load_model", "save_pretrained_copy", "LoadedModel", "ModelLoadError", "ModelNotFoundError",
           "MissingModelPackageError", "UnsupportedArchitectureError", "SUPPORTED_CAUSAL_LM",
           "SUPPORTED_ENCODER_TYPES", "PACKAGED_MODELS"]
