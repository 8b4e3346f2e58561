"""`lorakit estimate`: parameters and memory of full fine-tuning, LoRA and QLoRA from a model's config,
built on the meta device (no weights)."""
