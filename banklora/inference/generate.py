"""Generation for chat, compare, doctor and the turn-end check, on the continuous-batching engine
the server runs (engine.py): batched (compare), and streaming (chat).

Both stop at <end_of_turn> or <eos>. Greedy when temperature is 0, so two runs agree.
"""

from __future__ import annotations

import queue
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from banklora.config import GenerationSettings


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


def _params(settings: GenerationSettings):
    """The engine's sampling parameters for one answer. Sampling draws each answer's seed from
    torch's generator, so torch.manual_seed repeats a run."""
    from banklora.inference.engine import SamplingParams

    seed = int(torch.randint(0, 2**62, ())) if settings.temperature > 0 else None
    return SamplingParams(max_tokens=settings.max_new_tokens, temperature=settings.temperature, top_p=settings.top_p, seed=seed,
                          frequency_penalty=settings.frequency_penalty, presence_penalty=settings.presence_penalty,
                          repetition_penalty=settings.repetition_penalty)


@torch.inference_mode()
def generate_batch(model, tokenizer, prompts: list[list[int]], settings: GenerationSettings, batch_size: int = 8,
                   on_answer: Callable[[int], None] | None = None) -> list[Generation]:
    """Answer each prompt (token ids from the formatter), up to `batch_size` at a time, on the
    continuous-batching engine the server runs: an answer that ends leaves the batch at once and
    the next prompt takes its row, so no row decodes padding behind a finished answer.
    on_answer(n) is called as the n-th answer ends (progress)."""
    from banklora.inference.engine import Engine, Event, Request

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
        requests.append(Request(prompt=list(prompt), adapter=None, params=_params(settings), sink=sink(i)))
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


class Stream:
    """One streamed answer on the generation engine (the one compare and the server run), stepped
    in the thread that iterates (Engine.run_here says why not in a thread of its own): iterate for
    text pieces; cancel() stops it, and what was generated so far stays in .text."""

    def __init__(self, model, tokenizer, prompt: list[int], settings: GenerationSettings) -> None:
        from banklora.inference.engine import Engine, Request

        self.text = ""
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self._engine = Engine(model, tokenizer, peft=False, max_batch_size=1, max_queue=1)
        self._request = Request(prompt=list(prompt), adapter=None, params=_params(settings), sink=self._events.put)
        self._engine.submit(self._request)

    def __iter__(self) -> Iterator[str]:
        while True:
            while self._events.empty():
                if not self._engine.step():  # cancelled: nothing left to answer
                    return
            event = self._events.get()
            if event.error:
                raise RuntimeError(event.error)
            if event.text:
                self.text += event.text
                yield event.text
            if event.finish_reason:
                return

    def cancel(self) -> None:
        """Stop here; what was generated so far stays in .text."""
        self._request.cancel()
        while not self._events.empty():
            self.text += self._events.get().text
