"""The paper's autoencoders (VQ-VAE for CIFAR-10, two-level VQ-VAE-2) built from plain configuration."""
from .factory import (ARCHITECTURES, MODEL_DEFAULTS, ConfigError, build_model, build_quantizer, check_image_size,
                      quantizer_options, resolve_model_config, resolve_quantizer_config)
from .layers import ResBlock
from .vqvae import VQVAE, VQVAE2, ModelOutput, evaluation_mode, frozen_codebooks

__all__ = [
    "VQVAE", "VQVAE2", "ModelOutput", "ResBlock", "build_model", "build_quantizer", "resolve_model_config",
    "resolve_quantizer_config", "quantizer_options", "check_image_size", "ConfigError", "ARCHITECTURES",
    "MODEL_DEFAULTS", "frozen_codebooks", "evaluation_mode",
]
