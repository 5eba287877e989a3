"""FedPEFT's building blocks: which tensors train, adapters and deep prompts (the flat view: ``emulator.flat``).

Everything here works on any device, ``meta`` included, so the byte counts of a model as large as
ViT-B/16 can be checked without allocating it.

- Adapters (Houlsby-style bottleneck d -> d/r -> d, GELU, residual) sit after the MLP of every
  transformer block, attached with a forward hook so the backbone's parameter names stay unchanged. The
  up-projection starts at zero: at round 0 the adapted model computes exactly what the backbone does.
- Deep visual prompts (VPT-deep): ``P`` learnable tokens are inserted after the prefix (class/register)
  tokens before the first block, replaced by that layer's own tokens before every later block, and removed
  before the final norm, so the head sees what it would see without prompts. Forward pre-hooks do it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from emulator.errors import UserError

VARIANTS = ("bias", "adapter", "prompt", "head", "full", "scratch")
PEFT_VARIANTS = ("bias", "adapter", "prompt", "head")  # the backbone stays frozen


# -- adapters ----------------------------------------------------------------------------------------------


class Adapter(nn.Module):
    """Bottleneck adapter: y + up(GELU(down(y))), with ``up`` zero-initialised (function-preserving)."""

    def __init__(self, dim: int, reduction: int, *, device: torch.device | str | None = None) -> None:
        super().__init__()
        hidden = max(1, dim // reduction)
        self.down = nn.Linear(dim, hidden, device=device)
        self.up = nn.Linear(hidden, dim, device=device)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return y + self.up(F.gelu(self.down(y)))

    def after(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        """A forward hook: the adapter applied to ``module``'s output."""
        return self(output)


def transformer_blocks(model: nn.Module, *, what: str) -> list[nn.Module]:
    """The model's transformer blocks (timm ViT-style ``blocks[i].mlp``), or a one-line error."""
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, (nn.Sequential, nn.ModuleList)) or not all(hasattr(b, "mlp") for b in blocks):
        raise UserError(
            f"fedpeft.variant = {what!r} needs a transformer with blocks[i].mlp (a timm ViT such as "
            f"test_vit or vit_tiny_patch16_224); {type(model).__name__} has none"
        )
    return list(blocks)


def embed_dim(model: nn.Module) -> int:
    dim = getattr(model, "embed_dim", None) or getattr(model, "num_features", None)
    if not isinstance(dim, int):
        raise UserError(f"fedpeft: cannot tell the token width of {type(model).__name__} (no embed_dim)")
    return dim


def add_adapters(model: nn.Module, reduction: int, *, shared: bool) -> list[nn.Module]:
    """Attach an adapter after the MLP of every block; ``shared``: one adapter for all (the authors' code)."""
    blocks = transformer_blocks(model, what="adapter")
    dim = embed_dim(model)
    device = next(model.parameters()).device
    adapters: list[nn.Module] = []
    if shared:
        model.peft_adapter = Adapter(dim, reduction, device=device)
        adapters.append(model.peft_adapter)
    for block in blocks:
        adapter = model.peft_adapter if shared else Adapter(dim, reduction, device=device)
        if not shared:
            block.peft_adapter = adapter  # registered on the block: its parameters join the model's
            adapters.append(adapter)
        block.mlp.register_forward_hook(adapter.after)
    return adapters


# -- deep prompts ------------------------------------------------------------------------------------------


class DeepPrompt(nn.Module):
    """VPT-deep: ``tokens[i]`` are the prompt tokens seen by block ``i``."""

    def __init__(
        self, layers: int, tokens: int, dim: int, *, prefix: int, dropout: float, patch_area: int,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.num_tokens = tokens
        self.prefix = prefix
        self.tokens = nn.Parameter(torch.empty(layers, tokens, dim, device=device))
        # VPT's init: uniform(-v, v) with v = sqrt(6 / (3 * patch_area + dim)) (Xavier on the patch projection).
        bound = math.sqrt(6.0 / float(3 * patch_area + dim))
        nn.init.uniform_(self.tokens, -bound, bound)
        self.dropout = nn.Dropout(dropout)

    def enter(self, layer: int, module: nn.Module, args: tuple) -> tuple:
        """Forward pre-hook of block ``layer``: insert (layer 0) or replace (later layers) its prompts."""
        x = args[0]
        prompts = self.dropout(self.tokens[layer]).unsqueeze(0).expand(x.shape[0], -1, -1).to(x.dtype)
        head, rest = x[:, : self.prefix], x[:, self.prefix :]
        if layer > 0:
            rest = rest[:, self.num_tokens :]  # drop the previous layer's prompt outputs
        return (torch.cat([head, prompts, rest], dim=1), *args[1:])

    def leave(self, module: nn.Module, args: tuple) -> tuple:
        """Forward pre-hook of the final norm: remove the prompt tokens."""
        x = args[0]
        return (torch.cat([x[:, : self.prefix], x[:, self.prefix + self.num_tokens :]], dim=1), *args[1:])


def add_prompts(model: nn.Module, tokens: int, dropout: float) -> DeepPrompt:
    blocks = transformer_blocks(model, what="prompt")
    norm = getattr(model, "norm", None)
    if not isinstance(norm, nn.Module):
        raise UserError(f"fedpeft.variant = 'prompt': {type(model).__name__} has no final norm to strip prompts at")
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", (16, 16))
    area = int(np.prod(patch)) if isinstance(patch, (tuple, list)) else int(patch) ** 2
    prompt = DeepPrompt(
        len(blocks), tokens, embed_dim(model), prefix=int(getattr(model, "num_prefix_tokens", 1)),
        dropout=dropout, patch_area=area, device=next(model.parameters()).device,
    )
    model.peft_prompt = prompt
    for i, block in enumerate(blocks):
        block.register_forward_pre_hook(partial(prompt.enter, i))
    norm.register_forward_pre_hook(prompt.leave)
    return prompt


# -- what trains -------------------------------------------------------------------------------------------


def classifier(model: nn.Module) -> nn.Module:
    """The model's head: timm's ``get_classifier()``, else the last Linear layer."""
    getter = getattr(model, "get_classifier", None)
    if callable(getter):
        head = getter()
        if isinstance(head, nn.Module) and any(True for _ in head.parameters()):
            return head
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise UserError(f"fedpeft: {type(model).__name__} has no classifier head (no Linear layer)")
    return linears[-1]


@dataclass
class PeftSetup:
    """What a variant trains, in ``model.named_parameters()`` order."""

    variant: str
    names: list[str]
    params: list[nn.Parameter]

    @property
    def elements(self) -> int:
        return int(sum(p.numel() for p in self.params))

    @property
    def payload_bytes(self) -> int:
        return 4 * self.elements  # float32 on the wire, whatever the model's dtype


def prepare(
    model: nn.Module, variant: str, *, adapter_reduction: int = 8, prompt_tokens: int = 10,
    prompt_dropout: float = 0.1, shared_adapter: bool = False,
) -> PeftSetup:
    """Add the variant's modules to ``model`` and freeze everything else; returns the trainable set.

    The caller seeds torch first (adapters' down-projections and prompts are drawn from its RNG) and
    re-initialises the backbone for ``scratch``.
    """
    if variant not in VARIANTS:
        raise UserError(f"fedpeft.variant = {variant!r}: allowed: {', '.join(VARIANTS)}")
    head = {id(p) for p in classifier(model).parameters()}
    extra: set[int] = set()
    if variant == "adapter":
        extra = {id(p) for a in add_adapters(model, adapter_reduction, shared=shared_adapter) for p in a.parameters()}
    elif variant == "prompt":
        extra = {id(p) for p in add_prompts(model, prompt_tokens, prompt_dropout).parameters()}
    names, params = [], []
    for name, p in model.named_parameters():
        if variant in ("full", "scratch"):
            train = True
        elif variant == "bias":
            train = name.endswith("bias") or id(p) in head
        else:  # head, adapter, prompt
            train = id(p) in head or id(p) in extra
        p.requires_grad_(train)
        if train:
            names.append(name)
            params.append(p)
    return PeftSetup(variant, names, params)


def reinitialise(model: nn.Module) -> None:
    """Fresh random weights for ``scratch`` (timm's own init where the model has one)."""
    init = getattr(model, "init_weights", None)
    for module in model.modules():
        reset = getattr(module, "reset_parameters", None)
        if callable(reset) and module is not model:
            reset()
    if callable(init):
        init()


def freeze_statistics(model: nn.Module) -> None:
    """Keep BatchNorm running statistics of a frozen backbone fixed (they are part of what is frozen)."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()


__all__ = [
    "PEFT_VARIANTS",
    "VARIANTS",
    "Adapter",
    "DeepPrompt",
    "PeftSetup",
    "add_adapters",
    "add_prompts",
    "classifier",
    "freeze_statistics",
    "prepare",
    "reinitialise",
]
