"""Generation shared by chat, compare and doctor: batched, and streaming.

Both stop at <end_of_turn> or <eos>. Greedy when temperature is 0, so two runs agree.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Iterator

import torch
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

from banklora.config import GenerationSettings
from banklora.data.format import stop_token_ids


@dataclass
class Generation:
    text: str
    new_tokens: int  # generated tokens, the stop token not counted
    finished: bool  # True when the model ended its turn before the token budget
    seconds: float  # wall time from the start of its batch until this answer ended
    first_token_seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0


def _generation_config(tokenizer, settings: GenerationSettings) -> GenerationConfig:
    sample = settings.temperature > 0
    return GenerationConfig(
        max_new_tokens=settings.max_new_tokens,
        do_sample=sample,
        temperature=settings.temperature if sample else None,
        top_p=settings.top_p if sample else None,
        top_k=None,
        eos_token_id=stop_token_ids(tokenizer),
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
    )


class _StepClock(StoppingCriteria):
    """Records the time of every decoding step; never stops anything itself."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids, scores, **kwargs):
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


@torch.inference_mode()
def generate_batch(model, tokenizer, prompts: list[list[int]], settings: GenerationSettings, batch_size: int = 8) -> list[Generation]:
    """Answer each prompt (token ids from the formatter); left-padded batches of `batch_size`."""
    config = _generation_config(tokenizer, settings)
    stops = set(config.eos_token_id)
    device = next(model.parameters()).device
    results: list[Generation] = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i : i + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), width), config.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, p in enumerate(chunk):
            ids[row, width - len(p) :] = torch.tensor(p)
            mask[row, width - len(p) :] = 1
        clock = _StepClock()
        start = time.perf_counter()
        out = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            generation_config=config,
            stopping_criteria=StoppingCriteriaList([clock]),
        )
        for row in range(len(chunk)):
            new = out[row, width:].tolist()
            end = next((k for k, t in enumerate(new) if t in stops), None)
            finished = end is not None
            n = end if finished else len(new)
            done_at = clock.times[min(n if finished else n - 1, len(clock.times) - 1)]
            results.append(
                Generation(
                    text=tokenizer.decode(new[:n], skip_special_tokens=True).strip(),
                    new_tokens=n,
                    finished=finished,
                    seconds=done_at - start,
                    first_token_seconds=clock.times[0] - start,
                )
            )
    return results


class _Cancel(StoppingCriteria):
    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class Stream:
    """One streamed answer: iterate for text pieces; cancel() stops it after the current token."""

    def __init__(self, model, tokenizer, prompt: list[int], settings: GenerationSettings) -> None:
        self._cancel = threading.Event()
        self._streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.text = ""
        device = next(model.parameters()).device
        kwargs = dict(
            input_ids=torch.tensor([prompt], device=device),
            attention_mask=torch.ones((1, len(prompt)), dtype=torch.long, device=device),
            generation_config=_generation_config(tokenizer, settings),
            stopping_criteria=StoppingCriteriaList([_Cancel(self._cancel)]),
            streamer=self._streamer,
        )
        self._thread = threading.Thread(target=self._run, args=(model, kwargs), daemon=True)
        self._error: BaseException | None = None
        self._thread.start()

    def _run(self, model, kwargs) -> None:
        try:
            with torch.inference_mode():
                model.generate(**kwargs)
        except BaseException as exc:  # surfaced in the consumer's thread
            self._error = exc
            self._streamer.end()

    def __iter__(self) -> Iterator[str]:
        for piece in self._streamer:
            self.text += piece
            yield piece
        self._thread.join()
        if self._error is not None:
            raise self._error

    def cancel(self) -> None:
        """Stop after the current token; what was generated so far stays in .text."""
        self._cancel.set()
        for piece in self._streamer:
            self.text += piece
        self._thread.join()
