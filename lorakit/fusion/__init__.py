"""Training-time rewrites of a model: gated MLPs as one fused module, q/k/v reading one shared input,
and norms whose outputs backward rebuilds. Each keeps the model's values exactly; none imports
transformers (modules are recognised by their attributes)."""
