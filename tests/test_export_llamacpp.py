"""The exported GGUF files in llama.cpp itself (llama-cpp-python, built from its PyPI source
package: `pip install 'banklora[llamacpp]'`), on the embedded Gemma 3 270M with a trained adapter."""

from unittest import mock

import pytest
import torch

from banklora.config import GenerationSettings
from banklora.data.dataset import load_examples
from banklora.data.format import encode_prompt, user_text
from banklora.inference.generate import generate_batch
from banklora.modeling import load
from banklora.inference.fast_paths import ServingSettings

llama_cpp = pytest.importorskip("llama_cpp", reason="llama.cpp's Python binding: pip install 'banklora[llamacpp]'")
pytestmark = [pytest.mark.e2e, pytest.mark.llamacpp]

TOKENS = 32


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, embedded_dir):
    from banklora.config import TrainSettings
    from banklora.train import train

    out = tmp_path_factory.mktemp("llamacpp") / "lora_banking"
    # unlikelihood 0: the Q8_0 agreement below was measured on this adapter (the export does not depend on the objective)
    train(TrainSettings(data=("banking-seed",), output_dir=str(out), max_steps=4, batch_size=4, lr=2e-3, max_length=256, unlikelihood=0.0),
          show_progress=False)
    return out


@pytest.fixture(scope="module")
def lora_only_adapter(tmp_path_factory, embedded_dir):
    """The same run with LoRA alone (--train-tokens none): what a LoRA GGUF can carry."""
    from banklora.config import TrainSettings
    from banklora.train import train

    out = tmp_path_factory.mktemp("llamacpp") / "lora_only"
    train(TrainSettings(data=("banking-seed",), output_dir=str(out), max_steps=4, batch_size=4, lr=2e-3, max_length=256,
                        unlikelihood=0.0, lora={"train_tokens": ()}), show_progress=False)
    return out


@pytest.fixture(scope="module")
def files(adapter, lora_only_adapter, tmp_path_factory):
    """The merged GGUFs of the default adapter (LoRA and the trained turn-token rows), the LoRA GGUF of the LoRA-only one."""
    from conftest import cli

    root = tmp_path_factory.mktemp("llamacpp-exports")
    out = {}
    for fmt, kind in (("gguf", "f32"), ("gguf", "q8_0"), ("gguf-lora", "f32")):
        source = lora_only_adapter if fmt == "gguf-lora" else adapter
        result = cli("export", "--model-path", str(source), "--format", fmt, "--type", kind, "--output", str(root / f"{fmt}-{kind}"))
        assert result.returncode == 0, result.stderr
        (out[(fmt, kind)],) = (root / f"{fmt}-{kind}").glob("*.gguf")
    return out


@pytest.fixture(scope="module")
def questions(adapter):
    tokenizer = load(str(adapter), serve=ServingSettings(merge=True)).tokenizer
    return tokenizer, [encode_prompt(tokenizer, q.instruction, q.input) for q in load_examples(["banking-eval"], questions=True)]


@pytest.fixture(scope="module")
def merged(adapter):
    """The adapter merged, in fp32 like the F32 GGUF."""
    return load(str(adapter), dtype="fp32", serve=ServingSettings(merge=True)).model


@pytest.fixture(scope="module")
def banklora_answers(merged, questions):
    """banklora's greedy answers on the merged model, one question at a time (no padding)."""
    return [g.text for g in generate_batch(merged, questions[0], questions[1], GenerationSettings(max_new_tokens=TOKENS), batch_size=1)]


def _llama(path, lora=None):
    """llama.cpp with its weight-repacking buffers off (llama-server's --no-repack): on CPUs with
    AMX, llama.cpp's repacked kernels (llama-cpp-python 0.3.36) crash on Gemma 3 270M's quantized
    files, ours and the embedded Q4_K_M alike, with a segmentation fault on the first decode.
    llama-cpp-python has no argument for it, so its default model parameters are patched for the load."""
    defaults = llama_cpp.llama_cpp.llama_model_default_params

    def no_repack():
        params = defaults()
        params.use_extra_bufts = False
        return params

    with mock.patch.object(llama_cpp.llama_cpp, "llama_model_default_params", no_repack):
        return llama_cpp.Llama(model_path=str(path), lora_path=str(lora) if lora else None, n_ctx=1024, n_threads=2, verbose=False)


def _answers(llm, questions, tokens_out: list | None = None) -> list[str]:
    tokenizer, prompts = questions
    out = []
    for ids in prompts:
        llm.reset()
        tokens = []
        for token in llm.generate(ids, temp=0.0, top_k=1, reset=True):
            if llama_cpp.llama_vocab_is_eog(llama_cpp.llama_model_get_vocab(llm.model), token) or len(tokens) >= TOKENS:
                break
            tokens.append(token)
        out.append(tokenizer.decode(tokens, skip_special_tokens=True))
        if tokens_out is not None:
            tokens_out.append(tokens)
    return out


def _greedy_gaps(model, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """How far below banklora's best logit each of llama.cpp's chosen tokens is, teacher-forced
    through the merged fp32 model: 0 where llama.cpp chose banklora's greedy token."""
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1 : -1].float()
    return logits.max(dim=-1).values - logits.gather(1, torch.tensor(tokens)[:, None])[:, 0]


def test_end_of_turn_ends_generation_and_the_embedded_template_gives_banklora_prompts(files, questions):
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    llm = _llama(files[("gguf", "q8_0")])
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    assert llama_cpp.llama_vocab_is_eog(vocab, 106) and llama_cpp.llama_vocab_is_eog(vocab, 1)  # <end_of_turn>, <eos>
    template = llm.metadata["tokenizer.chat_template"]
    tokenizer, prompts = questions
    for q, ids in zip(load_examples(["banking-eval"], questions=True), prompts):
        messages = [{"role": "user", "content": user_text(q.instruction, q.input)}]
        prompt = Jinja2ChatFormatter(template, eos_token="<eos>", bos_token="<bos>")(messages=messages).prompt
        assert llm.tokenize(prompt.encode(), add_bos=False, special=True) == ids
    # a chat completion through llama.cpp's own template handling: <end_of_turn> is never shown, and
    # once chosen (forced here with a logit bias, whatever the briefly trained model would say) it
    # ends the answer
    messages = [{"role": "user", "content": "信用卡逾期会影响征信吗？"}]
    reply = llm.create_chat_completion(messages=messages, temperature=0, max_tokens=64)
    assert reply["choices"][0]["message"]["content"] and "<end_of_turn>" not in reply["choices"][0]["message"]["content"]
    forced = llm.create_chat_completion(messages=messages, temperature=0, max_tokens=64, logit_bias={106: 100.0})
    assert forced["choices"][0]["finish_reason"] == "stop" and forced["usage"]["completion_tokens"] <= 1


def test_llama_cpp_answers_like_banklora_on_the_merged_files(files, questions, banklora_answers, merged):
    tokens: list[list[int]] = []
    f32 = _answers(_llama(files[("gguf", "f32")]), questions, tokens)
    # F32: banklora's greedy tokens for the first 32. llama.cpp sums in another order, so at a near-tie
    # (two logits within float rounding) it may pick the other one and the answers part from there (seen
    # once in CI: 1 of 8); every token it picks is banklora's best or within 1e-2 of it
    assert sum(a == b for a, b in zip(f32, banklora_answers)) >= len(f32) - 1
    for prompt, answer in zip(questions[1], tokens):
        assert float(_greedy_gaps(merged, list(prompt), answer).max()) <= 1e-2
    q8 = _answers(_llama(files[("gguf", "q8_0")]), questions)
    agree = sum(a == b for a, b in zip(q8, banklora_answers))
    start = sum(a[:8] == b[:8] for a, b in zip(q8, banklora_answers))
    print(f"Q8_0: {agree}/{len(q8)} answers equal banklora's for {TOKENS} tokens, {start} begin with the same 8 characters")
    # Q8_0 rounds every weight, the tied embedding / head (with the trained turn-token rows) included, so greedy answers
    # part at near-ties; measured with the default adapter (LoRA and turn tokens, 4 steps): 2 of 8 equal for 32 tokens,
    # 7 of 8 the same for their first 8 characters (with LoRA alone 4+ of 8 were equal)
    assert start >= len(q8) * 3 // 4 and agree >= 1 and all(q8)


def test_the_lora_gguf_on_the_embedded_base_gguf_changes_the_answers(files, questions):
    from banklora.basemodel import embedded_gguf

    base = _answers(_llama(embedded_gguf()), questions)
    tuned = _answers(_llama(embedded_gguf(), lora=files[("gguf-lora", "f32")]), questions)
    assert all(tuned) and sum(a != b for a, b in zip(base, tuned)) >= len(base) // 2  # the adapter is applied
