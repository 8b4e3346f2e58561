"""NF4 quantization (QLoRA) in pure PyTorch, bit-compatible with bitsandbytes: the 4-bit frozen base.

Typical use::

    from lorakit.quant import quantize_model

    quantize_model(model)  # every nn.Linear / Conv1D except the output head becomes an NF4Linear
"""

from lorakit.quant.gguf_blocks import block_format
from lorakit.quant.gguf_blocks import dequantize as dequantize_gguf
from lorakit.quant.gguf_linear import GGUFLinear
from lorakit.quant.linear4bit import NF4Linear
from lorakit.quant.nf4 import NF4_VALUES, NF4Tensor, dequantize_nf4, quantize_nf4
from lorakit.quant.quantize_model import quantize_model

__all__ = ["NF4_VALUES", "GGUFLinear", "NF4Linear", "NF4Tensor", "block_format", "dequantize_gguf",
           "dequantize_nf4", "quantize_model", "quantize_nf4"]
