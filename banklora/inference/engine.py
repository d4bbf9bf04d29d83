"""The one generation worker (the server's, and chat's, compare's and the turn-end check's through
generate.py): continuous batching over a base model and its adapters.

Requests wait in a queue; at every step boundary the worker admits as many as the batch has room
for, prefills them together and joins them to the running batch, then decodes one token for every
row. Rows may use different adapters (PEFT's per-row `adapter_names`, "__base__" for the base),
so the base weights are held once and never merged. Rows are left-padded: the KV cache is a
DynamicCache of full layers whose columns are cache slots, with a 2-D mask saying which slots hold
a row's real tokens and per-row position ids, so each row sees exactly its own tokens (Gemma's
sliding window is measured in slots, which equal positions within a row because its padding is
all on the left). A finished or cancelled row leaves the batch at once and frees its slot.

Each row may ask for repetition penalties (OpenAI's frequency and presence penalties, vLLM's
repetition penalty), applied to its logits before the greedy pick or the sampling; a row that asks
for none costs nothing extra.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch
from transformers import DynamicCache

from banklora.data.format import stop_token_ids

log = logging.getLogger(__name__)

BASE = "__base__"  # PEFT's name for "no adapter" in a mixed batch


class QueueFull(Exception):
    """More requests are waiting than the server was told to hold (--max-queue)."""


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    # repetition controls, applied by apply_penalties before the pick; 0, 0 and 1 = off
    frequency_penalty: float = 0.0  # OpenAI's: a token's logit minus this x its count in the answer so far
    presence_penalty: float = 0.0  # OpenAI's: a token's logit minus this once it is in the answer
    repetition_penalty: float = 1.0  # vLLM's: a positive logit of a token in the prompt or the answer / this, a negative one x this

    @property
    def penalized(self) -> bool:
        """Whether any penalty is on (otherwise the row skips the penalty work entirely)."""
        return self.frequency_penalty != 0 or self.presence_penalty != 0 or self.repetition_penalty != 1


@dataclass
class Event:
    """What the worker tells a request: new text, and at the end why it ended."""

    text: str = ""
    finish_reason: str | None = None  # "stop" | "length" when the answer ended
    completion_tokens: int = 0  # generated so far (a stop token not counted)
    error: str | None = None  # the answer failed; no more events follow


@dataclass(frozen=True)
class StepInfo:
    """One step of the worker: what it ran, on how many rows, how long it took, what is left."""

    kind: str  # "prefill" (new requests joined) | "decode" (one token for every running row)
    rows: int
    seconds: float
    waiting: int  # after the step
    running: int


@dataclass
class Request:
    prompt: list[int]
    adapter: str | None  # None = the base model
    params: SamplingParams
    sink: Callable[[Event], None]  # called from the thread that runs the worker
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)
    admitted: float | None = None  # perf_counter when its prefill began
    first_token: float | None = None  # ... and when its first token was chosen

    def cancel(self) -> None:
        """Stop this request at the next step; its slot is freed, nothing more is sent."""
        self.cancelled.set()


@dataclass
class _Row:
    request: Request
    next_token: int  # sampled, not yet in the cache
    position: int  # real tokens of this row in the cache
    generator: torch.Generator | None
    generated: list[int] = field(default_factory=list)
    emitted: int = 0  # characters of the answer already sent
    done: bool = False
    # only for a row with penalties on: every distinct token of the prompt and the answer -> the
    # times it is in the answer (0: the prompt's only), kept as tokens are chosen, never recounted
    counts: dict[int, int] | None = None


class Engine:
    """One worker that owns the model, run in a thread of its own (start) or the caller's (run_here,
    step, run_until_done); `submit` is safe from any thread."""

    def __init__(self, model, tokenizer, *, peft: bool, max_batch_size: int = 8, max_queue: int = 64,
                 on_step: Callable[[StepInfo], None] | None = None) -> None:
        self.model, self.tokenizer, self.peft = model, tokenizer, peft
        self.max_batch_size, self.max_queue = max_batch_size, max_queue
        self.device = next(model.parameters()).device
        self.stop_ids = set(stop_token_ids(tokenizer))
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.on_step = on_step  # after every step, for the metrics
        self._waiting: deque[Request] = deque()
        self._wake = threading.Condition()
        self._rows: list[_Row] = []
        self._cache: DynamicCache | None = None
        self._mask: torch.Tensor | None = None  # [rows, slots], 1 where a slot holds a real token
        self._fp32: torch.Tensor | None = None  # the step's logits in fp32 (_advance_rows), kept across steps
        self._stopping = False
        self._replacement = None  # (model, peft) to answer with from the next step on
        self._here = False  # run_here drives the worker: start() starts no thread
        self._thread = threading.Thread(target=self._loop, name="banklora-engine", daemon=True)

    # ------------------------------------------------------------------ the public side
    def start(self) -> None:
        """Run the worker in a thread of its own, unless run_here drives it."""
        if not self._here:
            self._thread.start()

    def run_here(self, ready: Callable[[], None] | None = None) -> None:
        """Run the worker in the calling thread until shutdown(); `ready` is called first (the server
        starts its HTTP thread there). On a CPU the calling thread should be the process's first one:
        torch's OpenMP threads (libgomp) spin between parallel regions only while no more threads are
        managed than there are cores, and the team of any other thread makes one more, so every one
        of a decoding step's ~400 small parallel products waits for its threads to wake up (measured
        on 2 cores: a 16-row step 139 ms in a thread of its own, 73 ms on the main thread)."""
        self._here = True
        if ready is not None:
            ready()
        self._loop()

    def step(self) -> bool:
        """One step in the calling thread (chat's stream): admit what fits, prefill or decode.
        False when nothing was waiting or running."""
        with self._wake:
            if not self._waiting and not self._rows:
                return False
            admitted = self._admit()
        with torch.inference_mode():
            self._step(admitted)
        return True

    def shutdown(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)

    def submit(self, request: Request) -> None:
        with self._wake:
            waiting = sum(not r.cancelled.is_set() for r in self._waiting)
            if waiting >= self.max_queue:
                raise QueueFull(f"{waiting} requests are already waiting (--max-queue {self.max_queue})")
            self._waiting.append(request)
            self._wake.notify()

    def replace_model(self, model, *, peft: bool) -> None:
        """Answer with `model` from the next step on: the same base with more adapters (the studio
        loads an adapter as soon as its training ends). Rows being answered keep their adapters."""
        with self._wake:
            self._replacement = (model, peft)
            self._wake.notify()

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._rows)

    # ------------------------------------------------------------------ the worker
    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self._wake:
                    while not self._stopping and not self._waiting and not self._rows and self._replacement is None:
                        self._wake.wait()
                    if self._stopping:
                        return
                    if self._replacement is not None:
                        (self.model, self.peft), self._replacement = self._replacement, None
                        if not self._waiting and not self._rows:
                            continue
                    admitted = self._admit()
                self._step(admitted)

    def run_until_done(self) -> None:
        """Without the worker thread: step in the calling thread until every submitted request
        has ended (a batch job such as compare; `start` is not called)."""
        with torch.inference_mode():
            while self._waiting or self._rows:
                with self._wake:
                    admitted = self._admit()
                self._step(admitted)

    def _admit(self) -> list[Request]:
        """Waiting requests that fit in the batch now (called holding the lock)."""
        admitted = []
        while self._waiting and len(self._rows) + len(admitted) < self.max_batch_size:
            request = self._waiting.popleft()
            if not request.cancelled.is_set():
                admitted.append(request)
        return admitted

    def _step(self, admitted: list[Request]) -> None:
        """One step: prefill the admitted requests and join them, or decode one token per row."""
        started, kind, rows = time.perf_counter(), "prefill" if admitted else "decode", len(admitted) or len(self._rows)
        try:
            if admitted:
                self._prefill(admitted)
            elif self._rows:
                self._decode()
        except Exception as exc:  # the batch is lost, the server is not
            log.exception("generation failed")
            for row in self._rows:
                row.request.sink(Event(error=f"generation failed: {type(exc).__name__}: {exc}"))
            for request in admitted:
                if all(row.request is not request for row in self._rows):
                    request.sink(Event(error=f"generation failed: {type(exc).__name__}: {exc}"))
            self._rows, self._cache, self._mask = [], None, None
        self._retire()
        if self.on_step is not None:
            self.on_step(StepInfo(kind, rows, time.perf_counter() - started, len(self._waiting), len(self._rows)))

    def _forward(self, ids, mask, positions, cache, adapters: list[str | None]):
        kwargs = {}
        if self.peft:
            kwargs["adapter_names"] = [a or BASE for a in adapters]
        slots = cache.get_seq_length()
        out = self.model(
            input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True,
            cache_position=torch.arange(slots, slots + ids.shape[1], device=self.device), logits_to_keep=1, **kwargs,
        )
        return out.logits[:, -1, :]  # in the head's dtype: _advance_rows converts it

    def _prefill(self, requests: list[Request]) -> None:
        now = time.perf_counter()
        for r in requests:
            r.admitted = now
        ids, mask, positions = left_padded([r.prompt for r in requests], self.pad_id, self.device)
        cache = DynamicCache()
        logits = self._forward(ids, mask, positions, cache, [r.adapter for r in requests])
        rows = []
        for i, r in enumerate(requests):
            generator = None
            if r.params.temperature > 0:
                generator = torch.Generator()
                generator.manual_seed(r.params.seed if r.params.seed is not None else torch.seed())
            rows.append(_Row(r, next_token=0, position=len(r.prompt), generator=generator))
            if r.params.penalized:
                rows[-1].counts = dict.fromkeys(r.prompt, 0)
        self._join(rows, cache, mask)
        self._advance_rows(rows, logits)

    def _join(self, rows: list[_Row], cache: DynamicCache, mask: torch.Tensor) -> None:
        """Add prefilled rows to the running batch, left-padding whichever side is shorter."""
        if self._cache is None:
            self._rows, self._cache, self._mask = rows, cache, mask
            return
        slots, width = self._mask.shape[1], mask.shape[1]
        if slots < width:
            _pad_left(self._cache, self._mask, width - slots)
            self._mask = _pad_mask(self._mask, width - slots)
        elif width < slots:
            _pad_left(cache, mask, slots - width)
            mask = _pad_mask(mask, slots - width)
        for mine, theirs in zip(self._cache.layers, cache.layers):
            mine.keys = torch.cat([mine.keys, theirs.keys])
            mine.values = torch.cat([mine.values, theirs.values])
        self._mask = torch.cat([self._mask, mask])
        self._rows += rows

    def _decode(self) -> None:
        n = len(self._rows)
        ids = torch.tensor([[row.next_token] for row in self._rows], device=self.device)
        positions = torch.tensor([[row.position] for row in self._rows], device=self.device)
        mask = torch.cat([self._mask, torch.ones((n, 1), dtype=self._mask.dtype, device=self.device)], dim=1)
        logits = self._forward(ids, mask, positions, self._cache, [row.request.adapter for row in self._rows])
        self._mask = mask
        for row in self._rows:
            row.position += 1
        self._advance_rows(self._rows, logits)

    def _advance_rows(self, rows: list[_Row], logits: torch.Tensor) -> None:
        """Advance every row by its logits (rows x vocab, in the head's dtype), converted to fp32 in one
        buffer kept across steps: a fresh (16, 262,144) fp32 tensor at every step cost a 16-row decoding
        step ~15 ms (measured), its copy into a buffer whose pages are already there 0.3 ms. The greedy
        rows without penalties take one argmax over the batch (2.2 ms for 16 rows, 3.8 row by row;
        over bf16 logits torch's argmax takes 7.6)."""
        if logits.dtype != torch.float32:
            n, vocab = logits.shape
            if self._fp32 is None or self._fp32.shape[0] < n or self._fp32.shape[1] != vocab:
                self._fp32 = torch.empty((max(n, self.max_batch_size), vocab), dtype=torch.float32, device=logits.device)
            logits = self._fp32[:n].copy_(logits)
        plain = [row.request.params.temperature == 0 and not row.request.params.penalized for row in rows]
        best = logits.argmax(dim=-1).tolist() if any(plain) else None
        for i, row in enumerate(rows):
            self._advance(row, logits[i], best[i] if plain[i] else None)

    def _advance(self, row: _Row, logits: torch.Tensor, greedy: int | None = None) -> None:
        """Pick the row's next token (`greedy` when already chosen); send the text that is now
        certain; finish the row if it ended."""
        if row.request.cancelled.is_set():
            row.done = True
            return
        params = row.request.params
        if greedy is not None:
            token = greedy
        else:
            if row.counts is not None:
                tokens = torch.tensor(list(row.counts), device=logits.device)
                counts = torch.tensor(list(row.counts.values()), dtype=logits.dtype, device=logits.device)
                apply_penalties(logits, tokens, counts, params.frequency_penalty, params.presence_penalty, params.repetition_penalty)
            token = _sample(logits, params, row.generator)
        if row.request.first_token is None:
            row.request.first_token = time.perf_counter()
        finish = None
        if token in self.stop_ids:
            finish = "stop"
        else:
            row.generated.append(token)
            row.next_token = token
            if row.counts is not None:
                row.counts[token] = row.counts.get(token, 0) + 1
        text = self.tokenizer.decode(row.generated, skip_special_tokens=True)
        if finish is None and params.stop:
            hit = min((i for i in (text.find(s) for s in params.stop) if i >= 0), default=-1)
            if hit >= 0:
                text, finish = text[:hit], "stop"
        if finish is None and len(row.generated) >= params.max_tokens:
            finish = "length"
        if finish is None:
            text = _certain(text, params.stop)
        if len(text) > row.emitted or finish is not None:
            row.request.sink(Event(text[row.emitted:], finish, len(row.generated)))
            row.emitted = max(row.emitted, len(text))
        row.done = finish is not None

    def _retire(self) -> None:
        """Drop finished and cancelled rows, and the cache slots no remaining row uses."""
        keep = [i for i, row in enumerate(self._rows) if not (row.done or row.request.cancelled.is_set())]
        if len(keep) == len(self._rows):
            return
        if not keep:
            self._rows, self._cache, self._mask = [], None, None
            return
        index = torch.tensor(keep, device=self.device)
        self._rows = [self._rows[i] for i in keep]
        self._mask = self._mask.index_select(0, index)
        used = self._mask.any(dim=0).nonzero()
        first = int(used[0]) if len(used) else 0
        self._mask = self._mask[:, first:]
        for layer in self._cache.layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, first:]
            layer.values = layer.values.index_select(0, index)[:, :, first:]


def left_padded(prompts: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prompts as one left-padded batch, so every row's last token is in the last column: ids,
    attention mask (1 on real tokens) and per-row position ids, each (rows, longest prompt)."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), positions.to(device)


def _pad_left(cache: DynamicCache, mask: torch.Tensor, n: int) -> None:
    for layer in cache.layers:
        b, h, _, d = layer.keys.shape
        layer.keys = torch.cat([layer.keys.new_zeros((b, h, n, d)), layer.keys], dim=2)
        layer.values = torch.cat([layer.values.new_zeros((b, h, n, layer.values.shape[-1])), layer.values], dim=2)


def _pad_mask(mask: torch.Tensor, n: int) -> torch.Tensor:
    return torch.cat([mask.new_zeros((mask.shape[0], n)), mask], dim=1)


def apply_penalties(logits: torch.Tensor, tokens: torch.Tensor, counts: torch.Tensor, frequency: float, presence: float,
                    repetition: float) -> torch.Tensor:
    """vLLM's penalties (vllm/model_executor/layers/utils.py, apply_penalties) on one row's logits
    (vocab,), in place as vLLM does, and returned. tokens (n,): every distinct token of the prompt
    or the answer; counts (n,): the times each is in the answer (0 for the prompt's only). Only
    these tokens change, in vLLM's order:
    1) repetition (> 0, 1 = off): a positive logit is multiplied by 1 / repetition, any other by
       repetition (so > 1 makes every seen token less likely);
    2) frequency, then presence (OpenAI's, -2..2): minus frequency x count, minus presence when the
       token is in the answer.
    A repetition penalty so extreme (1e-40, 1e40) that a logit overflows float32 would make it
    infinite (or NaN) and the sampling fail for the whole batch: it becomes the largest finite one."""
    x = logits[tokens]
    if repetition != 1:
        penalty = torch.tensor(repetition, dtype=x.dtype, device=x.device)
        x = (x * torch.where(x > 0, 1.0 / penalty, penalty)).nan_to_num()
    x = x - frequency * counts - presence * (counts > 0)
    logits[tokens] = x
    return logits


def _sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    if params.temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.cpu() / params.temperature, dim=-1)
    if params.top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs > params.top_p  # keeps the token that crosses top_p
        sorted_probs[outside] = 0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


def _certain(text: str, stops: tuple[str, ...]) -> str:
    """The part of an unfinished answer that later tokens cannot change: without a trailing
    incomplete character, and without a tail that may be the start of a stop string."""
    text = text.rstrip("\ufffd")
    hold = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:k]):
                hold = max(hold, k)
                break
    return text[: len(text) - hold]
