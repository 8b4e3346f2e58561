"""The transformers-facing layer: loading base models and generating text.

transformers itself is imported lazily inside the functions, so importing this package costs
only what torch already costs.
"""

from lorakit.hf.default_model import default_model_path
from lorakit.hf.generate import generate_text
from lorakit.hf.loading import load_model

__all__ = ["default_model_path", "generate_text", "load_model"]
