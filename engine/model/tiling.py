"""How the tiled MLP (engine.model.tiled_mlp) cuts a sequence into tiles, torch-free: the planner prices the same tile
(engine.planning.memory) without loading torch, as it reads LoRA+ settings from engine.model.lora_config."""

from __future__ import annotations

import math


def tile_count(tokens: int, hidden: int, tile_tokens: int = 0) -> int:
    """How many tiles `tokens` rows are cut into: ceil(tokens / tile_tokens), or with tile_tokens 0 (auto)
    ceil(tokens / hidden), i.e. balanced tiles of at most `hidden` tokens (ALST's choice)."""
    if tile_tokens < 0:
        raise ValueError(f"tile_tokens must be >= 0 (0 = auto), got {tile_tokens}")
    return max(1, math.ceil(tokens / (tile_tokens or hidden)))


def auto_tile_tokens(tokens: int, hidden: int) -> int:
    """The rows of the largest auto tile: ceil(N / ceil(N / hidden)) <= hidden, ALST's choice, which bounds a tile's
    tokens x intermediate tensor by hidden x intermediate (one MLP weight's size) whatever the sequence length (the
    planner prices this tile: engine.planning.memory)."""
    return math.ceil(tokens / tile_count(tokens, hidden)) if tokens else 0
