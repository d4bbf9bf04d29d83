"""Gemma's turn tokens: trained beside LoRA (PEFT's trainable tokens), and the turn-end check that
says whether a model ends its answers (banklora/evaluation/turn_end.py)."""

import json
import logging

import pytest
import torch
from conftest import cli
from safetensors import safe_open

from banklora.config import TrainSettings
from banklora.data.dataset import load_examples
from banklora.data.format import IGNORE_INDEX, encode_conversation
from banklora import modeling
from banklora.evaluation import turn_end
from banklora.modeling import load
from banklora.progress import METRICS_FILE
from banklora.train import train

END = 106  # <end_of_turn>


def _own_end_probability(model, tokenizer, example) -> tuple[float, int]:
    """P(<end_of_turn>) and its rank after the answer, from one plain forward pass over the whole example."""
    enc = encode_conversation(tokenizer, example.question() + [{"role": "assistant", "content": example.output}])
    last = max(k for k, label in enumerate(enc.labels) if label != IGNORE_INDEX)
    assert enc.input_ids[last] == END
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([enc.input_ids])).logits[0, last - 1].float()
    return torch.softmax(logits, -1)[END].item(), int((logits > logits[END]).sum()) + 1


def test_end_probabilities_are_the_models_own_at_the_answers_end(tiny_adapter, tokenizer):
    loaded = load(str(tiny_adapter), dtype="fp32")
    examples = load_examples(["banking-seed"])[:5]  # answers of different lengths: left padding in one batch
    ours = turn_end.end_probabilities(loaded.model, loaded.tokenizer, examples, batch_size=4)
    for example, (p, rank) in zip(examples, ours):
        own_p, own_rank = _own_end_probability(loaded.model, tokenizer, example)
        assert p == pytest.approx(own_p, rel=1e-4, abs=1e-9) and rank == own_rank
    with loaded.model.disable_adapter():  # the base: the adapter's rows are not used
        base = turn_end.end_probabilities(loaded.model, loaded.tokenizer, examples)
        assert base[0][0] == pytest.approx(_own_end_probability(loaded.model, tokenizer, examples[0])[0], rel=1e-4, abs=1e-9)
    assert base != ours


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_base, small_data):
    """The same short run twice on the tiny model: turn tokens trained (the default) and not."""
    out = {}
    for name, tokens in (("rows", None), ("lora-only", ("none",))):
        settings = TrainSettings(base_model=str(tiny_base), data=(str(small_data),), output_dir=str(tmp_path_factory.mktemp(name) / "a"),
                                 max_steps=12, batch_size=2, lr=1e-2, lora={"train_tokens": tokens} if tokens else {}, turn_end_budget=8)
        out[name] = train(settings, show_progress=False).output_dir
    return out


def test_trained_turn_tokens_are_plain_peft_and_raise_the_end_probability(runs, small_data, tiny_base):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    config = json.loads((runs["rows"] / "adapter_config.json").read_text())
    assert config["trainable_token_indices"] == {"embed_tokens": [105, 106]}
    with safe_open(runs["rows"] / "adapter_model.safetensors", "pt") as f:
        rows = [k for k in f.keys() if "trainable_tokens" in k]
        assert len(rows) == 1 and f.get_tensor(rows[0]).shape == (2, 64)  # two rows of the tied embedding, a few hundred bytes
    assert json.loads((runs["lora-only"] / "adapter_config.json").read_text()).get("trainable_token_indices") is None
    # plain PEFT loads the rows, and they are what moves <end_of_turn>: the same run without them barely does
    base = AutoModelForCausalLM.from_pretrained(tiny_base)
    plain = PeftModel.from_pretrained(base, runs["rows"]).eval()
    examples = load_examples([str(small_data)], split="validation")
    tokenizer = load(str(runs["rows"])).tokenizer
    with_rows = [turn_end.end_probabilities(plain, tokenizer, examples)]
    for e, (p, _) in zip(examples, with_rows[0]):
        assert p == pytest.approx(_own_end_probability(plain, tokenizer, e)[0], rel=1e-4)
    lora_only = load(str(runs["lora-only"]))
    with plain.disable_adapter():
        before = turn_end.end_probabilities(plain, tokenizer, examples)
    after_rows = sum(p for p, _ in with_rows[0]) / len(examples)
    after_lora = sum(p for p, _ in turn_end.end_probabilities(lora_only.model, tokenizer, examples)) / len(examples)
    # measured: the base 2e-6 (rank ~90,000 of 262,144), LoRA alone 0.001, with the rows 0.009 and the top token
    assert all(rank == 1 for _, rank in with_rows[0])
    assert after_rows > 5 * after_lora and after_rows > 1000 * sum(p for p, _ in before) / len(examples)


def test_every_run_records_the_turn_end_check(runs):
    for name, adapter in runs.items():
        meta = json.loads((adapter / "banklora_meta.json").read_text())
        check = meta["turn_end"]
        assert check["examples"] == check["prompts"] == 2 and check["budget"] == 8 and 0 <= check["ended"] <= 2
        assert 0 <= check["mean_probability"] <= 1 and check["median_rank"] >= 1 and check["looped"] <= 2
        # answered with the weights compare and chat load on this CPU; the saved adapter stays fp32
        assert check["dtype"] == ("bfloat16" if modeling.cpu_bf16() else "float32")
        with safe_open(adapter / "adapter_model.safetensors", "pt") as f:
            assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32}
        records = [json.loads(line) for line in (adapter / METRICS_FILE).read_text().splitlines()]
        assert records[-1] == {"step": 12, "turn_end": check}
        assert "ends its turn: P(<end_of_turn>)" in (adapter / "README.md").read_text()
        assert meta["lora"]["train_tokens"] == (["<start_of_turn>", "<end_of_turn>"] if name == "rows" else [])


def test_a_model_that_does_not_end_its_turn_gets_a_warning_naming_the_fix(tiny_base, small_data, tmp_path, caplog):
    settings = TrainSettings(base_model=str(tiny_base), data=(str(small_data),), output_dir=str(tmp_path / "a"), max_steps=1,
                             batch_size=2, lr=1e-4, turn_end_budget=4)
    with caplog.at_level(logging.WARNING, logger="banklora.train"):
        train(settings, show_progress=False)
    meta = json.loads((tmp_path / "a" / "banklora_meta.json").read_text())
    assert meta["turn_end"]["ended"] == 0  # a random model, one small step: it never ends within 4 tokens
    assert any("rarely ends its answers" in r.message and "--train-tokens" in r.message for r in caplog.records)
    assert turn_end.TurnEnd(24, 0.74, 1, 24, 23, 0, 160).warning() is None  # a model that ends its answers: no warning


def test_turn_end_budget_0_skips_the_check(tiny_base, small_data, tmp_path):
    settings = TrainSettings(base_model=str(tiny_base), data=(str(small_data),), output_dir=str(tmp_path / "a"), max_steps=1,
                             batch_size=2, turn_end_budget=0)
    train(settings, show_progress=False)
    assert "turn_end" not in json.loads((tmp_path / "a" / "banklora_meta.json").read_text())


def test_a_token_the_tokenizer_lacks_is_refused_before_the_weights_load(tiny_base, small_data, tmp_path):
    result = cli("train", "--base-model", str(tiny_base), "--data", str(small_data), "--output-dir", str(tmp_path / "a"),
                 "--train-tokens", "<end_of_turn>,<end_of_answer>")
    assert result.returncode == 2
    assert "--train-tokens: '<end_of_answer>' is not a token of this tokenizer" in result.stderr
    assert not (tmp_path / "a").exists()


def test_doctor_model_path_runs_the_turn_end_check(runs, small_data, tiny_base):
    result = cli("doctor", "--base-model", str(tiny_base), "--model-path", str(runs["rows"]), "--data", str(small_data))
    assert "turn end" in result.stdout and "P(<end_of_turn>) after the answer" in result.stdout
    assert ("everything is ready" in result.stdout) == (result.returncode == 0)


def test_the_check_after_training_gives_the_lm_head_a_contiguous_input(tiny_base, small_data, tmp_path, monkeypatch):
    """The training model is not loaded for answering, so the check makes its head take its input
    contiguous itself: a strided one made the check twice as slow (fp32) or worse (bf16)."""
    from banklora.loss import token_rows

    seen, check = [], turn_end.check

    def watched(model, *args, **kwargs):
        head, _ = token_rows(model.get_output_embeddings())
        handle = head.register_forward_pre_hook(lambda _m, a: seen.append(a[0].is_contiguous()))
        try:
            return check(model, *args, **kwargs)
        finally:
            handle.remove()

    monkeypatch.setattr(turn_end, "check", watched)
    train(TrainSettings(base_model=str(tiny_base), data=(str(small_data),), output_dir=str(tmp_path / "a"), max_steps=1, batch_size=2,
                        turn_end_budget=3), show_progress=False)
    assert seen and all(seen)
