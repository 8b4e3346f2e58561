"""lorakit's core: the LoRA semantics on any nn.Module, importing torch and nothing else.

The config, the layer contract and its kinds, the variants (DoRA, PiSSA), the model-level
functions (inject, set, delete, disable, merge, combine, per-row) and the reference forward of
every path. Fast paths (lorakit.kernels), files (lorakit.formats) and quantized bases
(lorakit.quant) sit beside it and import it, never the reverse.
"""
