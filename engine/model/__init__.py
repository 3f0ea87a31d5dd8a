"""The model: loading (hub, local, GGUF), S2-Attn, RoPE extension, LoRA+ with trainable embeddings and norms, prompts,
and the config a merged export carries. Import the submodule you need (`engine.model.rope`...); this package imports
nothing, so `import engine.model.prompts` does not pay for torch."""
