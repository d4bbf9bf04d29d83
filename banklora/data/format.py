"""The one formatter: conversations -> Gemma chat-format token ids with the answer mask.

Gemma's format (no system role; system text goes at the top of the first user turn):

    <bos><start_of_turn>user\n{user}<end_of_turn>\n<start_of_turn>model\n{answer}<end_of_turn>

Training, evaluation, chat and serving all build their ids here, so they cannot drift. The
control tokens are inserted as ids and text is tokenized with special-token parsing off, so a
user who types "<end_of_turn>" gets text, not a turn boundary. Loss (labels != -100) covers each
assistant answer and its closing <end_of_turn>, nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass

from banklora.errors import UsageError

IGNORE_INDEX = -100  # label value the loss skips

# The same format as a Jinja template, saved with every tokenizer we write so that other tools
# (transformers' apply_chat_template, vLLM) build the same prompts without banklora.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] | trim + '\n\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') "
    "+ (message['content'] | trim) + '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)


@dataclass
class Encoded:
    """Token ids of one conversation and their labels (IGNORE_INDEX outside the answers).
    negatives: for one of the model's own looping answers, the tokens to push down where the loop
    repeated them (IGNORE_INDEX elsewhere; its labels are all IGNORE_INDEX): sequence-level
    unlikelihood training (banklora/loops.py)."""

    input_ids: list[int]
    labels: list[int]
    negatives: list[int] | None = None

    def __len__(self) -> int:
        return len(self.input_ids)


def special_ids(tokenizer) -> dict[str, int]:
    """Ids of Gemma's control tokens, looked up (not assumed) in this tokenizer."""
    ids = {
        "bos": tokenizer.bos_token_id,
        "start_of_turn": tokenizer.convert_tokens_to_ids("<start_of_turn>"),
        "end_of_turn": tokenizer.convert_tokens_to_ids("<end_of_turn>"),
    }
    unk = tokenizer.unk_token_id
    missing = [name for name, i in ids.items() if i is None or (unk is not None and i == unk)]
    if missing:
        where = getattr(tokenizer, "name_or_path", "") or "this model"
        raise UsageError(
            f"the tokenizer of {where} has no Gemma control token(s) {', '.join(missing)}: it is not a Gemma tokenizer. "
            "banklora fine-tunes Gemma models; pass a Gemma checkpoint with --base-model"
        )
    return ids


def stop_token_ids(tokenizer) -> list[int]:
    """Generation stops at <end_of_turn> or <eos>: both, or the tuned model never stops."""
    return sorted({special_ids(tokenizer)["end_of_turn"], tokenizer.eos_token_id})


def _text_ids(tokenizer, text: str) -> list[int]:
    # split_special_tokens: "<end_of_turn>" typed by a user stays plain text.
    return tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]


def user_text(instruction: str, input: str = "") -> str:
    """Instruction and optional customer context joined into one user turn."""
    instruction, input = instruction.strip(), input.strip()
    return f"{instruction}\n\n{input}" if input else instruction


def encode_conversation(tokenizer, messages: list[dict], *, add_generation_prompt: bool = False, last_answer_only: bool = False) -> Encoded:
    """Encode a conversation of {"role", "content"} messages in Gemma's chat format.

    Roles: an optional leading "system", then alternating "user" and "assistant". Labels cover
    every assistant answer and its <end_of_turn> (last_answer_only: the final answer alone, what
    a reference answer's likelihood is measured on). A conversation that ends with an assistant
    turn (a training example) ends at that <end_of_turn>; with add_generation_prompt the ids end
    with "<start_of_turn>model\\n", ready for generation.
    """
    ids = special_ids(tokenizer)
    messages = list(messages)
    system = ""
    if messages and messages[0]["role"] == "system":
        system = messages.pop(0)["content"].strip()
    if not messages:
        raise ValueError("a conversation needs at least one user message")
    input_ids: list[int] = [ids["bos"]]
    labels: list[int] = [IGNORE_INDEX]
    newline = _text_ids(tokenizer, "\n")
    for i, message in enumerate(messages):
        role = message["role"]
        expected = "user" if i % 2 == 0 else "assistant"
        if role != expected:
            raise ValueError(f"message {i} has role {role!r}; expected {expected!r} (turns alternate, user first)")
        content = message["content"].strip()
        if i == 0 and system:
            content = f"{system}\n\n{content}"
        header = [ids["start_of_turn"]] + _text_ids(tokenizer, "model\n" if role == "assistant" else "user\n")
        body = _text_ids(tokenizer, content) + [ids["end_of_turn"]]
        input_ids += header + body
        scored = role == "assistant" and (not last_answer_only or i == len(messages) - 1)
        labels += [IGNORE_INDEX] * len(header) + (body if scored else [IGNORE_INDEX] * len(body))
        if i < len(messages) - 1 or add_generation_prompt:
            input_ids += newline
            labels += [IGNORE_INDEX] * len(newline)
    if add_generation_prompt:
        if messages[-1]["role"] != "user":
            raise ValueError("add_generation_prompt needs a conversation that ends with a user message")
        prompt = [ids["start_of_turn"]] + _text_ids(tokenizer, "model\n")
        input_ids += prompt
        labels += [IGNORE_INDEX] * len(prompt)
    return Encoded(input_ids, labels)


def encode_example(tokenizer, instruction: str, output: str, input: str = "") -> Encoded:
    """A training example: one user turn (instruction + input) and its answer."""
    messages = [
        {"role": "user", "content": user_text(instruction, input)},
        {"role": "assistant", "content": output},
    ]
    return encode_conversation(tokenizer, messages)


def encode_prompt(tokenizer, instruction: str, input: str = "") -> list[int]:
    """Prompt ids for one question, ending where the model starts its answer."""
    messages = [{"role": "user", "content": user_text(instruction, input)}]
    return encode_conversation(tokenizer, messages, add_generation_prompt=True).input_ids
