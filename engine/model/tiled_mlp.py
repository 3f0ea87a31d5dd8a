"""Tiled MLP (ALST, arXiv 2506.13996 sec. 3.2): each decoder layer's MLP runs over tiles of the sequence, in forward
and in backward, so no (tokens x intermediate) tensor lives: at most (tile x intermediate).

A Llama MLP, down(act(gate(x)) * up(x)), saves four (N x I) tensors for backward (gate's and up's outputs, the
activation, their product; N = batch x length tokens, I = intermediate size) and its backward makes about three more
of the same size: 4 x I x 2 bytes per token in bf16 (112 KiB per token for Llama-3-8B, I = 14336), the largest
per-layer term once attention is flash/S2. Tiled, the forward runs each tile under no_grad and writes its rows of the
(N x hidden) output; backward recomputes one tile at a time with grad and takes the gradients of the tile's input and
of every parameter of the MLP that requires grad (LoRA on gate/up/down when targeted), so the MLP's saved state is
its input only (already alive: the norm's output). The cost is one more MLP forward per step: backward runs each
tile's forward again with grad, while the plain forward (and a checkpoint's recompute) runs without (ALST's
"forward twice, trice with checkpointing").

The layer's two RMSNorms are per-token too and run the same way (TILED_NORMS): their fp32 upcasts and backward
temporaries then live for one tile. How it is applied: `tile_mlps(model)` puts a `TiledRows` in place of each decoder
layer's `mlp` and norms (on the instance; no class is patched). It holds the original's submodules under their own
names, so parameter names, the state dict and peft's adapter keys stay exactly as they were, and runs the original
class's forward on itself, so what peft injects or merges there is what runs. `untile_mlps` puts the originals back.

Why not DeepSpeed's `TiledMLP` (deepspeed/runtime/sequence_parallel/ulysses_sp.py): it is written to be patched
onto `LlamaMLP.forward` (a class patch); its backward recomputes without the forward's autocast state (our bf16 runs
compute under autocast with fp32 LoRA masters, so the recompute would compute something else); and it accumulates
parameter gradients by a nested `torch.autograd.backward` into `.grad`, outside the outer graph, so DDP's and ZeRO's
gradient hooks fire once per tile (it sets DeepSpeed-only `ds_grad_is_ready` flags to cope). Here the parameter
gradients are summed over tiles and returned through the graph once. Like it, the tile count is agreed over ranks
(max) when torch.distributed runs, so that ZeRO-3's per-call parameter gathers match on every rank.

The MLP must compute the same thing twice (no dropout: true of every family engine.catalog supports).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from engine.model.heartbeat import decoder_layers
from engine.model.tiling import auto_tile_tokens, tile_count  # noqa: F401  (auto_tile_tokens re-exported)

# The decoder layer's norms, tiled with its MLP: in bf16 runs (fp32 master norm weights) each RMSNorm keeps an fp32
# upcast of its input and its backward makes five fp32 temporaries of the layer's width, 30 h bytes a token in all,
# more than the attention's saved tensors (bench/memory.py --top shows them).
TILED_NORMS = ("input_layernorm", "post_attention_layernorm")


def _agreed(count: int, device: torch.device) -> int:
    """The largest tile count over all ranks (ZeRO-3 gathers parameters on every call: counts must match)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return count
    if torch.distributed.get_world_size() == 1:
        return count
    agreed = torch.tensor([count], device=device)
    torch.distributed.all_reduce(agreed, op=torch.distributed.ReduceOp.MAX)
    return int(agreed.item())


def _bounds(rows: int, count: int) -> list[tuple[int, int]]:
    """`count` contiguous row ranges covering [0, rows), sizes differing by at most one (some empty if rows <
    count: every rank runs the same number of calls)."""
    return [(rows * i // count, rows * (i + 1) // count) for i in range(count)]


class _TiledFunction(torch.autograd.Function):
    """y = fn(x) computed tile by tile; backward recomputes each tile with grad.

    Inputs: (fn, count, autocast state, x (N, d), *params), params being the tensors fn uses that require grad;
    their gradients are summed over the tiles and returned here, through the graph (once per step, as without
    tiling). The RNG state is replayed, so a LoRA dropout draws the same masks in backward."""

    @staticmethod
    def forward(ctx, fn: Callable, count: int, autocast: tuple, x: torch.Tensor, *params: torch.Tensor):
        ctx.fn, ctx.count, ctx.autocast = fn, count, autocast
        ctx.params = params  # leaves (Parameters), not activations: kept by reference like DeepSpeed's
        ctx.rng = (torch.get_rng_state(), torch.cuda.get_rng_state(x.device) if x.is_cuda else None)
        ctx.save_for_backward(x)
        out = None
        with torch.no_grad():
            for start, stop in _bounds(x.shape[0], count):
                tile = fn(x[start:stop])  # (n, d_out)
                if out is None:
                    out = tile.new_empty((x.shape[0], tile.shape[-1]))  # (N, d_out), in the tile's dtype
                out[start:stop] = tile
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (x,) = ctx.saved_tensors
        params = list(ctx.params)
        need_x = ctx.needs_input_grad[3]
        grad_x = torch.zeros_like(x) if need_x else None  # (N, d)
        grad_params: list[torch.Tensor | None] = [None] * len(params)
        device_type, enabled, dtype, cache = ctx.autocast
        cpu_rng, cuda_rng = ctx.rng
        devices = [x.device] if cuda_rng is not None else []
        with torch.random.fork_rng(devices=devices, device_type=x.device.type):
            torch.set_rng_state(cpu_rng)
            if cuda_rng is not None:
                torch.cuda.set_rng_state(cuda_rng, x.device)
            for start, stop in _bounds(x.shape[0], ctx.count):
                x_tile = x[start:stop].detach().requires_grad_(need_x)  # (n, d)
                with torch.enable_grad(), torch.autocast(device_type, dtype, enabled, cache):
                    y = ctx.fn(x_tile)  # (n, d_out)
                inputs = ([x_tile] if need_x else []) + params
                grads = torch.autograd.grad(y, inputs, grad_out[start:stop], allow_unused=True)
                if need_x:
                    grad_x[start:stop] = grads[0]
                    grads = grads[1:]
                for i, g in enumerate(grads):
                    if g is not None:
                        grad_params[i] = g if grad_params[i] is None else grad_params[i] + g
        return (None, None, None, grad_x, *grad_params)


def _autocast_state(device_type: str) -> tuple:
    """(device type, enabled, dtype, cache enabled) of the autocast around the forward, replayed in backward."""
    if not torch.amp.is_autocast_available(device_type):
        return ("cpu", False, torch.bfloat16, True)
    return (
        device_type,
        torch.is_autocast_enabled(device_type),
        torch.get_autocast_dtype(device_type),
        torch.is_autocast_cache_enabled(),
    )


class TiledRows(torch.nn.Module):
    """A per-token module (an MLP, an RMSNorm) that runs over row tiles: `tile_mlps` puts one in place of each decoder
    layer's `mlp` and norms.

    It holds the original's submodules (and parameters, buffers) under the same names, so parameter names, the state
    dict and peft's keys are those of the original; it runs the original class's forward on *itself*, so a submodule
    peft (or a merge) replaces here is the one that runs. Other attributes the class's forward reads are the
    original's.

    Args:
        mlp: the MLP to tile (not registered: its children are).
        tile_tokens: rows per tile; 0 = auto (`tile_count`).
        hidden: the MLP's input width (the auto tile).
    """

    def __init__(self, mlp: torch.nn.Module, tile_tokens: int, hidden: int) -> None:
        super().__init__()
        self.tile_tokens, self.hidden = tile_tokens, hidden
        for name, child in mlp.named_children():
            self.add_module(name, child)
        for name, param in mlp.named_parameters(recurse=False):
            self.register_parameter(name, param)
        for name, buffer in mlp.named_buffers(recurse=False):
            self.register_buffer(name, buffer, persistent=name not in mlp._non_persistent_buffers_set)
        self.train(mlp.training)
        self.__dict__["original"] = mlp  # not a child (its children are ours); last, see __getattr__

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if "original" not in self.__dict__:  # still registering: our own names only
                raise
            return getattr(self.__dict__["original"], name)  # e.g. `config`, `hidden_size`, `act_fn` as a function

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        return type(self.original).forward(self, x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape  # (B, L, d)
        rows = x.reshape(-1, shape[-1])  # (B*L, d)
        count = _agreed(tile_count(rows.shape[0], self.hidden, self.tile_tokens), x.device)
        if torch.is_grad_enabled():
            params = [p for p in self.parameters() if p.requires_grad]
            out = _TiledFunction.apply(self._mlp, count, _autocast_state(x.device.type), rows, *params)
        else:  # inference, or nothing to differentiate: tiles, nothing saved
            out = None
            for start, stop in _bounds(rows.shape[0], count):
                tile = self._mlp(rows[start:stop])  # (n, d_out)
                if out is None:
                    out = tile.new_empty((rows.shape[0], tile.shape[-1]))  # (N, d_out)
                out[start:stop] = tile
        return out.reshape(*shape[:-1], out.shape[-1])  # (B*L, d_out) -> (B, L, d_out)

    def extra_repr(self) -> str:
        return f"tile_tokens={self.tile_tokens or f'auto (<= {self.hidden})'}"


def tile_mlps(model: torch.nn.Module, tile_tokens: int = 0) -> int:
    """Put a `TiledRows` in place of every decoder layer's `mlp` and norms (see the module docstring); before or after
    peft.

    Returns:
        The number of MLPs tiled (already tiled ones are left as they are).

    Raises:
        ValueError: `tile_tokens` < 0, or a model whose decoder layers have no `mlp`.
    """
    if tile_tokens < 0:
        raise ValueError(f"tile_tokens must be >= 0 (0 = auto), got {tile_tokens}")
    layers = decoder_layers(model)
    if not layers or not all(isinstance(getattr(layer, "mlp", None), torch.nn.Module) for layer in layers):
        raise ValueError(f"tiled_mlp needs decoder layers with an `mlp` module; {type(model).__name__} has none")
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    tiled = 0
    for layer in layers:
        if isinstance(layer.mlp, TiledRows):
            continue
        width = getattr(layer.mlp, "hidden_size", None) or hidden
        if not width:
            raise ValueError(f"cannot tell the hidden size of {type(layer.mlp).__name__} for the auto MLP tile")
        layer.mlp = TiledRows(layer.mlp, tile_tokens, width)
        tiled += 1
        for name in TILED_NORMS:  # per-token too: their fp32 upcasts and backward temporaries live for a tile only
            norm = getattr(layer, name, None)
            if isinstance(norm, torch.nn.Module) and not isinstance(norm, TiledRows):
                setattr(layer, name, TiledRows(norm, tile_tokens, width))
    return tiled


def untile_mlps(model: torch.nn.Module) -> None:
    """Put the original MLPs back, with the submodules the tiled ones hold now (e.g. peft's)."""
    for layer in decoder_layers(model) or []:
        for attr in ("mlp", *TILED_NORMS):
            tiled = getattr(layer, attr, None)
            if isinstance(tiled, TiledRows):
                original = tiled.original
                for name, child in tiled.named_children():
                    setattr(original, name, child)
                setattr(layer, attr, original)


def is_tiled(module: torch.nn.Module) -> bool:
    return isinstance(module, TiledRows)
