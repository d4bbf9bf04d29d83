"""Generation shared by chat, compare and doctor: batched (on the server's continuous-batching
engine), and streaming.

Both stop at <end_of_turn> or <eos>. Greedy when temperature is 0, so two runs agree.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

from banklora.config import GenerationSettings
from banklora.data.format import stop_token_ids


@dataclass
class Generation:
    text: str
    new_tokens: int  # generated tokens, the stop token not counted
    finished: bool  # True when the model ended its turn before the token budget
    seconds: float  # wall time from the start of its prefill until this answer ended
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


@torch.inference_mode()
def generate_batch(model, tokenizer, prompts: list[list[int]], settings: GenerationSettings, batch_size: int = 8,
                   on_answer: Callable[[int], None] | None = None) -> list[Generation]:
    """Answer each prompt (token ids from the formatter), up to `batch_size` at a time, on the
    continuous-batching engine the server runs: an answer that ends leaves the batch at once and
    the next prompt takes its row, so no row decodes padding behind a finished answer.
    on_answer(n) is called as the n-th answer ends (progress)."""
    from banklora.serve.engine import Engine, Event, Request, SamplingParams

    engine = Engine(model, tokenizer, peft=False, max_batch_size=batch_size, max_queue=max(1, len(prompts)))
    texts: list[list[str]] = [[] for _ in prompts]
    ends: list[tuple[float, Event] | None] = [None] * len(prompts)

    def sink(i: int):
        def take(event: Event) -> None:
            texts[i].append(event.text)
            if event.finish_reason or event.error:
                ends[i] = (time.perf_counter(), event)
                if on_answer is not None:
                    on_answer(sum(e is not None for e in ends))
        return take

    requests = []
    for i, prompt in enumerate(prompts):
        # sampling draws each answer's seed from torch's generator, so torch.manual_seed repeats a run
        seed = int(torch.randint(0, 2**62, ())) if settings.temperature > 0 else None
        params = SamplingParams(max_tokens=settings.max_new_tokens, temperature=settings.temperature, top_p=settings.top_p, seed=seed)
        requests.append(Request(prompt=list(prompt), adapter=None, params=params, sink=sink(i)))
        engine.submit(requests[-1])
    engine.run_until_done()
    results = []
    for request, pieces, end in zip(requests, texts, ends):
        done_at, last = end
        if last.error:
            raise RuntimeError(last.error)
        results.append(Generation(
            text="".join(pieces).strip(), new_tokens=last.completion_tokens, finished=last.finish_reason == "stop",
            seconds=done_at - request.admitted, first_token_seconds=request.first_token - request.admitted,
        ))
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
