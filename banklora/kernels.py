"""Training kernels that hold less in memory than the layers they stand in for, with the same math.

Plain PyTorch autograd Functions, installed on a PEFT model for training by `install`:

- LoRA's update, dropout(x) @ A^T @ B^T * scale, as one function (_LoraDelta). PEFT's layers keep,
  for every adapted projection, a float dropout mask and the dropped copy of x (8 bytes per
  element); this keeps x itself, shared by the projections that read the same input (q/k/v,
  gate/up), and a bool mask (1 byte), and rebuilds the dropped x in backward.
- Gemma's MLP gate, gelu_tanh(gate) * up (_GeluMul): keeps gate and up, and recomputes the gelu
  in backward, where autograd would also keep the gelu's output.
- Trained token rows (PEFT's trainable tokens on the tied embedding / LM head): the base layer's
  output with those tokens' rows replaced (with_token_rows), where PEFT copies the whole
  embedding matrix at every call and takes a dense (V, H) gradient through it.

Forward values are the same operations as the modules' own; gradients are equal to autograd's
within float rounding (tested). The adapter stays a plain PEFT adapter: only the forward of the
modules changes, not their parameters.
"""

from __future__ import annotations

import logging
import types

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)


def keep_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    """Dropout's mask for x: True with probability 1 - p, each element drawn independently. A uniform
    draw compared with p: 1.8x faster on CPU than bernoulli_ into a bool tensor (measured, 2 cores:
    4.2 vs 7.6 ms for 600 x 2048), which had cost ~12% of a bf16 training step."""
    return torch.rand(x.shape, device=x.device) >= p


class _LoraDelta(torch.autograd.Function):
    """(dropout(x) @ A^T) @ B^T * scale, for x (..., in), A (r, in), B (out, r)."""

    @staticmethod
    def forward(ctx, x, a, b, scale: float, p: float, training: bool):
        # in the adapter's dtype (fp32) under bf16 autocast too: the rank-r products cost little, and
        # backward (which autocast does not cover) then meets the dtypes forward used
        with torch.autocast(x.device.type, enabled=False):
            keep = keep_mask(x, p) if training and p > 0 else None
            dropped = x * keep * (1 / (1 - p)) if keep is not None else x
            u = dropped @ a.T  # (..., r)
            ctx.save_for_backward(x, keep, u, a, b)
            ctx.scale, ctx.p = scale, p
            return (u @ b.T) * scale

    @staticmethod
    def backward(ctx, grad):
        x, keep, u, a, b = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])  # (N, out)
        u2 = u.reshape(-1, u.shape[-1])  # (N, r)
        grad_b = (g.T @ u2) * ctx.scale  # (out, r)
        gu = (g @ b) * ctx.scale  # (N, r)
        x2 = x.reshape(-1, x.shape[-1])
        if keep is not None:
            x2 = x2 * keep.reshape(x2.shape) * (1 / (1 - ctx.p))
        grad_a = gu.T @ x2  # (r, in)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = gu @ a
            if keep is not None:
                grad_x = grad_x * keep.reshape(grad_x.shape) * (1 / (1 - ctx.p))
            grad_x = grad_x.reshape(x.shape)
        return grad_x, grad_a, grad_b, None, None, None


class _GeluMul(torch.autograd.Function):
    """gelu_tanh(gate) * up, keeping only gate and up for backward."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return F.gelu(gate, approximate="tanh") * up

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        grad_gate = torch.ops.aten.gelu_backward(grad * up, gate, approximate="tanh")
        return grad_gate, grad * F.gelu(gate, approximate="tanh")


def _lora_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """PEFT's lora.Linear forward for one vanilla adapter, through _LoraDelta."""
    if self.disable_adapters or self.merged or kwargs.get("adapter_names") is not None or len(self.active_adapters) != 1:
        return type(self).forward(self, x, *args, **kwargs)
    name = self.active_adapters[0]
    result = self.base_layer(x, *args, **kwargs)
    if name not in self.lora_A:
        return result
    a, b, dropout = self.lora_A[name].weight, self.lora_B[name].weight, self.lora_dropout[name]
    p = dropout.p if isinstance(dropout, torch.nn.Dropout) else 0.0
    delta = _LoraDelta.apply(x.to(a.dtype), a, b, self.scaling[name], p, self.training)
    return (result + delta).to(result.dtype)


def _gelu_mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(_GeluMul.apply(self.gate_proj(x), self.up_proj(x)))


def with_token_rows(layer, x: torch.Tensor, base: torch.Tensor, ids: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The output of a layer whose token rows `ids` (k,) are replaced by `rows` (k, H), from its
    base output `base`: for an embedding, the positions holding those tokens read their row
    (times the layer's embedding scale: Gemma scales inside the module); for an LM head, those
    tokens' logits are x @ rows^T. Same values as PEFT's TrainableTokensLayer, which copies the
    whole (V, H) matrix with the rows replaced at every call (671 MB for Gemma 3 270M in fp32)."""
    if isinstance(layer, torch.nn.Embedding):
        hit = x[..., None] == ids  # (..., k)
        scale = getattr(layer, "embed_scale", 1.0)
        trained = rows[hit.to(torch.uint8).argmax(-1)] * (scale.to(rows.dtype) if torch.is_tensor(scale) else scale)
        return torch.where(hit.any(-1, keepdim=True), trained.to(base.dtype), base)
    rows_out = (x.to(rows.dtype) @ rows.T).to(base.dtype)
    if not torch.is_grad_enabled():  # answering: `base` is the layer's fresh output, written in place (no copy of all the logits)
        return base.index_copy_(-1, ids, rows_out)
    return base.index_copy(-1, ids, rows_out)


def _token_rows_forward(self, x: torch.Tensor, active_adapters, *args, **kwargs) -> torch.Tensor:
    """PEFT's TrainableTokensLayer.forward_adapters through with_token_rows (one adapter, not merged)."""
    names = [a for a in active_adapters if a in self.trainable_tokens_delta]
    if not names and not (self.disable_adapters or self.merged or args or kwargs):
        return self.base_layer(x)  # an adapter without token rows, beside others with them (PEFT looks its rows up and fails)
    if self.disable_adapters or self.merged or len(names) != 1 or args or kwargs:
        return type(self).forward_adapters(self, x, active_adapters, *args, **kwargs)
    rows = self.trainable_tokens_delta[names[0]]
    ids = torch.tensor(self.token_indices[names[0]], device=x.device)
    return with_token_rows(self.base_layer, x, self.base_layer(x), ids, rows)


def install_token_rows(peft_model) -> int:
    """Trained token rows (PEFT's trainable tokens) through with_token_rows, in training and in
    inference, PEFT's mixed batches included. Returns how many layers were changed."""
    from peft.tuners.trainable_tokens import TrainableTokensLayer

    changed = 0
    for module in peft_model.modules():
        if type(module) is TrainableTokensLayer:  # over an embedding, or a head (a plain linear, or the int8 one)
            module.forward_adapters = types.MethodType(_token_rows_forward, module)
            changed += 1
    return changed


def install(peft_model) -> int:
    """Route a PEFT model's vanilla LoRA linears and Gemma's gelu_tanh MLPs through the kernels
    above. DoRA, bias-trained, and quantized layers keep PEFT's own forward. Returns how many
    modules were changed."""
    from peft.tuners.lora import Linear as LoraLinear

    changed = install_token_rows(peft_model)
    for module in peft_model.modules():
        if (
            type(module) is LoraLinear
            and not module.lora_variant
            and type(module.base_layer) is torch.nn.Linear
            and all(m.bias is None for m in (*module.lora_A.values(), *module.lora_B.values()))
        ):
            module.forward = types.MethodType(_lora_forward, module)
            changed += 1
        elif (
            type(module).__name__.endswith("MLP")
            and all(hasattr(module, n) for n in ("gate_proj", "up_proj", "down_proj"))
            and getattr(getattr(module, "config", None), "hidden_activation", None) == "gelu_pytorch_tanh"
        ):
            module.forward = types.MethodType(_gelu_mlp_forward, module)
            changed += 1
    return changed


def return_freed_memory() -> None:
    """--low-memory: allocations of 1 MiB and more (activations) get their own mappings, returned
    to the OS when freed, instead of glibc's heap, whose fragments otherwise keep ~800 MiB of the
    270M model's peak resident. Costs page faults: ~0.8x the step speed (measured, 2 cores)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        if libc.mallopt(-3, 1 << 20) != 1:  # M_MMAP_THRESHOLD
            raise OSError("mallopt refused M_MMAP_THRESHOLD")
    except (OSError, AttributeError) as exc:  # not glibc (macOS, musl): nothing to tune
        log.warning("--low-memory: the allocator could not be tuned here (%s); only the smaller LM-head chunks apply", exc)
