"""The training objective: next-token cross-entropy on answer tokens only, the LM head in chunks.

Used by training (AnswerLoss) and by evaluation (answer_nll: the reference answer's mean
negative log-likelihood), so both measure the same quantity. The LM head (262,144 x 640 for
Gemma 3 270M) is ~60% of the model's FLOPs and its fp32 logits cost 1 MiB per token, so logits are
computed only at answer positions, a chunk at a time: exact, and the biggest CPU win.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from banklora.data.format import IGNORE_INDEX

HEAD_CHUNK = 128  # answer tokens per LM-head chunk: (128, 262,144) fp32 logits = 128 MiB
LOW_MEMORY_HEAD_CHUNK = 64  # --low-memory: 64 MiB chunks (measured: 0.9x the speed, 170 MiB less at peak)


def _loss_and_softmax_(logits: torch.Tensor, targets: torch.Tensor, softmax: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token cross-entropy and softmax of `logits` (V, n): one column per token, the softmax
    written over the logits in place (one exp pass and one (V, n) buffer, where cross_entropy
    followed by softmax takes two of each). The loss is log-sum-exp minus the target's logit, as
    log_softmax computes it. softmax=False: the loss alone (the logits are left as exponentials)."""
    target_logit = logits.gather(0, targets[None, :])[0]
    top = logits.amax(dim=0, keepdim=True)
    probs = logits.sub_(top).exp_()
    total = probs.sum(dim=0, keepdim=True)
    loss = (top + total.log())[0] - target_logit
    return loss, probs.div_(total) if softmax else None


def repeat_candidates(targets: torch.Tensor, keep: torch.Tensor, context: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """For each answer token, the tokens its answer already said: the candidates of token-level
    unlikelihood training (Welleck et al. 2019, "Neural text generation with unlikelihood training").

    `targets` (B, T) and `keep` (B, T) as token_losses has them. Returns (candidates (N, K), mask
    (N, K)) in the order of targets[keep]: row i lists, once each, the tokens that came before
    token i in the same answer, except token i itself (saying a token again where the reference
    does is right). Only the answer's own tokens count, not the prompt's (an answer repeats its
    question's words legitimately), and in a conversation each answer (a run of kept positions)
    counts alone.

    With `context` c > 0, only the tokens that followed the same c tokens earlier in the answer:
    where the answer is at "...x y" and said "x y z" before, z is the candidate (what a loop would
    copy next), and words the answer merely uses again elsewhere are not pushed down.
    """
    rows = []
    for target, kept in zip(targets, keep):
        answer = target[kept]
        starts = kept & ~torch.cat([kept.new_zeros(1), kept[:-1]])  # where each answer of the row begins
        segment = starts.cumsum(0)[kept]
        n = answer.numel()
        same = answer[:, None] == answer[None, :]  # (n, n)
        earlier = torch.ones(n, n, dtype=torch.bool, device=answer.device).tril(-1) & (segment[:, None] == segment[None, :])  # j < i, same answer
        candidate = earlier & ~same
        if context:
            index = torch.arange(n, device=answer.device)
            offset = index - torch.cummax(torch.where(starts[kept], index, 0), dim=0).values  # position within its answer
            for k in range(1, context + 1):  # token i-k equals token j-k, both inside the answer
                shifted = torch.nn.functional.pad(same, (k, 0, k, 0))[:n, :n]
                candidate &= shifted & (offset >= k)[:, None] & (offset >= k)[None, :]
        said_before = (same & earlier).T  # [j', j]: j' < j says the same token as j, in the same answer
        repeated = (candidate.to(torch.float32) @ said_before.to(torch.float32)) > 0  # an earlier candidate of row i is the same token
        rows.append((candidate & ~repeated, answer))
    width = max([int(m.sum(dim=1).max()) for m, _ in rows if m.numel()] + [1])
    candidates, masks = [], []
    for mask, answer in rows:
        if not answer.numel():
            continue
        mask = torch.nn.functional.pad(mask, (0, max(0, width - mask.shape[1])))  # an answer shorter than the widest row's candidates
        order = torch.argsort(mask.to(torch.int8), dim=1, descending=True, stable=True)[:, :width]  # the candidates first
        taken = mask.gather(1, order)
        candidates.append(torch.where(taken, answer[order.clamp(max=answer.numel() - 1)], torch.zeros_like(order)))
        masks.append(taken)
    if not candidates:
        return targets.new_zeros(0, width), keep.new_zeros(0, width)
    return torch.cat(candidates), torch.cat(masks)


def _add_unlikelihood(dlogits: torch.Tensor, alpha, candidates: torch.Tensor, mask: torch.Tensor,
                      scored: torch.Tensor | None = None) -> torch.Tensor:
    """Token-level unlikelihood of a chunk, given the softmax (V, n) in `dlogits`: returns
    -sum log(1 - p(c)) over each token's candidates, (n,), and adds alpha x its gradient with
    respect to the (capped) logits to `dlogits` in place (no second (V, n) buffer):
    d(-log(1 - p_c)) / dz = p_c / (1 - p_c) x (onehot_c - p).
    alpha: a number, or one per token (n,). scored (n,): 1 where the token's cross-entropy counts,
    0 where it does not (a generated answer's repeat, pushed down alone): there the softmax, which
    is the cross-entropy's share of `dlogits`, is taken out."""
    p = dlogits.gather(0, candidates.T).clamp(max=1 - 1e-6) * mask.T  # (K, n); masked slots read token 0 and count 0
    loss = -torch.log1p(-p).sum(dim=0)
    w = alpha * (p / (1 - p))
    keep = 1 if scored is None else scored[None, :]
    dlogits.mul_(keep - w.sum(dim=0, keepdim=True))
    dlogits.scatter_add_(0, candidates.T, w)
    return loss


class _ChunkedHeadLoss(torch.autograd.Function):
    """Cross-entropy of a frozen LM head over hidden states, HEAD_CHUNK rows at a time.

    Forward computes each chunk's logits, its per-token loss and, at once, the loss's gradient
    with respect to the hidden state, W^T @ ((softmax - onehot) x softcap'), then drops the
    logits. Backward only scales those stored (N, H) gradients. So the step never holds more than
    one chunk of logits (vs 1 MiB per token for fp32 logits kept for backward), and nothing is
    computed twice. The head's weight is frozen in LoRA training, so it needs no gradient, except
    for the k rows of trained tokens (`index`, `rows` (k, H): Gemma's turn tokens), whose logits
    come from `rows` and whose gradient, dlogits[index] @ h, is kept per token as (k, N).
    Logits are laid out (V, n), vocabulary first: W @ h^T and W^T @ P run 1.3-1.7x faster on CPU
    than h @ W^T and P @ W (measured on 2 cores), for the same products.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, cap, chunk, index=None, rows=None, unlikely=None):
        losses, grads, row_grads, plain = [], [], [], []
        trained = index is not None
        ctx.trained = trained and ctx.needs_input_grad[6]
        backward = ctx.needs_input_grad[0] or ctx.trained
        if trained:
            shift = (rows.to(weight.dtype) - weight.index_select(0, index))  # (k, H): trained rows minus the frozen ones
        # One chunk's logits live in buffers allocated once per call and reused by every chunk: a fresh
        # (V, n) tensor per chunk is 64-128 MiB of new pages, and faulting them in cost as much as a
        # bf16 product's own time on CPU (measured: 214 vs 106 ms for a chunk's W @ h^T, 35 vs 6 ms
        # for its conversion to fp32). A bf16 head's products go to `low`, softmax and loss to `wide` in fp32.
        size = weight.shape[0] * min(chunk, hidden.shape[0])
        wide = torch.empty(size, dtype=torch.float32, device=hidden.device)
        staged = weight.dtype != torch.float32
        narrow = torch.empty(size, dtype=weight.dtype, device=hidden.device) if staged else None
        for i in range(0, hidden.shape[0], chunk):
            h, t = hidden[i : i + chunk], targets[i : i + chunk]
            shape = (weight.shape[0], len(t))  # (V, n)
            logits = wide[: shape[0] * shape[1]].view(shape)
            low = narrow[: logits.numel()].view(shape) if staged else logits
            torch.mm(weight, h.T, out=low)
            if trained:
                low.index_copy_(0, index, torch.mm(rows.to(weight.dtype), h.T))
            if staged:
                logits.copy_(low)
            if cap:
                logits.div_(cap).tanh_().mul_(cap)
            if not backward:  # validation, reference NLL: log-sum-exp over the vocabulary minus the target's logit
                # (cross_entropy on the transposed (n, V) view takes a strided path: measured 2.3x slower here)
                losses.append(_loss_and_softmax_(logits, t, softmax=False)[0])  # in place: no second (V, n) tensor
                continue
            slope = 1 - (logits / cap) ** 2 if cap else None  # d(cap * tanh(z / cap)) / dz, before the softmax overwrites them
            loss, dlogits = _loss_and_softmax_(logits, t)
            plain.append(loss)
            scored = None
            if unlikely is not None:  # (alpha, candidates (N, K), mask (N, K), scored): the repeats' unlikelihood joins the loss
                alpha, candidates, mask, scored = unlikely
                alpha = alpha[i : i + chunk] if torch.is_tensor(alpha) else alpha
                scored = None if scored is None else scored[i : i + chunk]
                repeats = _add_unlikelihood(dlogits, alpha, candidates[i : i + chunk], mask[i : i + chunk], scored)
                loss = (loss if scored is None else loss * scored) + alpha * repeats
            dlogits[t, torch.arange(len(t), device=t.device)] -= 1 if scored is None else scored  # softmax - onehot
            losses.append(loss)
            if cap:
                dlogits *= slope
            if staged:
                dlogits = low.copy_(dlogits)
            grad = torch.mm(weight.T, dlogits).T  # (n, H)
            if trained:
                d_rows = dlogits.index_select(0, index)  # (k, n)
                grad = grad + torch.mm(d_rows.T, shift)  # the trained rows' share of W^T @ dlogits
                row_grads.append(d_rows)
            grads.append(grad.to(hidden.dtype))
        ctx.save_for_backward(torch.cat(grads) if grads else hidden.new_zeros(0),
                              torch.cat(row_grads, dim=1) if ctx.trained else None, hidden if ctx.trained else None)
        empty = hidden.new_zeros(0, dtype=torch.float32)
        cross_entropy = torch.cat(plain) if plain else torch.cat(losses) if losses else empty
        ctx.mark_non_differentiable(cross_entropy)
        return (torch.cat(losses) if losses else empty), cross_entropy

    @staticmethod
    def backward(ctx, grad_losses, _grad_cross_entropy):
        grads, row_grads, hidden = ctx.saved_tensors
        grad_rows = None
        if ctx.trained:  # (k, N) @ (N, H): each token's share, scaled by its loss's gradient
            grad_rows = torch.mm(row_grads * grad_losses[None, :].to(row_grads.dtype), hidden.to(row_grads.dtype))
        return grads * grad_losses[:, None].to(grads.dtype), None, None, None, None, None, grad_rows, None


def token_losses(model, batch: dict[str, torch.Tensor], head_chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy at each answer token, (N,), and the mask that placed them, (B, T-1).

    Logits are computed only at the N answer positions (the LM head never sees prompt or
    padding), in chunks, with the gradient taken as they go (_ChunkedHeadLoss). Exact: equal to
    the model's own loss and gradients within float rounding (tested).
    """
    causal_lm, rows, targets, keep = _answer_states(model, batch)
    return head_losses(causal_lm, rows, targets[keep], head_chunk), keep


def unlikelihood_losses(model, batch: dict[str, torch.Tensor], alpha: float, head_chunk: int | None = None,
                        context: int = 0, sequence_alpha: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training with unlikelihood: at each answer token, (N,) objectives, cross-entropy
    + alpha x -sum log(1 - p(c)) over the tokens c the answer already said (repeat_candidates;
    with `context`, only those that followed the same tokens before), the (N,) cross-entropies
    alone (no gradient: what the log reports), and the (N,) mask of the tokens whose
    cross-entropy counts. Lowering the probability of saying again what was said is what stops
    greedy answers looping.

    With batch["negatives"] (B, T), sequence-level unlikelihood (Welleck et al. 2019, section 5.2):
    the model's own answers that looped, where each token a loop repeated is pushed down,
    sequence_alpha x -log(1 - p(token)), and no cross-entropy is taken (the answer is not a
    reference). Those tokens come after the references' in the (N,) outputs' order of positions."""
    causal_lm, hidden = _final_states(model, batch)
    targets = batch["labels"][:, 1:]  # position t predicts token t+1
    keep = targets != IGNORE_INDEX
    n = int(keep.sum())
    candidates, mask = repeat_candidates(targets, keep, context) if alpha else (targets.new_zeros(n, 1), keep.new_zeros(n, 1))
    negatives = batch.get("negatives")
    if negatives is None:
        objective, cross_entropy = head_losses(causal_lm, hidden[:, :-1][keep], targets[keep], head_chunk, unlikely=(alpha, candidates, mask, None))
        return objective, cross_entropy, torch.ones_like(cross_entropy, dtype=torch.bool)
    pushed = negatives[:, 1:] != IGNORE_INDEX  # (B, T-1): position t predicts token t+1
    m = int(pushed.sum())
    rows = torch.cat([hidden[:, :-1][keep], hidden[:, :-1][pushed]])
    wanted = torch.cat([targets[keep], torch.zeros(m, dtype=targets.dtype, device=targets.device)])
    candidates = torch.cat([candidates, torch.nn.functional.pad(negatives[:, 1:][pushed][:, None], (0, candidates.shape[1] - 1))])
    mask = torch.cat([mask, torch.nn.functional.pad(torch.ones(m, 1, dtype=torch.bool, device=mask.device), (0, mask.shape[1] - 1))])
    scored = torch.cat([torch.ones(n, device=rows.device), torch.zeros(m, device=rows.device)])
    weights = torch.cat([torch.full((n,), float(alpha), device=rows.device), torch.full((m,), float(sequence_alpha), device=rows.device)])
    objective, cross_entropy = head_losses(causal_lm, rows, wanted, head_chunk, unlikely=(weights, candidates, mask, scored))
    return objective, cross_entropy, scored.bool()


def _final_states(model, batch: dict[str, torch.Tensor]):
    """(the causal LM, the final hidden states (B, T, H))."""
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    return causal_lm, causal_lm.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state


def _answer_states(model, batch: dict[str, torch.Tensor]):
    """(the causal LM, the final hidden states at answer positions (N, H), the next tokens (B, T-1), their mask (B, T-1))."""
    causal_lm, hidden = _final_states(model, batch)  # (B, T, H)
    targets = batch["labels"][:, 1:]  # position t predicts token t+1
    keep = targets != IGNORE_INDEX  # (B, T-1)
    return causal_lm, hidden[:, :-1][keep], targets, keep


def head_losses(causal_lm, rows: torch.Tensor, wanted: torch.Tensor, head_chunk: int | None = None, unlikely=None):
    """Next-token cross-entropy of the LM head (softcapped where the model caps its logits) at the
    final hidden states `rows` (N, H) against the tokens `wanted` (N,): (N,) losses.
    With `unlikely` = (alpha (a number or (N,)), candidates (N, K), mask (N, K), scored ((N,) 1 or 0:
    whether the token's cross-entropy counts) or None): (objectives, cross-entropies), as
    unlikelihood_losses says."""
    head, trained = token_rows(causal_lm.lm_head)
    cap = getattr(causal_lm.config, "final_logit_softcapping", None)
    if type(head) is not torch.nn.Linear or head.weight.requires_grad or head.bias is not None:  # int8, trained or biased head
        logits = causal_lm.lm_head(rows).float()
        logits = torch.tanh(logits / cap) * cap if cap else logits
        losses = F.cross_entropy(logits, wanted, reduction="none")
        if unlikely is None:
            return losses
        alpha, candidates, mask, scored = unlikely
        p = logits.softmax(dim=-1).gather(1, candidates).clamp(max=1 - 1e-6) * mask
        counted = losses if scored is None else losses * scored
        return counted - alpha * torch.log1p(-p).sum(dim=1), losses.detach()
    device = rows.device.type
    chunk = head_chunk or HEAD_CHUNK
    if torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) == torch.bfloat16 and head.weight.dtype == torch.float32:
        # bf16 autocast (mixed-precision training): the head's products in bf16 from a cached bf16 copy of its
        # frozen weight, where autocast would convert all 168M elements again for every chunk; softmax and loss in fp32
        weight = _bf16_copy(head)
        with torch.autocast(device, enabled=False):
            out = _ChunkedHeadLoss.apply(rows.to(weight.dtype), weight, wanted, cap, chunk, *(trained or (None, None)), unlikely)
    else:
        out = _ChunkedHeadLoss.apply(rows, head.weight, wanted, cap, chunk, *(trained or (None, None)), unlikely)
    return out if unlikely is not None else out[0]


def _bf16_copy(head: torch.nn.Linear) -> torch.Tensor:
    """The frozen head weight in bf16, kept on the module until the weight changes (335 MB for
    Gemma 3 270M's 262,144 x 640 head)."""
    key = (head.weight.data_ptr(), head.weight._version)
    cached = getattr(head, "_banklora_bf16", None)
    if cached is None or cached[0] != key:
        cached = (key, head.weight.detach().to(torch.bfloat16))
        head._banklora_bf16 = cached
    return cached[1]


def token_rows(module) -> tuple[torch.nn.Module, tuple[torch.Tensor, torch.Tensor] | None]:
    """A layer (embedding or LM head) as (its frozen base layer, (ids (k,), trained rows (k, H)))
    when PEFT trains some of its token rows (trainable tokens) for the active adapter, else
    (the layer, None). Rows of a disabled or merged adapter count as untrained."""
    layer = getattr(module, "token_adapter", None)  # peft's TrainableTokensWrapper
    if layer is None:
        return module, None
    active = [a for a in layer.active_adapters if a in layer.trainable_tokens_delta]
    if layer.disable_adapters or layer.merged or not active:
        return layer.base_layer, None
    rows = layer.trainable_tokens_delta[active[0]]
    return layer.base_layer, (torch.tensor(layer.token_indices[active[0]], device=rows.device), rows)


def answer_loss(model, batch: dict[str, torch.Tensor], per_example: bool = False) -> torch.Tensor:
    """Mean next-token cross-entropy over answer tokens, with logits computed only there.

    Equal (to float rounding) to the model's own loss with `labels=`, at a fraction of the cost.
    per_example=True returns each row's own mean, shape (B,): what reference perplexity needs.
    """
    token_loss, keep = token_losses(model, batch)
    if not per_example:
        return token_loss.mean()
    rows = keep.nonzero()[:, 0]
    sums = torch.zeros(keep.shape[0], device=token_loss.device).index_add_(0, rows, token_loss)
    return sums / keep.sum(dim=1).clamp(min=1)


class AnswerLoss(torch.nn.Module):
    """The PEFT model and its answer-only loss as one module, so DDP / FSDP / DeepSpeed wrap the
    whole computation (their gradient hooks need the forward to run through the wrapper).
    unlikelihood > 0 adds token-level unlikelihood on the answer's repeats (unlikelihood_losses)."""

    def __init__(self, peft_model, head_chunk: int | None = None, unlikelihood: float = 0.0, unlikelihood_context: int = 0,
                 sequence_unlikelihood: float = 0.0):
        super().__init__()
        self.peft_model, self.head_chunk, self.unlikelihood = peft_model, head_chunk, unlikelihood
        self.unlikelihood_context, self.sequence_unlikelihood = unlikelihood_context, sequence_unlikelihood

    def forward(self, input_ids, attention_mask, labels, negatives=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(sum of the answer tokens' objectives, number of answer tokens, sum of their cross-entropies):
        the caller normalises globally; the objective is the cross-entropy unless unlikelihood is on.
        negatives (B, T): rows of the model's own looping answers, each repeat's token there to be
        pushed down (sequence-level unlikelihood, with weight `sequence_unlikelihood`)."""
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        if negatives is not None:
            batch["negatives"] = negatives
        if (self.unlikelihood or negatives is not None) and torch.is_grad_enabled():  # validation reads the cross-entropy alone
            objective, cross_entropy, scored = unlikelihood_losses(self.peft_model, batch, self.unlikelihood, self.head_chunk,
                                                                   self.unlikelihood_context, self.sequence_unlikelihood)
            cross_entropy = cross_entropy[scored]
        else:
            objective, _ = token_losses(self.peft_model, batch, self.head_chunk)
            cross_entropy = objective.detach()
        n = torch.tensor(cross_entropy.numel(), device=objective.device, dtype=torch.float32)
        return objective.sum(), n, cross_entropy.sum()
