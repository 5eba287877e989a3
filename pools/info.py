"""What a block is, as data: its place in its source model and its input/output signature."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

SignatureKind = Literal["map", "tokens"]


@dataclass(frozen=True)
class Signature:
    """The tensor at a block boundary, per sample.

    ``map``: a feature map [C, H, W] with ``channels`` = C and ``reduction`` = input side / H.
    ``tokens``: a token sequence [N, D] with ``channels`` = D (embedding width), ``reduction`` =
    the patch size, and ``prefix_tokens`` class/register tokens before the patch tokens.
    """

    kind: SignatureKind
    channels: int
    reduction: int
    prefix_tokens: int = 0

    def shape(self, input_size: int) -> tuple[int, ...]:
        side = input_size // self.reduction
        if self.kind == "map":
            return (self.channels, side, side)
        return (self.prefix_tokens + side * side, self.channels)


@dataclass(frozen=True)
class BlockInfo:
    """One block of a pool: where it was cut from and what it costs at ``input_size``."""

    name: str  # "<model>.<index>", unique in a pool
    model: str  # timm model name
    family: str  # resnet, mobilenetv3, efficientnet, regnet, convnext, vit, ...
    index: int  # position in its model, 0 = takes the image
    num_blocks: int  # blocks its model was cut into
    input: Signature
    output: Signature
    params: int
    flops: int  # forward FLOPs per sample at input_size (torch.utils.flop_counter)
    activation_bytes: int  # bytes per sample of the block's output at input_size (float32)
    input_size: int
    in_chans: int  # image channels (meaningful for index 0)

    @property
    def is_first(self) -> bool:
        return self.index == 0

    @property
    def is_last(self) -> bool:
        return self.index == self.num_blocks - 1

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_json(data: dict[str, Any]) -> BlockInfo:
        fields = dict(data)
        fields["input"] = Signature(**fields["input"])
        fields["output"] = Signature(**fields["output"])
        return BlockInfo(**fields)
