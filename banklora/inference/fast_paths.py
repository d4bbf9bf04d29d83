"""CPU fast paths for answering (chat, compare's speed checks, serving), applied by the loader.

`load()` stays the only loader; it checks a ServingSettings before loading and calls `apply` on
the loaded model. What each path does and costs (docs/performance.md):

- merge: a single adapter folded into the base weights (W + B @ A * scale): the same outputs to
  float rounding, without LoRA's extra matmuls at every layer.
- DecodeLinear (on CPU, for a plain model: merged or base): the few rows of a decoding step as
  W @ x^T over fp32 weights, and with fp16 weights an fp16 copy for one or two rows; over bf16
  weights (a CPU with native bf16) a lossless fp16 copy for one or two rows and F.linear for more.
- int8 head: the 262,144 x 640 LM head, the largest read per token, in int8 with one scale per
  output row. Works on a merged model and on a PeftModel with adapters beside the base.
- int8 weights (`--quantize int8`, bf16 models): for decoding steps of up to INT8_ROWS rows, the
  decoder's linear layers read weight-only int8 copies (one scale per output row; activations stay
  bf16, so Gemma's large ones keep their precision) and the LM head is a dynamic int8 linear (as
  the int8 head); a prompt's pass uses the bf16 weights, but its last position's logits (the first
  answer token) come from the int8 head, as a decoding step's do.
- stacked adapters (the server: a PeftModel with adapters beside the base, rows of one batch
  asking different ones through PEFT's `adapter_names`): each LoRA layer's adapters stacked into
  one A (sum of ranks x in) and one scaled B, so a mixed batch costs two small matmuls and a row
  mask per layer instead of PEFT's gather, two matmuls and scatter per adapter; the base weight's
  product, the layers no adapter targets and the LM head as DecodeLinear's. The same products in
  another summation order.
- a contiguous LM-head input, always (contiguous_head_input).
"""

from __future__ import annotations

import contextlib
import math
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
    int8_weights: bool = False
    """Decoding reads weight-only int8 copies of the decoder's weights and an int8 head (`--quantize int8`; CPU with native bf16)."""

    def check(self, *, training: bool, device: torch.device, adapters: int) -> None:
        """Refuse combinations that cannot work, before anything is loaded."""
        for wanted, what in ((self.int8_head, "int8"), (self.fp16_weights, "fp16"), (self.int8_weights, "int8")):
            if wanted and (training or device.type != "cpu"):
                raise UsageError(f"{what} weights are for CPU inference (chat, serving); on a GPU bf16 is already fast")
        if self.fp16_weights and adapters and not self.merged(adapters):
            raise UsageError("fp16 weights need the adapter merged (one adapter, merge=True)")
        if self.int8_weights and adapters and not self.merged(adapters) and not self.stacked:
            raise UsageError("--quantize int8 needs the adapter merged (chat) or the server's stacked adapters")
        if self.int8_weights and (self.int8_head or self.fp16_weights):
            raise UsageError("--quantize int8 already reads every layer in int8; drop --int8 and --fp16 (fast paths over fp32 weights)")
        if self.stacked and (training or self.merged(adapters)):
            raise UsageError("stacked adapters are for serving adapters unmerged beside their base")

    def merged(self, adapters: int) -> bool:
        """True when the loaded model ends up plain: one adapter merged, or a base alone."""
        return adapters == 0 or (self.merge and adapters == 1)


def serving_quantize(flag: str | None) -> bool:
    """--quantize for chat and serve: int8 (weight-only int8 copies for decoding) or nothing."""
    if flag not in (None, "int8"):
        hint = " (4bit is QLoRA, for training on CUDA)" if flag == "4bit" else ""
        raise UsageError(f"--quantize for answering takes int8 (got {flag!r}){hint}; leave it out for bf16 weights")
    return flag == "int8"


def apply(model, settings: ServingSettings, device: torch.device, adapters: int):
    """The loaded model with the fast paths of `settings` in place (for inference only)."""
    if settings.merge and adapters == 1:
        model = model.merge_and_unload()
    if settings.int8_head:
        int8_head(model)
    if device.type == "cpu" and settings.merged(adapters) and (settings.merge or settings.fp16_weights or settings.int8_weights):
        decode_linears(model, fp16=settings.fp16_weights, int8=settings.int8_weights)  # a plain model: no LoRA layers to keep intact
    elif settings.stacked:
        stack_adapters(model, decode=device.type == "cpu", int8=settings.int8_weights)
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
    where the model ties it). bf16 weights (a CPU with native bf16) take the same route with a
    lossless fp16 copy (decode_linears) and bf16's F.linear for 2-16 rows; with `--quantize int8`,
    up to INT8_ROWS rows read an int8 copy instead. Where oneDNN packs bf16 weights (packed_bf16),
    the packed copy takes every product the fp16 and int8 copies do not, prompts included.
    """

    HALF_ROWS, SMALL_ROWS, INT8_ROWS = 2, 16, 8

    def __init__(self, linear: torch.nn.Linear, fp16: bool, int8: bool = False, dynamic_int8: bool = False,
                 packed: torch.Tensor | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.register_buffer("weight16", linear.weight.detach().to(torch.float16) if fp16 else None, persistent=False)
        self.int8 = int8_weight(linear.weight) if int8 else None
        self.dynamic8 = _dynamic_int8(linear) if dynamic_int8 else None
        self.packed = packed  # packed_bf16's copy; not a buffer: oneDNN's layout is no state to save or move

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dynamic8 is not None and x.numel() // self.in_features <= self.INT8_ROWS:
            return self.dynamic8(x.float().contiguous())  # fp32 logits
        return decode_product(x, self.weight, self.bias, self.weight16, self.int8, self.packed)


def _dynamic_int8(linear: torch.nn.Linear) -> torch.nn.Module:
    """torch's dynamic int8 linear (fbgemm: int8 weights with one scale per output row, each input
    row quantized on the fly, VNNI products) from a copy of the layer in fp32: the LM head of
    `--quantize int8`, 8.6 ms for one row of the 262,144 x 640 head against 14 ms in fp16 and 17
    ms in weight-only int8 on this CPU."""
    from torch.ao.nn.quantized.dynamic import Linear as Int8Linear
    from torch.ao.quantization import per_channel_dynamic_qconfig

    fp32 = torch.nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None)
    with torch.no_grad():
        fp32.weight.copy_(linear.weight)
        if linear.bias is not None:
            fp32.bias.copy_(linear.bias)
    fp32.qconfig = per_channel_dynamic_qconfig
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's notice that its quantized tensor types will move
        return Int8Linear.from_float(fp32)


@dataclass(frozen=True)
class Int8Weight:
    """A weight in int8 with one bf16 scale per output row (torch's weight-only int8 product takes
    bf16 inputs: on this AVX512-BF16 CPU ~0.3x the time of a bf16 product for 1-8 rows, slower
    from 16 rows on, and ~10x slower with fp32 inputs)."""

    values: torch.Tensor  # [out, in] int8
    scales: torch.Tensor  # [out] bf16


def int8_weight(weight: torch.Tensor) -> Int8Weight:
    """Symmetric per-row int8: each row scaled so its largest |w| is about 127, rounded against the
    bf16 scale the product uses, so every weight is within half a step of its int8 value."""
    w = weight.detach().float()
    scales = (w.abs().amax(dim=1) / 127).to(torch.bfloat16).clamp(min=torch.finfo(torch.bfloat16).tiny)
    values = torch.round(w / scales.float()[:, None]).clamp(-127, 127).to(torch.int8)
    return Int8Weight(values.contiguous(), scales)


def packed_bf16(weight: torch.Tensor) -> torch.Tensor | None:
    """A bf16 weight in oneDNN's blocked layout, as torch.compile's freezing packs a CPU model's linear
    layers (torch.ops.mkldnn._reorder_linear_weight); None where this torch or CPU has no such path
    (an fp32 weight, no oneDNN bf16: the products stay F.linear's). Its products (_linear_pointwise)
    equal F.linear's to the bit on this CPU (the same oneDNN kernels, without re-laying the weight out
    at every call: tested) and take 0.4-0.6x its time for 1-16 rows, 0.9x for a prompt's 200 (measured,
    2-core AVX512-BF16: the 262,144 x 640 head 14.5 ms against 31.6 for 8 rows, 19.5 against 37.3 for 16)."""
    mkldnn = getattr(torch.ops, "mkldnn", None)
    if weight.dtype != torch.bfloat16 or weight.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return None
    try:
        if not mkldnn._is_mkldnn_bf16_supported():
            return None
        return mkldnn._reorder_linear_weight(weight.detach(), DecodeLinear.SMALL_ROWS)
    except (AttributeError, RuntimeError):  # a torch without these ops
        return None


@contextlib.contextmanager
def packed_linears(model):
    """While the block runs, every frozen bf16 linear layer of `model` (the base's projections under
    LoRA, the LM head) answers from oneDNN's packed copy of its weight (packed_bf16): the same
    products, to the bit, in about half the time for a decoding step's rows. For answering with a
    PeftModel as it is (compare's answers, the turn-end check after training), where `load` has not
    put DecodeLinears in; packing the 270M's weights takes ~0.5 s and holds a second bf16 copy (535
    MB) until the block ends. fp32 weights (and a CPU or torch without oneDNN bf16) are left as they are."""
    changed = []
    try:
        for module in model.modules():
            if type(module) is torch.nn.Linear and not module.weight.requires_grad and "forward" not in vars(module):  # not twice
                packed = packed_bf16(module.weight)
                if packed is not None:
                    module._banklora_packed = packed
                    module.forward = types.MethodType(_packed_forward, module)
                    changed.append(module)
        yield model
    finally:
        for module in changed:
            del module.forward, module._banklora_packed  # back to the class's forward


def _packed_forward(self, x: torch.Tensor) -> torch.Tensor:
    return decode_product(x, self.weight, self.bias, packed=self._banklora_packed)


def decode_product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                   weight16: torch.Tensor | None = None, int8: Int8Weight | None = None,
                   packed: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight^T + bias as DecodeLinear computes it (see there)."""
    out_features, in_features = weight.shape
    rows = x.numel() // in_features
    if x.dtype != weight.dtype:
        return torch.nn.functional.linear(x, weight, bias)
    quantized = int8 is not None and rows <= DecodeLinear.INT8_ROWS and x.dtype == torch.bfloat16
    half = weight16 is not None and rows <= DecodeLinear.HALF_ROWS
    if packed is not None and not (quantized or half) and not torch.is_grad_enabled():  # oneDNN's packed op has no backward
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(rows, in_features), packed, bias, "none", [], "")
        return y.reshape(*x.shape[:-1], out_features)
    if rows > DecodeLinear.SMALL_ROWS:
        return torch.nn.functional.linear(x, weight, bias)
    flat = x.reshape(rows, in_features)
    y = None
    if quantized:
        y = torch._weight_int8pack_mm(flat.contiguous(), int8.values, int8.scales)
    elif half:
        y = torch.nn.functional.linear(flat.to(torch.float16), weight16)
        # one fp32 sum says whether any entry overflowed (inf or nan; finite fp16 values cannot sum past fp32's range):
        # a quarter of isfinite().all()'s time, which cost ~4 ms of a ~50 ms token
        y = y.to(x.dtype) if math.isfinite(float(y.sum(dtype=torch.float32))) else None
    if y is None and weight.dtype == torch.bfloat16:  # bf16's own kernels: F.linear measured as fast or faster than W @ x^T
        y = torch.nn.functional.linear(flat, weight)
    if y is None:
        y = torch.mm(weight, flat.T).T
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], out_features)


def decode_linears(model, fp16: bool, int8: bool = False) -> None:
    """Every plain linear layer becomes a DecodeLinear. fp16 copies: of bf16 weights always, head
    included (lossless: fp16 carries bf16's 8 significant bits, and the embedded 270M's weights all
    lie in its normal range, 6e-5 to 65504, measured; a smaller value is off by at most fp16's
    subnormal step, 6e-8); a single row then reads at the memory's speed, 14 ms for the head against
    33 in bf16 on this CPU; of fp32 weights when asked (lossy), all but the LM head (an fp16 head reads twice
    the bytes of the int8 one). int8 (`--quantize int8`, bf16 weights): no fp16 copies; for
    decoding steps, weight-only int8 copies of the decoder's layers and the head as torch's dynamic
    int8 linear (_dynamic_int8)."""
    head = model.get_output_embeddings()
    for parent, name, child in _text_linears(model):
        setattr(parent, name, decode_layer(child, int8, head=child is head, lossy_fp16=fp16 and child is not head))


def decode_layer(linear: torch.nn.Linear, int8: bool, head: bool = False, lossy_fp16: bool = False) -> DecodeLinear:
    """The DecodeLinear of one layer: bf16 weights get oneDNN's packed copy where there is one (not with int8), and a
    lossless fp16 copy for one or two rows where there is none and for the LM head (one row of the
    head: 10.6 ms in fp16, 12.2 packed; a decoder layer's row is faster packed); with int8 no fp16 copy
    but the int8 one (the head's: dynamic int8); lossy_fp16 asks an fp16 copy of fp32 weights."""
    packed = None if int8 else packed_bf16(linear.weight)  # --quantize int8 is asked for its smaller footprint
    lossless = linear.weight.dtype == torch.bfloat16 and not int8 and (head or packed is None)
    return DecodeLinear(linear, fp16=lossless or lossy_fp16, int8=int8 and not head, dynamic_int8=int8 and head, packed=packed)


def _text_linears(model) -> list[tuple[torch.nn.Module, str, torch.nn.Linear]]:
    """(parent, name, layer) of every plain linear layer that text generation reads: not a vision
    tower's or its projector's (Gemma 3 4B and larger), not inside a LoRA layer (its base layer and
    its A and B)."""
    from peft.tuners.lora import LoraLayer

    inside = {id(m) for layer in model.modules() if isinstance(layer, LoraLayer) for m in layer.modules()}
    found = []
    for path, parent in model.named_modules():
        if "vision_tower" in path or "multi_modal_projector" in path or id(parent) in inside:
            continue
        for name, child in parent.named_children():
            if type(child) is torch.nn.Linear and id(child) not in inside:
                found.append((parent, name, child))
    return found


@dataclass(frozen=True)
class _Stack:
    a: torch.Tensor  # [sum of ranks, in]: every adapter's A, one under the other
    b: torch.Tensor  # [sum of ranks, out]: every adapter's (B * scaling)^T
    owners: tuple[str, ...]  # the adapter each of the stacked ranks belongs to
    decode: bool  # the base weight's product as DecodeLinear's (CPU)
    int8: Int8Weight | None  # the base weight's int8 copy (--quantize int8)
    weight16: torch.Tensor | None  # the base weight's lossless fp16 copy (bf16 weights, one or two rows)
    packed: torch.Tensor | None  # the base weight in oneDNN's layout (packed_bf16)
    masks: dict  # (adapter_names, owners) -> [rows, 1, ranks] row mask, shared by the layers


def stack_adapters(model, decode: bool, int8: bool = False) -> int:
    """Every vanilla LoRA linear of a PeftModel answers a batch whose rows name their adapters
    (`adapter_names`, "__base__" for none) with its adapters stacked (module docstring); other
    calls keep PEFT's forward. DoRA and other variants, biased LoRA layers and non-linear bases
    keep PEFT's path. With decode, the LM head (a plain linear, or the base layer of a head with
    trained rows) becomes a DecodeLinear. Returns how many LoRA layers were stacked."""
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
        base = decode_layer(module.base_layer, int8) if decode else None  # its copies; the layer itself stays in place
        module._banklora_stack = _Stack(a, b, owners, decode, base.int8 if base else None, base.weight16 if base else None,
                                        base.packed if base else None, masks)
        module.forward = types.MethodType(_stacked_forward, module)
        stacked += 1
    from peft.utils.other import TrainableTokensWrapper

    for module in model.modules():
        if type(module) is TrainableTokensWrapper:
            module._banklora_decode = decode
            module.forward = types.MethodType(_stacked_tokens_forward, module)
    kernels.install_token_rows(model)  # calls without adapter_names (one adapter active)
    head = model.get_output_embeddings()
    rows = getattr(head, "token_adapter", None)  # an adapter trains some of the head's rows (the turn tokens): its base layer
    parent, name = (rows, "base_layer") if rows is not None else _parent_of(model, head)
    head = getattr(parent, name)
    if decode:  # the decoder's layers no adapter targets: the same copies as their neighbours'
        for owner, child_name, child in _text_linears(model):
            if child is not head:
                setattr(owner, child_name, decode_layer(child, int8))
    if decode and type(head) is torch.nn.Linear:
        setattr(parent, name, decode_layer(head, int8, head=True))
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
        mine_x = x.index_select(0, mine)
        if not isinstance(base, torch.nn.Embedding):  # an LM head: only its rows' k trained logits are written, in place
            # (copying whole rows of 262,144 logits out and back cost a 16-row decoding step ~20 ms, measured)
            values = (mine_x.to(rows.dtype) @ rows.T).to(out.dtype)  # (m, ..., k), as with_token_rows computes them
            for j, token in enumerate(layer.token_indices[name]):
                out[mine, ..., token] = values[..., j]
        else:
            out = out.index_copy(0, mine, kernels.with_token_rows(base, mine_x, out.index_select(0, mine), ids, rows))
    return out


def _stacked_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    names = kwargs.get("adapter_names")
    if names is None or args or len(kwargs) > 1 or self.disable_adapters or self.merged or self.training:
        return type(self).forward(self, x, *args, **kwargs)
    stack: _Stack = self._banklora_stack
    base = self.base_layer
    result = decode_product(x, base.weight, base.bias, stack.weight16, stack.int8, stack.packed) if stack.decode else base(x)
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
