"""Files: adapters in the PEFT layout (save, load, inspect) and the atomic writes every writer uses."""
