"""End to end on the real embedded Gemma 3 270M: train a few steps, save, reload, compare, chat."""

import json

import pytest
from conftest import cli

from banklora.config import CHAT_REPETITION_PENALTY, GenerationSettings, TrainSettings
from banklora.data.dataset import load_examples
from banklora.data.format import encode_prompt
from banklora.evaluation.compare import run_compare
from banklora.inference.generate import generate_batch
from banklora.modeling import load
from banklora.inference.fast_paths import ServingSettings
from banklora.train import train

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, embedded_dir):
    out = tmp_path_factory.mktemp("e2e") / "lora_banking"
    settings = TrainSettings(data=("banking-seed",), output_dir=str(out), max_steps=2, batch_size=2, lr=1e-3, max_length=256)
    result = train(settings, show_progress=False)
    assert len(result.losses) == 2
    return out


def test_the_first_step_trains_on_the_base_models_own_loss(adapter):
    """LoRA's B starts at zero, so step 1's loss is the base model's answer loss on that batch."""
    import torch

    from banklora.data.augment import augment
    from banklora.data.batching import collate, epoch_batches
    from banklora.data.prepare import prepare
    from banklora.loss import answer_loss

    meta = json.loads((adapter / "banklora_meta.json").read_text())
    base = load("gemma-3-270m")
    examples = augment(load_examples(["banking-seed"]), meta["training"]["augment"])  # with train's question variants, as it trained
    encoded = prepare(examples, base.tokenizer, 256).split("train")[1]
    first = epoch_batches([len(e) for e in encoded], 2, 42, 0, True)[0]
    mixed = meta["dtype"].startswith("bf16 autocast")  # CPUs with AVX512-BF16 or AMX train in mixed precision
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=mixed):
        expected = answer_loss(base.model, collate([encoded[i] for i in first], pad_id=0)).item()
    # bf16: the same products through banklora's kernels and PEFT's unused LoRA round differently (~1e-4 relative)
    assert meta["loss_per_step"][0] == pytest.approx(expected, rel=2e-3 if mixed else 0, abs=0 if mixed else 1e-4)


def test_reload_compare_and_base_answers_match_the_plain_base(adapter):
    loaded = load(str(adapter), dtype="fp32")  # fp32: answers batched with others and alone agree to the token
    assert loaded.base.name == "gemma-3-270m" and loaded.adapter_path == adapter
    settings = GenerationSettings(max_new_tokens=12)
    report = run_compare(str(adapter), settings=settings, limit=2, loaded=loaded)
    assert report["models"] == ["base", "lora_banking"] and len(report["questions"]) == 2
    for q in report["questions"]:
        for model in report["models"]:
            a = q["answers"][model]
            assert 0 <= a["keyword_match"] <= 1 and 0 <= a["overall"] <= 1 and 0 <= a["rouge_l"] <= 1
            assert 0 < a["tokens"] <= 12 and a["tokens_per_second"] > 0 and a["response_seconds"] > 0
            assert 1 < a["ref_perplexity"] < 1e6
    # two fine-tuning steps at lr 1e-3 already make the reference answers more likely
    assert report["summary"]["lora_banking"]["ref_perplexity"] < report["summary"]["base"]["ref_perplexity"]
    # "base" in the report is the base model itself, not the adapter.
    plain = load("gemma-3-270m", dtype="fp32")
    prompt = encode_prompt(plain.tokenizer, "借记卡密码忘了，该怎么处理？")
    expected = generate_batch(plain.model, plain.tokenizer, [prompt], settings)[0].text
    assert report["questions"][0]["answers"]["base"]["answer"] == expected


def test_compare_and_chat_through_the_cli(adapter):
    report = adapter.parent / "report.json"
    result = cli("compare", "--peft-model-path", str(adapter), "--split", "test", "--limit", "2", "--max-new-tokens", "8", "--report", str(report))
    assert result.returncode == 0, result.stderr
    data = json.loads(report.read_text())
    assert len(data["questions"]) == 2 and "means per model" in result.stdout
    assert report.with_suffix(".html").is_file() and report.with_suffix(".md").is_file()
    assert data["split"] == "test" and data["questions_source"] == ["banking"]
    test_ids = {e.id for e in load_examples(["banking"], split="test")}
    assert {q["id"] for q in data["questions"]} <= test_ids
    chat = cli("chat", "--model-path", str(adapter), "--prompt", "如何开立银行账户？", "--max-new-tokens", "8", "--temperature", "0", "--no-stream")
    assert chat.returncode == 0, chat.stderr
    merged = load(str(adapter), serve=ServingSettings(merge=True))  # what chat loads
    expected = generate_batch(merged.model, merged.tokenizer, [encode_prompt(merged.tokenizer, "如何开立银行账户？")],
                              GenerationSettings(max_new_tokens=8, repetition_penalty=CHAT_REPETITION_PENALTY))  # chat's default penalty
    assert chat.stdout.strip() == expected[0].text != ""
