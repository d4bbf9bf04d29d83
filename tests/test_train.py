"""Training on a tiny random Gemma3: the loss falls, weights change, the adapter is plain PEFT."""

import json
import math
import warnings

import pytest
import torch

from banklora import kernels
from banklora.config import LoraSettings, TrainSettings
from banklora.errors import BankloraError, UsageError
from banklora.loss import answer_loss
from banklora.modeling import META_FILE, add_lora, load, save_adapter
from banklora.train import train
from conftest import seed_batch


def lora_model(loaded, lora: LoraSettings | None = None):
    """LoRA layers on a base, with the training kernels, as `banklora train` builds them."""
    model = add_lora(loaded.model, lora or LoraSettings(), tokenizer=loaded.tokenizer)
    kernels.install(model)
    return model


def test_answer_only_logits_equal_the_full_loss(tiny_base, tokenizer):
    loaded = load(str(tiny_base), training=True)
    model = lora_model(loaded)
    batch = seed_batch(tokenizer)
    with torch.no_grad():
        full = model(**batch).loss
        ours = answer_loss(model.eval(), batch)
    assert ours.item() == pytest.approx(full.item(), abs=1e-5)


def test_training_changes_adapter_and_lowers_loss_on_a_repeated_batch(tiny_base, tokenizer):
    torch.manual_seed(0)
    loaded = load(str(tiny_base), training=True)
    model = lora_model(loaded)
    lora_b = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
    assert all(p.abs().sum() == 0 for p in lora_b.values())  # PEFT starts B at zero: no change yet
    batch = seed_batch(tokenizer, n=2)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.eval()  # no dropout: the same batch must give a falling loss
    losses = []
    for _ in range(8):
        loss = answer_loss(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.0
    assert all(b < a for a, b in zip(losses, losses[1:]))  # falls at every step
    changed = [n for n, p in model.named_parameters() if "lora_B" in n and not torch.equal(p, lora_b[n])]
    assert len(changed) == len(lora_b)  # every LoRA B matrix moved
    others = [n for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n]
    assert others == ["base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta.default"]  # the turn tokens' rows, nothing else
    layer = model.get_input_embeddings().token_adapter
    assert layer.token_indices["default"] == [105, 106]  # <start_of_turn>, <end_of_turn>
    assert not torch.equal(layer.trainable_tokens_delta["default"], layer.trainable_tokens_original["default"])


def test_saved_adapter_reloads_with_plain_peft_and_gives_the_same_logits(tiny_base, tiny_adapter, tokenizer):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    files = {p.name for p in tiny_adapter.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", META_FILE, "tokenizer.json", "chat_template.jinja"} <= files
    assert not any(name.endswith(".bin") for name in files)

    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), tiny_adapter).eval()
    ours = load(str(tiny_adapter), dtype="fp32").model
    ids = torch.tensor([tokenizer("您好，请问怎么开户？")["input_ids"]])
    with torch.no_grad():
        a, b = plain(input_ids=ids).logits, ours(input_ids=ids).logits
        with ours.disable_adapter():
            base = ours(input_ids=ids).logits
    assert torch.allclose(a, b, atol=1e-5)
    assert not torch.allclose(a, base, atol=1e-4)  # the adapter does change the model


def test_loading_an_adapter_with_trained_turn_rows_warns_of_no_missing_keys(tiny_adapter, tiny_base, monkeypatch):
    # PEFT saves the turn-token rows once, under the tied embedding, and warns on every load of an adapter
    # whose name holds "lora_" (its LoRA prefix, so the default lora_banking) that the LM head's copy is
    # missing: every quickstart's compare printed it. The head shares the rows.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings(record=True) as plain:
        warnings.simplefilter("always")
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), tiny_adapter, adapter_name="lora_banking")
    assert any("missing adapter keys" in str(w.message) for w in plain)  # PEFT's own load does warn
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = load(str(tiny_adapter), dtype="fp32", names=("lora_banking",))
    assert [str(w.message) for w in caught if "missing adapter keys" in str(w.message)] == []
    model = loaded.model.get_base_model()
    head, embed = model.lm_head.token_adapter, model.get_input_embeddings().token_adapter
    assert head.trainable_tokens_delta["lora_banking"] is embed.trainable_tokens_delta["lora_banking"]  # the head does use the trained rows
    assert not torch.equal(embed.trainable_tokens_delta["lora_banking"], embed.trainable_tokens_original["lora_banking"])

    key = "['base_model.model.model.layers.0.self_attn.q_proj.lora_A.lora_banking.weight']"
    lost = [f"Found missing adapter keys while loading the checkpoint: {key}.", f"Found missing adapter keys: {key} while loading the checkpoint."]
    original = PeftModel.from_pretrained.__func__

    def losing(cls, *args, **kwargs):  # a load that does miss a key, in PEFT's wording before 0.22 and since: still reported
        for message in lost:
            warnings.warn(message)
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(PeftModel, "from_pretrained", classmethod(losing))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load(str(tiny_adapter), dtype="fp32", names=("lora_banking",))
    assert [str(w.message) for w in caught if "missing adapter keys" in str(w.message)] == lost


def test_metadata_records_base_data_settings_and_losses(tiny_adapter, tiny_base):
    meta = json.loads((tiny_adapter / META_FILE).read_text())
    base = load(str(tiny_base)).base
    assert meta["base_model"]["sha256"] == base.sha256
    assert meta["lora"] == {"r": 8, "alpha": 32, "dropout": 0.1, "bias": "none",
                            "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                            "use_rslora": False, "use_dora": False, "train_tokens": ["<start_of_turn>", "<end_of_turn>"]}
    assert meta["training"]["steps"] == 3 and len(meta["loss_per_step"]) == 3
    assert meta["dataset"]["examples"] == 360 and len(meta["dataset"]["sha256"]) == 64
    assert meta["dataset"]["used_per_split"] == {"train": 240, "validation": 48, "test": 72}
    assert len(meta["validation_loss"]) == 1  # the run ended inside its first epoch
    assert meta["wall_time_seconds"] > 0
    assert {"torch", "transformers", "peft", "python"} <= set(meta["versions"])


def test_warmup_is_capped_to_a_tenth_of_the_run():
    s = TrainSettings()
    assert s.warmup_steps == 100
    assert s.warmup_for(12) == 1 and s.warmup_for(5000) == 100


def test_the_learning_rate_warms_up_linearly_then_decays_on_a_cosine_to_a_tenth():
    from banklora.train import lr_factor

    factors = [lr_factor(step, warmup=3, total=13) for step in range(13)]
    assert factors[:3] == pytest.approx([0.25, 0.5, 0.75])  # warmup: (step + 1) / (warmup + 1)
    assert factors[3] == pytest.approx(1.0)  # the peak after warmup
    assert factors[8] == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through the decay
    assert all(b < a for a, b in zip(factors[3:], factors[4:]))  # decays at every step
    assert lr_factor(13, 3, 13) == pytest.approx(0.1)  # ends at 10% of the peak, not 0
    assert lr_factor(0, 0, 5) == pytest.approx(1.0)  # no warmup: starts at the peak


@pytest.mark.parametrize("by_length", [False, True])
def test_each_epoch_holds_every_example_once_in_a_new_order(by_length):
    from banklora.data.batching import epoch_batches

    lengths = [(i * 37) % 101 + 5 for i in range(300)]
    epochs = [epoch_batches(lengths, 4, seed=42, epoch=e, by_length=by_length) for e in range(3)]
    for batches in epochs:
        flat = [i for b in batches for i in b]
        assert sorted(flat) == list(range(300))  # every example exactly once
        assert [len(b) for b in batches] == [4] * 75
    assert epochs[0] != epochs[1] != epochs[2]  # a new mix each epoch...
    assert epoch_batches(lengths, 4, seed=42, epoch=1, by_length=by_length) == epochs[1]  # ...that resume can rebuild
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in epochs[0]) / 75
    if by_length:
        assert spread < 5  # similar lengths together: little padding
    else:
        assert spread > 40


def test_the_last_batch_of_an_epoch_is_the_only_short_one():
    from banklora.data.batching import epoch_batches

    batches = epoch_batches(list(range(10)), 4, seed=1, epoch=0, by_length=True)
    assert sorted(len(b) for b in batches) == [2, 4, 4] and sorted(i for b in batches for i in b) == list(range(10))


def test_fp16_is_refused_with_a_reason():
    with pytest.raises(UsageError, match="overflow float16"):
        TrainSettings(dtype="fp16")


def test_a_failed_save_keeps_the_previous_adapter(tiny_adapter, tmp_path):
    import shutil

    target = tmp_path / "adapter"
    shutil.copytree(tiny_adapter, target)
    before = (target / "adapter_model.safetensors").read_bytes()
    loaded = load(str(target))
    model = loaded.model
    for name, p in model.named_parameters():
        if "lora_A" in name:
            p.requires_grad_(True)
            p.data[0, 0] = float("nan")
            break
    with pytest.raises(BankloraError, match="NaN or inf"):
        save_adapter(model, loaded.tokenizer, target, {})
    assert (target / "adapter_model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no temporary leftovers


def test_train_then_train_again_replaces_atomically(tiny_base, small_data, tmp_path):
    out = tmp_path / "run"
    for seed in (1, 2):
        train(TrainSettings(base_model=str(tiny_base), data=(str(small_data),), output_dir=str(out), max_steps=1, batch_size=2, seed=seed), show_progress=False)
    meta = json.loads((out / META_FILE).read_text())
    assert meta["training"]["seed"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_train_split_trains_and_validation_split_is_scored_each_epoch(tiny_base, tmp_path):
    records = [{"instruction": f"问题{i}", "output": f"回答{i}，请以银行最新公告为准。", "split": "train"} for i in range(6)]
    records += [{"instruction": f"验证问题{i}", "output": f"验证回答{i}", "split": "validation"} for i in range(2)]
    records += [{"instruction": "测试问题", "output": "测试回答", "split": "test"}]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    out = tmp_path / "adapter"
    train(TrainSettings(base_model=str(tiny_base), data=(str(data),), output_dir=str(out), epochs=2, batch_size=3, lr=1e-2), show_progress=False)
    meta = json.loads((out / META_FILE).read_text())
    assert meta["dataset"]["used_per_split"] == {"train": 18, "validation": 2, "test": 1}  # 2 variants of each train question, none of the others
    assert len(meta["loss_per_step"]) == 12  # 18 train examples / batch 3 x 2 epochs: test never trained on
    assert [v["step"] for v in meta["validation_loss"]] == [6, 12]
    # the last validation loss is the saved adapter's answer loss on the two validation pairs
    from banklora.data.batching import collate
    from banklora.data.dataset import load_examples
    from banklora.data.prepare import prepare

    loaded = load(str(out))
    validation = prepare(load_examples([str(data)], split="validation"), loaded.tokenizer, 512).encoded
    mixed = meta["dtype"].startswith("bf16 autocast")  # a CPU with AVX512-BF16 or AMX trains (and validates) in mixed precision
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=mixed):
        expected = answer_loss(loaded.model, collate(validation, pad_id=0)).item()
    # the same products, in another order (the saved adapter merged for inference): bf16 rounding differs by ~1e-4 relative
    assert meta["validation_loss"][-1]["loss"] == pytest.approx(expected, rel=1e-3 if mixed else 0, abs=0 if mixed else 1e-4)


@pytest.mark.parametrize("name", ["seed", "cpu_quick", "gpu"])
def test_config_recipes_load_and_open_with_their_command(name):
    from pathlib import Path

    from banklora.config import load_train_settings

    path = Path(__file__).parent.parent / "configs" / f"{name}.yaml"
    assert path.read_text().splitlines()[0] == f"# banklora train --config configs/{name}.yaml"
    settings = load_train_settings(path, {"epochs": 1.0, "lora": {"r": 4}})  # flags override the file
    assert settings.epochs == 1.0 and settings.lora.r == 4
    if name == "cpu_quick":  # the quickstart's recipe: train's defaults without the question variants, with sequence-level unlikelihood
        from banklora.config import QUICKSTART

        assert (TrainSettings().epochs, TrainSettings().augment) == (1.0, 2)
        quick = TrainSettings(augment=0, sequence_unlikelihood=0.5, sequence_unlikelihood_prompts=32)
        assert load_train_settings(path, {}).to_dict() == quick.to_dict() == TrainSettings(**QUICKSTART).to_dict()
    if name == "seed":  # the seed's literal settings
        seed = load_train_settings(path, {})
        assert (seed.epochs, seed.lr, seed.batch_size, seed.max_length, seed.lora.r, seed.lora.alpha, seed.augment) == (3, 2e-4, 4, 512, 8, 32, 0)


def test_config_errors_are_sentences(tmp_path):
    from banklora.config import load_train_settings

    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: 2\nlearning_rate: 1e-3\n")
    with pytest.raises(UsageError, match=r"unknown setting\(s\) \['learning_rate'\]"):
        load_train_settings(bad, {})
    good = tmp_path / "good.yaml"
    good.write_text("lr: 1e-3\n")  # YAML reads this as a string
    assert load_train_settings(good, {}).lr == 1e-3
    bad.write_text("lr: fast\n")
    with pytest.raises(UsageError, match="lr must be a number"):
        load_train_settings(bad, {})
    bad.write_text("batch_size: 0\n")
    with pytest.raises(UsageError, match="--batch-size must be positive"):
        load_train_settings(bad, {})


@pytest.mark.parametrize("softcap", [None, 30.0])
def test_chunked_answer_loss_gives_the_full_computations_loss_and_gradients(tiny_base, tokenizer, monkeypatch, softcap):
    import banklora.loss as loss_module

    monkeypatch.setattr(loss_module, "HEAD_CHUNK", 7)  # several chunks and a ragged last one
    loaded = load(str(tiny_base), training=True)
    loaded.model.config.final_logit_softcapping = softcap
    model = lora_model(loaded, LoraSettings(dropout=0.0))
    with torch.no_grad():  # give LoRA B a value, so its A matrices get gradients too
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    batch = seed_batch(tokenizer)
    model.eval()

    def grads(loss_fn):
        model.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    full_loss, full = grads(lambda: model(**batch).loss)
    ours_loss, ours = grads(lambda: answer_loss(model, batch))
    assert ours_loss == pytest.approx(full_loss, abs=1e-5)
    assert full.keys() == ours.keys() and len(full) > 0
    for name in full:
        assert torch.allclose(ours[name], full[name], rtol=1e-4, atol=1e-6), name


def test_repeat_candidates_are_the_answers_earlier_tokens_once_each_but_the_target():
    from banklora.loss import repeat_candidates

    ignore = -100
    targets = torch.tensor([[ignore, ignore, 5, 6, 5, 7, 6, ignore], [ignore, 9, 9, 8, ignore, ignore, ignore, ignore]])
    candidates, mask = repeat_candidates(targets, targets != ignore)
    listed = [sorted(c[m].tolist()) for c, m in zip(candidates, mask)]
    assert listed == [[], [5], [6], [5, 6], [5, 7],  # 5 6 5 7 6: the second 5 is not its own candidate
                      [], [], [9]]  # 9 9 8: a token the reference repeats is never pushed down
    # a short answer beside one with more candidates than it has tokens; a conversation's answers count alone
    targets = torch.tensor([[1, 2, 3, 4, 5, ignore], [7, 8, ignore, ignore, ignore, ignore], [5, 6, ignore, ignore, 5, 7]])
    candidates, mask = repeat_candidates(targets, targets != ignore)
    assert candidates.shape == mask.shape == (11, 4)
    listed = [sorted(c[m].tolist()) for c, m in zip(candidates, mask)]
    assert listed == [[], [1], [1, 2], [1, 2, 3], [1, 2, 3, 4], [], [7], [], [5], [], [5]]


@pytest.mark.parametrize("context", [1, 2])
def test_repeat_candidates_with_context_are_what_followed_the_same_tokens_before(context):
    from banklora.loss import repeat_candidates

    ignore = -100
    # 1 2 3 1 2 4 1 2 3: after "1 2" the answer said 3, then 4; a second answer of the conversation counts alone
    targets = torch.tensor([[ignore, 1, 2, 3, 1, 2, 4, 1, 2, 3], [ignore, 5, 6, ignore, ignore, 5, 6, 7, ignore, ignore]])
    candidates, mask = repeat_candidates(targets, targets != ignore, context)
    listed = [sorted(c[m].tolist()) for c, m in zip(candidates, mask)]
    assert listed == [[], [], [], [], [], [3], [], [], [4],  # the second "1 2" may not go on with 3, the third not with 4 (3 is right there)
                      [], [], [], [], []]  # 5 6 / 5 6 7: nothing before the second answer counts
    # without context every earlier token of the answer is a candidate: the same rows list many more
    wide, wide_mask = repeat_candidates(targets, targets != ignore)
    assert int(wide_mask.sum()) == 23 and int(mask.sum()) == 2


def test_repeat_candidates_context_ignores_reuse_in_another_context():
    from banklora.loss import repeat_candidates

    # "7 1 9 8 1 2": 1 said again after another token is not pushed down at context 1 (token level
    # would push down 7, 9 and 8 there); after the second "1" only the 9 that followed the first is
    targets = torch.tensor([[-100, 7, 1, 9, 8, 1, 2]])
    candidates, mask = repeat_candidates(targets, targets != -100, 1)
    assert int(mask.sum()) == 1 and candidates[mask].tolist() == [9]  # after "1" the answer said 9 before, here 2


def _moved_lora_model(tiny_base, softcap):
    """The tiny model with LoRA and its turn tokens' rows trained, moved off their zero start so every part has gradients."""
    loaded = load(str(tiny_base), training=True)
    loaded.model.config.final_logit_softcapping = softcap
    model = lora_model(loaded, LoraSettings(dropout=0.0))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "trainable_tokens_delta" in name:
                p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.mark.parametrize("softcap", [None, 30.0])
def test_unlikelihood_in_chunks_gives_the_full_computations_loss_and_gradients(tiny_base, tokenizer, monkeypatch, softcap):
    import banklora.loss as loss_module

    monkeypatch.setattr(loss_module, "HEAD_CHUNK", 7)
    model = _moved_lora_model(tiny_base, softcap)
    batch = seed_batch(tokenizer)
    model.eval()
    alpha = 0.7

    def full():  # the textbook computation: all logits, autograd
        logits = model(**batch).logits[:, :-1].float()
        targets = batch["labels"][:, 1:]
        keep = targets != -100
        candidates, mask = loss_module.repeat_candidates(targets, keep)
        logp = logits[keep].log_softmax(dim=-1)
        nll = -logp.gather(1, targets[keep][:, None])[:, 0]
        p = logp.exp().gather(1, candidates) * mask
        return nll, nll - alpha * torch.log1p(-p).sum(dim=1)

    def grads(fn):
        model.zero_grad(set_to_none=True)
        nll, objective = fn()
        objective.sum().backward()
        return nll.detach(), objective.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    def ours():
        objective, nll, _ = loss_module.unlikelihood_losses(model, batch, alpha)
        return nll, objective

    full_nll, full_objective, full_grads = grads(full)
    our_nll, our_objective, our_grads = grads(ours)
    assert torch.allclose(our_nll, full_nll, atol=1e-4) and torch.allclose(our_objective, full_objective, atol=1e-4)
    assert (full_objective - full_nll).sum() > 0.01  # the unlikelihood term is there, so the gradients below test it
    assert full_grads.keys() == our_grads.keys() and any("trainable_tokens" in n for n in full_grads)
    for name in full_grads:
        scale = full_grads[name].abs().max()  # float rounding, relative to the gradient's size
        assert (our_grads[name] - full_grads[name]).abs().max() <= 1e-4 * scale, name


@pytest.mark.parametrize("softcap", [None, 30.0])
def test_sequence_unlikelihood_pushes_a_looping_answers_repeats_down_without_their_cross_entropy(tiny_base, tokenizer, monkeypatch, softcap):
    """Rows of the model's own looping answers (batch["negatives"]) add -log(1 - p(token)) at each
    repeat the loop made and no cross-entropy; the references beside them keep theirs and their
    token-level unlikelihood: equal, in chunks, to the textbook computation, gradients included."""
    import banklora.loss as loss_module

    monkeypatch.setattr(loss_module, "HEAD_CHUNK", 7)
    model = _moved_lora_model(tiny_base, softcap)
    batch = seed_batch(tokenizer, 3)
    negatives = torch.full_like(batch["labels"], -100)
    looped = batch["input_ids"][2].clone()
    batch["labels"][2] = -100  # the third row is a generated answer: no reference tokens
    spots = torch.tensor([9, 10, 11, 20, 21])
    model.eval()
    with torch.no_grad():  # the tokens the model finds likeliest there: a loop's repeats are likely
        likeliest = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[2].argmax(dim=-1)
    negatives[2, spots] = likeliest[spots - 1]
    batch["negatives"] = negatives
    alpha, beta = 0.7, 1.5

    def full():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
        targets, pushed = batch["labels"][:, 1:], negatives[:, 1:]
        keep, push = targets != -100, pushed != -100
        candidates, mask = loss_module.repeat_candidates(targets, keep)
        logp = logits[keep].log_softmax(dim=-1)
        nll = -logp.gather(1, targets[keep][:, None])[:, 0]
        p = logp.exp().gather(1, candidates) * mask
        p_loop = logits[push].softmax(dim=-1).gather(1, pushed[push][:, None])[:, 0]
        return nll, torch.cat([nll - alpha * torch.log1p(-p).sum(dim=1), -beta * torch.log1p(-p_loop)])

    def ours():
        objective, nll, scored = loss_module.unlikelihood_losses(model, batch, alpha, sequence_alpha=beta)
        assert scored.tolist() == [True] * int((batch["labels"][:, 1:] != -100).sum()) + [False] * len(spots)
        return nll[scored], objective

    def grads(fn):
        model.zero_grad(set_to_none=True)
        nll, objective = fn()
        objective.sum().backward()
        return nll.detach(), objective.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    full_nll, full_objective, full_grads = grads(full)
    our_nll, our_objective, our_grads = grads(ours)
    assert torch.allclose(our_nll, full_nll, atol=1e-4) and torch.allclose(our_objective, full_objective, atol=1e-4)
    assert full_objective[-len(spots):].min() > 1e-3  # the loop's term is there, so the gradients below test it
    for name in full_grads:
        scale = full_grads[name].abs().max()
        assert (our_grads[name] - full_grads[name]).abs().max() <= 1e-4 * scale, name
    without = loss_module.unlikelihood_losses(model, {k: v for k, v in batch.items() if k != "negatives"}, alpha)[0]
    assert torch.allclose(without, our_objective[: len(without)], atol=1e-4)  # the references' objectives do not change


@pytest.mark.parametrize("softcap", [None, 30.0])
def test_the_bf16_head_gives_the_same_losses_and_gradients_in_chunks_as_in_one(tiny_base, tokenizer, monkeypatch, softcap):
    """Under bf16 autocast the head's products go through buffers reused by every chunk (bf16
    logits, fp32 softmax): several chunks with a ragged last one must give what one chunk gives,
    for the loss, the unlikelihood term, the trained turn-token rows and validation's no-grad path."""
    import banklora.loss as loss_module

    model = _moved_lora_model(tiny_base, softcap)
    batch = seed_batch(tokenizer)
    model.eval()

    def run(chunk):
        monkeypatch.setattr(loss_module, "HEAD_CHUNK", chunk)
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            objective, nll, _ = loss_module.unlikelihood_losses(model, batch, 0.7)
            objective.sum().backward()
            with torch.no_grad():
                plain, _ = loss_module.token_losses(model, batch)
        return objective.detach(), nll, plain, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    one = run(10**6)
    chunked = run(7)
    assert one[0].numel() > 14 and one[0].numel() % 7  # several chunks, the last one ragged
    for ours, whole in zip(chunked[:3], one[:3]):
        assert torch.allclose(ours, whole, atol=1e-3)
    assert torch.allclose(chunked[2], one[1], atol=1e-3)  # validation's path reads the same cross-entropy
    assert any("trainable_tokens" in n for n in one[3])
    for name, grad in one[3].items():
        assert (chunked[3][name] - grad).abs().max() <= 1e-2 * grad.abs().max(), name
    assert sum(g.abs().sum() for g in one[3].values()) > 0


@pytest.mark.parametrize("context", [0, 1])
def test_training_with_unlikelihood_logs_the_plain_loss_and_moves_the_weights(tiny_base, tmp_path, context):
    data = tmp_path / "lists.jsonl"  # answers that say "请到" twice, going on differently: context 1 has candidates
    data.write_text("".join(json.dumps({"instruction": f"问题{i}：在哪里办理？", "output": f"请到网点办理，或请到手机银行办理业务{i}。"},
                                       ensure_ascii=False) + "\n" for i in range(6)))

    def run(weight, name):
        settings = TrainSettings(base_model=str(tiny_base), data=(str(data),), output_dir=str(tmp_path / name), max_steps=2,
                                 batch_size=2, lr=1e-3, unlikelihood=weight, unlikelihood_context=context, dtype="fp32")
        return train(settings, show_progress=False)

    plain, unlikely = run(0.0, "plain"), run(1.0, "unlikely")
    assert plain.losses[0] == pytest.approx(unlikely.losses[0], abs=1e-5)  # step 1 reports cross-entropy, before any update
    from safetensors.torch import load_file

    moved = load_file(tmp_path / "plain" / "adapter_model.safetensors"), load_file(tmp_path / "unlikely" / "adapter_model.safetensors")
    assert any(not torch.equal(a, moved[1][name]) for name, a in moved[0].items())  # the updates differed (in fp32: a random tiny model rates each candidate ~1/V, a term bf16 products round away)
    meta = json.loads((tmp_path / "unlikely" / "banklora_meta.json").read_text())
    assert meta["training"]["unlikelihood"] == 1.0 and meta["training"]["unlikelihood_context"] == context
    with pytest.raises(UsageError, match="--unlikelihood"):
        TrainSettings(unlikelihood=-0.5)
    with pytest.raises(UsageError, match="--unlikelihood-context"):
        TrainSettings(unlikelihood_context=-1)


def test_neftune_noise_is_bounded_on_while_training_and_off_in_eval(tiny_base):
    from transformers import AutoModelForCausalLM

    from banklora.train import neftune_hook

    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    embed = model.get_input_embeddings()
    ids = torch.randint(0, 1000, (2, 10))
    clean = embed(ids)
    embed.register_forward_hook(neftune_hook(5.0))
    embed.train()
    noisy = embed(ids)
    bound = 5.0 / math.sqrt(10 * clean.shape[-1])
    assert 0.5 * bound < (noisy - clean).abs().max() <= bound + 1e-6
    embed.eval()
    assert torch.equal(embed(ids), clean)


def test_training_with_neftune_records_it_and_changes_the_run(tiny_base, small_data, tmp_path):
    def run(alpha, name):
        settings = TrainSettings(base_model=str(tiny_base), data=(str(small_data),), output_dir=str(tmp_path / name), max_steps=2,
                                 batch_size=2, lr=1e-3, neftune_alpha=alpha)
        return train(settings, show_progress=False)

    plain, noisy = run(0.0, "plain"), run(5.0, "noisy")
    assert plain.losses != noisy.losses  # the same seed and batches: only the noise differs
    meta = json.loads((tmp_path / "noisy" / "banklora_meta.json").read_text())
    assert meta["training"]["neftune_alpha"] == 5.0
    with pytest.raises(UsageError, match="--neftune-alpha"):
        TrainSettings(neftune_alpha=-1)


def test_augment_trains_on_question_variants_of_the_training_split_only(tiny_base, small_data, tmp_path):
    settings = TrainSettings(base_model=str(tiny_base), data=(str(small_data),), output_dir=str(tmp_path / "augmented"), epochs=1,
                             batch_size=2, augment=2, turn_end_budget=0, report_to=("none",))
    meta = train(settings, show_progress=False).meta
    assert meta["dataset"]["used_per_split"] == {"train": 18, "validation": 2, "test": 0}  # 6 pairs and 2 variants of each; validation as it was
    assert meta["training"]["augment"] == 2 and meta["training"]["steps"] == 9  # one epoch over 18 at batch 2
    assert "2 question variants of each training example" in (tmp_path / "augmented" / "README.md").read_text()
    for bad in (-1, 5, True, 1.5):
        with pytest.raises(UsageError, match="--augment"):
            TrainSettings(augment=bad)


def test_augment_leaves_conversations_and_earlier_variants_as_they_are(tiny_base, small_data, tmp_path, caplog):
    from banklora.data.augment import augment
    from banklora.data.dataset import load_examples

    once = augment(load_examples([str(small_data)]), 2)
    assert len(augment(once, 2)) == len(once) == 20  # 6 pairs, 12 variants, 2 validation: a file `data augment` wrote gains nothing again
    chats = tmp_path / "chats.jsonl"  # chat-format data under the default: trained as written, with a warning
    chats.write_text(json.dumps({"messages": [{"role": "user", "content": "问"}, {"role": "assistant", "content": "答"}]}, ensure_ascii=False) + "\n")
    with caplog.at_level("WARNING", logger="banklora.train"):
        meta = train(TrainSettings(base_model=str(tiny_base), data=(str(chats),), output_dir=str(tmp_path / "chats"), max_steps=1,
                                   turn_end_budget=0, report_to=("none",)), show_progress=False).meta
    assert meta["dataset"]["used_per_split"]["train"] == 1
    assert "--augment 2: none of the training examples could be varied" in caplog.text
    pii = tmp_path / "pii.jsonl"  # a variant's finding names its source line and says it is a variant
    pii.write_text(json.dumps({"instruction": "如何办理挂失？我的手机号13812345678", "output": "请到网点办理。"}, ensure_ascii=False) + "\n")
    with pytest.raises(UsageError, match=r"pii\.jsonl:1 \(question variant 1\)"):
        train(TrainSettings(base_model=str(tiny_base), data=(str(pii),), output_dir=str(tmp_path / "pii")), show_progress=False)
