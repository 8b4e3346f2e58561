"""Writing GGUF files for llama.cpp and Ollama: LoRA adapters (`export_adapter`) and merged models
(`merge_to_gguf`), with the `gguf` package alone.

Import the functions from their modules (`lorakit.gguf.export_adapter`, `lorakit.gguf.merge_gguf`);
this package imports nothing, so `import lorakit` stays fast and numpy-free here.
"""
