"""The chat REPL: streaming answers, multi-turn history trimmed to fit, Ctrl-C stops an answer."""

from __future__ import annotations

from banklora.config import GenerationSettings
from banklora.data.format import encode_conversation
from banklora.inference.generate import Stream, generate_batch
from banklora.modeling import Loaded

HELP = """commands:
  /reset   forget the conversation so far
  /help    show this help
  /exit    leave (Ctrl-D works too)
Ctrl-C stops the answer being written without leaving the chat."""


class Conversation:
    """Chat history that is trimmed, oldest exchanges first, to fit the context budget."""

    def __init__(self, tokenizer, max_context: int, max_new_tokens: int, system: str = "") -> None:
        self.tokenizer, self.max_context, self.max_new_tokens, self.system = tokenizer, max_context, max_new_tokens, system
        self.turns: list[dict] = []

    def prompt_for(self, text: str) -> list[int] | None:
        """Prompt ids with `text` as the next user turn, dropping the oldest exchanges as needed;
        None, with the history left as it was, when the message does not fit even alone."""
        turns = [*self.turns, {"role": "user", "content": text}]
        while True:
            messages = ([{"role": "system", "content": self.system}] if self.system else []) + turns
            ids = encode_conversation(self.tokenizer, messages, add_generation_prompt=True).input_ids
            if len(ids) + self.max_new_tokens <= self.max_context:
                self.turns = turns
                return ids
            if len(turns) == 1:
                return None
            turns = turns[2:]  # the oldest user turn and its answer

    def answered(self, text: str) -> None:
        self.turns.append({"role": "assistant", "content": text})

    def reset(self) -> None:
        self.turns.clear()


def as_text(text: str) -> str:
    """`text` with every lone surrogate as U+FFFD: Python keeps bytes that are not UTF-8 (a terminal
    in another encoding, `--prompt $'caf\\xe9'`) as lone surrogates, which no tokenizer takes."""
    return "".join("\ufffd" if 0xD800 <= ord(c) <= 0xDFFF else c for c in text)


def answer_once(loaded: Loaded, prompt: str, settings: GenerationSettings, stream: bool, out) -> str:
    """One answer to one prompt, for scripts (`banklora chat --prompt`)."""
    conversation = Conversation(loaded.tokenizer, max_context=1 << 30, max_new_tokens=settings.max_new_tokens)
    return _answer(loaded, conversation.prompt_for(as_text(prompt)), settings, stream, out)


def _answer(loaded: Loaded, ids: list[int], settings: GenerationSettings, stream: bool, out) -> str:
    if not stream:
        text = generate_batch(loaded.model, loaded.tokenizer, [ids], settings, batch_size=1)[0].text
        out.write(text + "\n")
        return text
    answer = Stream(loaded.model, loaded.tokenizer, ids, settings)
    try:
        for piece in answer:
            out.write(piece)
            out.flush()
    except KeyboardInterrupt:
        answer.cancel()
        out.write(" [stopped]")
    out.write("\n")
    return answer.text.strip()


def repl(loaded: Loaded, settings: GenerationSettings, stream: bool, max_context: int, out, read=input) -> None:
    """Read questions until /exit or end of input; answer each with the history so far."""
    conversation = Conversation(loaded.tokenizer, max_context, settings.max_new_tokens)
    out.write("banklora chat - type /help for commands\n")
    while True:
        try:
            text = read("you> ").strip()
        except UnicodeDecodeError:  # the terminal sent bytes that are not UTF-8: the conversation goes on
            out.write("(that line was not UTF-8 text; set the terminal to UTF-8 and type it again)\n")
            continue
        except EOFError:
            out.write("\n")
            return
        except KeyboardInterrupt:
            out.write("\n(Ctrl-C stops an answer; /exit or Ctrl-D leaves)\n")
            continue
        if not text:
            continue
        if as_text(text) != text:
            text = as_text(text)
            out.write("(bytes of that line were not UTF-8; they are read as \ufffd)\n")
        if text in ("/exit", "/quit"):
            return
        if text == "/help":
            out.write(HELP + "\n")
            continue
        if text == "/reset":
            conversation.reset()
            out.write("(conversation cleared)\n")
            continue
        if text.startswith("/"):
            out.write(f"unknown command {text}; type /help\n")
            continue
        ids = conversation.prompt_for(text)
        if ids is None:
            out.write(f"(that message is too long for --max-context {max_context}; shorten it)\n")
            continue
        out.write("bot> ")
        conversation.answered(_answer(loaded, ids, settings, stream, out))
