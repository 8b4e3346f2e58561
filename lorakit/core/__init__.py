"""lorakit's core: LoRA layers on any nn.Module. Imports only torch (and safetensors for files)."""
