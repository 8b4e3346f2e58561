"""Fast paths for core's LoRA layers: fused autograd functions, packed dropout masks, rebuilt
activations and stacked per-row factors.

Each computes what core's reference forward computes, keeping less for backward or issuing fewer
ops, and is tested against that reference in float64 (tests/kernels). Core never imports this
package: `dispatch.install()` (run by `import lorakit`) hands LoraLinear the hook that picks a
fast path, and a layer whose case no fast path covers runs core's reference forward.
"""
