"""CPU fast paths for answering (chat, compare's speed checks, serving), applied by the loader.

`load()` stays the only loader; it checks a ServingSettings before loading and calls `apply` on
the loaded model. What each path does and costs (README, Performance):

- merge: a single adapter folded into the base weights (W + B @ A * scale): the same outputs to
  float rounding, without LoRA's extra matmuls at every layer.
- DecodeLinear (on CPU, for a plain model: merged or base): the few rows of a decoding step as
  W @ x^T, and with fp16 weights an fp16 copy for one or two rows.
- int8 head: the 262,144 x 640 LM head, the largest read per token, in int8 with one scale per
  output row. Works on a merged model and on a PeftModel with adapters beside the base.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from banklora.errors import UsageError


@dataclass(frozen=True)
class ServingSettings:
    merge: bool = False
    """Fold a single adapter into the base weights (chat): same answers, no LoRA matmuls."""
    int8_head: bool = False
    """LM head in int8 (CPU inference): ~2x faster tokens, a measured perplexity cost."""
    fp16_weights: bool = False
    """fp16 copies of the decoder's weights for single-stream decoding (CPU; needs a plain model)."""

    def check(self, *, training: bool, device: torch.device, adapters: int) -> None:
        """Refuse combinations that cannot work, before anything is loaded."""
        for wanted, what in ((self.int8_head, "int8"), (self.fp16_weights, "fp16")):
            if wanted and (training or device.type != "cpu"):
                raise UsageError(f"{what} weights are for CPU inference (chat, serving); on a GPU bf16 is already fast")
        if self.fp16_weights and adapters and not self.merged(adapters):
            raise UsageError("fp16 weights need the adapter merged (one adapter, merge=True)")

    def merged(self, adapters: int) -> bool:
        """True when the loaded model ends up plain: one adapter merged, or a base alone."""
        return adapters == 0 or (self.merge and adapters == 1)


def apply(model, settings: ServingSettings, device: torch.device, adapters: int):
    """The loaded model with the fast paths of `settings` in place (for inference only)."""
    if settings.merge and adapters == 1:
        model = model.merge_and_unload()
    if settings.int8_head:
        int8_head(model)
    if device.type == "cpu" and settings.merged(adapters) and (settings.merge or settings.fp16_weights):
        decode_linears(model, fp16=settings.fp16_weights)  # a plain model here: no LoRA layers to keep intact
    return model


def int8_head(model) -> None:
    """Dynamic int8 quantization of the LM head in place (weights int8 per output row,
    activations quantized on the fly), on a plain model or inside a PeftModel. Only the head:
    with the decoder's layers in int8 too, Gemma's large activations (~8e5) lose their precision
    and the answers fall apart (measured: reference perplexity 27 -> 70-98)."""
    from torch.ao.nn.quantized.dynamic import Linear as Int8Linear
    from torch.ao.quantization import per_channel_dynamic_qconfig

    head = model.get_output_embeddings()
    if type(head) is not torch.nn.Linear:
        raise UsageError(f"--int8: the LM head is a {type(head).__name__}, not a plain linear layer (an adapter that trains it?); drop --int8")
    parent, name = _parent_of(model, head)
    head.qconfig = per_channel_dynamic_qconfig  # one scale per output row: one per tensor ruins Gemma's answers (measured)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's notice that its quantized tensor types will move
        setattr(parent, name, Int8Linear.from_float(head))


def _parent_of(model, module) -> tuple[torch.nn.Module, str]:
    for parent in model.modules():
        for name, child in parent.named_children():
            if child is module:
                return parent, name
    raise ValueError("module not found in model")


class DecodeLinear(torch.nn.Module):
    """A frozen linear layer for CPU generation, where each decoding step multiplies a few rows.

    Measured on 2 cores over the 270M decoder's 126 projections: F.linear takes 75-100 ms for 2-16
    rows where W @ x^T takes 37-67 ms (the same fp32 products, another summation order), and for
    one row an fp16 copy of W (half the bytes read) takes 17 ms against 40. So: one row (and two)
    with the fp16 copy when there is one, up to SMALL_ROWS with W @ x^T, more (the prompt) with
    F.linear. An fp16 product that is not finite (Gemma's activations can exceed fp16's range) is
    redone in fp32, so nothing overflows. The fp32 weight is the original parameter (still tied
    where the model ties it).
    """

    HALF_ROWS, SMALL_ROWS = 2, 16

    def __init__(self, linear: torch.nn.Linear, fp16: bool) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.register_buffer("weight16", linear.weight.detach().to(torch.float16) if fp16 else None, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if rows > self.SMALL_ROWS or x.dtype != self.weight.dtype:
            return torch.nn.functional.linear(x, self.weight, self.bias)
        flat = x.reshape(rows, self.in_features)
        y = None
        if self.weight16 is not None and rows <= self.HALF_ROWS:
            y = torch.nn.functional.linear(flat.to(torch.float16), self.weight16).to(x.dtype)
            if not bool(torch.isfinite(y).all()):
                y = None
        if y is None:
            y = torch.mm(self.weight, flat.T).T
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)


def decode_linears(model, fp16: bool) -> None:
    """Every plain linear layer becomes a DecodeLinear; fp16 copies for all but the LM head (an
    fp16 head reads twice the bytes of the int8 one and measured slower)."""
    head = model.get_output_embeddings()
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.Linear:
                setattr(parent, name, DecodeLinear(child, fp16=fp16 and child is not head))
