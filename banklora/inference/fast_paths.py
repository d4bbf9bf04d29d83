"""CPU fast paths for answering (chat, compare's speed checks, serving), applied by the loader.

`load()` stays the only loader; it checks a ServingSettings before loading and calls `apply` on
the loaded model. What each path does and costs (docs/performance.md):

- merge: a single adapter folded into the base weights (W + B @ A * scale): the same outputs to
  float rounding, without LoRA's extra matmuls at every layer.
- DecodeLinear (on CPU, for a plain model: merged or base): the few rows of a decoding step as
  W @ x^T, and with fp16 weights an fp16 copy for one or two rows.
- int8 head: the 262,144 x 640 LM head, the largest read per token, in int8 with one scale per
  output row. Works on a merged model and on a PeftModel with adapters beside the base.
- stacked adapters (the server: a PeftModel with adapters beside the base, rows of one batch
  asking different ones through PEFT's `adapter_names`): each LoRA layer's adapters stacked into
  one A (sum of ranks x in) and one scaled B, so a mixed batch costs two small matmuls and a row
  mask per layer instead of PEFT's gather, two matmuls and scatter per adapter; the base weight's
  product and the LM head as DecodeLinear's W @ x^T. The same products in another summation order.
- a contiguous LM-head input, always (contiguous_head_input).
"""

from __future__ import annotations

import types
import warnings
from dataclasses import dataclass

import torch

from banklora import kernels
from banklora.errors import UsageError


@dataclass(frozen=True)
class ServingSettings:
    merge: bool = False
    """Fold a single adapter into the base weights (chat): same answers, no LoRA matmuls."""
    int8_head: bool = False
    """LM head in int8 (CPU inference): ~2x faster tokens, a measured perplexity cost."""
    fp16_weights: bool = False
    """fp16 copies of the decoder's weights for single-stream decoding (CPU; needs a plain model)."""
    stacked: bool = False
    """Adapters kept beside the base for batches whose rows ask different ones (the server): stacked per layer."""

    def check(self, *, training: bool, device: torch.device, adapters: int) -> None:
        """Refuse combinations that cannot work, before anything is loaded."""
        for wanted, what in ((self.int8_head, "int8"), (self.fp16_weights, "fp16")):
            if wanted and (training or device.type != "cpu"):
                raise UsageError(f"{what} weights are for CPU inference (chat, serving); on a GPU bf16 is already fast")
        if self.fp16_weights and adapters and not self.merged(adapters):
            raise UsageError("fp16 weights need the adapter merged (one adapter, merge=True)")
        if self.stacked and (training or self.merged(adapters)):
            raise UsageError("stacked adapters are for serving adapters unmerged beside their base")

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
    elif settings.stacked:
        stack_adapters(model, decode=device.type == "cpu")
    elif hasattr(model, "peft_config"):
        kernels.install_token_rows(model)  # trained turn-token rows without copying the embedding at every step
    contiguous_head_input(model)
    return model


def contiguous_head_input(model) -> None:
    """The LM head takes its input contiguous. transformers hands it hidden_states[:, -1:, :] (a
    strided view) when only the last position's logits are kept, and torch's linear on such a 3-D
    view broadcasts the 262,144 x 640 weight over the batch: measured on 2 cores, 8 rows take 11.9 s
    in bf16 against 0.04 s contiguous, 0.32 s against 0.17 s in fp32."""
    head = model.get_output_embeddings()
    if head is not None and not getattr(head, "_banklora_contiguous", False):
        head.register_forward_pre_hook(lambda _module, args, kwargs: ((args[0].contiguous(), *args[1:]), kwargs) if args else None,
                                       with_kwargs=True)
        head._banklora_contiguous = True


def int8_head(model) -> None:
    """Dynamic int8 quantization of the LM head in place (weights int8 per output row,
    activations quantized on the fly), on a plain model or inside a PeftModel. Only the head:
    with the decoder's layers in int8 too, Gemma's large activations (~8e5) lose their precision
    and the answers fall apart (measured: reference perplexity 27 -> 70-98)."""
    from torch.ao.nn.quantized.dynamic import Linear as Int8Linear
    from torch.ao.quantization import per_channel_dynamic_qconfig

    head = model.get_output_embeddings()
    rows = getattr(head, "token_adapter", None)  # an adapter trains some of the head's rows (the turn tokens): they stay fp32
    parent, name = (rows, "base_layer") if rows is not None else _parent_of(model, head)
    head = getattr(parent, name)
    if type(head) is not torch.nn.Linear:
        raise UsageError(f"--int8: the LM head is a {type(head).__name__}, not a plain linear layer (an adapter that trains it?); drop --int8")
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
        return decode_product(x, self.weight, self.bias, self.weight16)


def decode_product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                   weight16: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight^T + bias as DecodeLinear computes it (see there)."""
    out_features, in_features = weight.shape
    rows = x.numel() // in_features
    if rows > DecodeLinear.SMALL_ROWS or x.dtype != weight.dtype:
        return torch.nn.functional.linear(x, weight, bias)
    flat = x.reshape(rows, in_features)
    y = None
    if weight16 is not None and rows <= DecodeLinear.HALF_ROWS:
        y = torch.nn.functional.linear(flat.to(torch.float16), weight16).to(x.dtype)
        if not bool(torch.isfinite(y).all()):
            y = None
    if y is None:
        y = torch.mm(weight, flat.T).T
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], out_features)


def decode_linears(model, fp16: bool) -> None:
    """Every plain linear layer becomes a DecodeLinear; fp16 copies for all but the LM head (an
    fp16 head reads twice the bytes of the int8 one and measured slower)."""
    head = model.get_output_embeddings()
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.Linear:
                setattr(parent, name, DecodeLinear(child, fp16=fp16 and child is not head))


@dataclass(frozen=True)
class _Stack:
    a: torch.Tensor  # [sum of ranks, in]: every adapter's A, one under the other
    b: torch.Tensor  # [sum of ranks, out]: every adapter's (B * scaling)^T
    owners: tuple[str, ...]  # the adapter each of the stacked ranks belongs to
    decode: bool  # the base weight's product as DecodeLinear's (CPU)
    masks: dict  # (adapter_names, owners) -> [rows, 1, ranks] row mask, shared by the layers


def stack_adapters(model, decode: bool) -> int:
    """Every vanilla LoRA linear of a PeftModel answers a batch whose rows name their adapters
    (`adapter_names`, "__base__" for none) with its adapters stacked (module docstring); other
    calls keep PEFT's forward. DoRA and other variants, biased LoRA layers and non-linear bases
    keep PEFT's path. With decode, the LM head (when a plain linear) becomes a DecodeLinear.
    Returns how many LoRA layers were stacked."""
    from peft.tuners.lora import Linear as LoraLinear

    masks: dict = {}
    stacked = 0
    for module in model.modules():
        if (type(module) is not LoraLinear or module.lora_variant or type(module.base_layer) is not torch.nn.Linear
                or any(m.bias is not None for m in (*module.lora_A.values(), *module.lora_B.values()))):
            continue
        names = list(module.lora_A)
        with torch.no_grad():
            a = torch.cat([module.lora_A[n].weight for n in names])
            b = torch.cat([(module.lora_B[n].weight * module.scaling[n]).T for n in names]).contiguous()
        owners = tuple(n for n in names for _ in range(module.lora_A[n].weight.shape[0]))
        module._banklora_stack = _Stack(a, b, owners, decode, masks)
        module.forward = types.MethodType(_stacked_forward, module)
        stacked += 1
    from peft.utils.other import TrainableTokensWrapper

    for module in model.modules():
        if type(module) is TrainableTokensWrapper:
            module._banklora_decode = decode
            module.forward = types.MethodType(_stacked_tokens_forward, module)
    kernels.install_token_rows(model)  # calls without adapter_names (one adapter active)
    head = model.get_output_embeddings()
    if decode and type(head) is torch.nn.Linear:
        parent, name = _parent_of(model, head)
        setattr(parent, name, DecodeLinear(head, fp16=False))
    return stacked


def _stacked_tokens_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """A PEFT TrainableTokensWrapper (an embedding or LM head with trained token rows: Gemma's turn
    tokens) answering a batch whose rows name their adapters: the base layer's output once for the
    whole batch, then each adapter's rows replaced in its own batch rows (kernels.with_token_rows).
    PEFT computes the base once per adapter in the batch, each with a full copy of the matrix."""
    names = kwargs.get("adapter_names")
    layer = self.token_adapter
    if names is None or args or len(kwargs) > 1 or self.disable_adapters or layer.merged or self.training:
        return type(self).forward(self, x, *args, **kwargs)
    base = layer.base_layer
    linear = isinstance(base, torch.nn.Linear)
    out = decode_product(x, base.weight, base.bias) if linear and self._banklora_decode else base(x)
    for name in dict.fromkeys(names):
        if name not in layer.trainable_tokens_delta:  # "__base__", or an adapter without trained rows
            continue
        rows = layer.trainable_tokens_delta[name]
        mine = torch.tensor([i for i, n in enumerate(names) if n == name], device=x.device)
        ids = torch.tensor(layer.token_indices[name], device=x.device)
        out = out.index_copy(0, mine, kernels.with_token_rows(base, x.index_select(0, mine), out.index_select(0, mine), ids, rows))
    return out


def _stacked_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    names = kwargs.get("adapter_names")
    if names is None or args or len(kwargs) > 1 or self.disable_adapters or self.merged or self.training:
        return type(self).forward(self, x, *args, **kwargs)
    stack: _Stack = self._banklora_stack
    base = self.base_layer
    result = decode_product(x, base.weight, base.bias) if stack.decode else base(x)
    key = (tuple(names), stack.owners, x.dim())
    found = stack.masks.get(key)
    if found is None:
        if len(stack.masks) > 512:  # batch compositions seen; keep the cache small
            stack.masks.clear()
        rows = [[n == o for o in stack.owners] for n in names]
        mask = torch.tensor(rows, dtype=stack.a.dtype, device=x.device).reshape(len(names), *([1] * (x.dim() - 2)), len(stack.owners))
        found = stack.masks[key] = (mask, any(map(any, rows)))
    mask, used = found
    if not used:  # every row asks the base
        return result
    u = (x.to(stack.a.dtype) @ stack.a.T) * mask
    return result + (u @ stack.b).to(result.dtype)
