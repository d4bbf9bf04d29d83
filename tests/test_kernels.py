"""Training kernels (banklora/kernels.py): the same losses and gradients as PEFT's and
transformers' own layers, with less kept for backward."""

import pytest
import torch

from banklora import kernels
from banklora.config import LoraSettings
from banklora.loss import answer_loss
from banklora.modeling import add_lora, load
from conftest import seed_batch


def _own_forwards(model) -> int:
    """Take the kernels out again: every module back to its class's forward."""
    return sum(m.__dict__.pop(f, None) is not None for m in model.modules() for f in ("forward", "forward_adapters"))


def _model(tiny_base, dropout):
    loaded = load(str(tiny_base), training=True)
    model = add_lora(loaded.model, LoraSettings(dropout=dropout), tokenizer=loaded.tokenizer)
    kernels.install(model)
    with torch.no_grad():  # give LoRA B a value, so its A matrices get gradients too, and move the trained turn-token rows
        for name, p in model.named_parameters():
            if "lora_B" in name or "trainable_tokens_delta" in name:
                p.add_(torch.randn_like(p) * 0.05)
    return model.train()


def _loss_and_grads(model, batch, own: bool = False):
    """The answer-only loss and the trainable parameters' gradients; own=True: the model's own
    loss (PEFT's and transformers' layers, full logits) instead of banklora's."""
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss if own else answer_loss(model, batch)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_the_kernels_give_peft_and_transformers_own_loss_and_gradients(tiny_base, tokenizer):
    model = _model(tiny_base, dropout=0.0)
    layers = model.config.num_hidden_layers
    batch = seed_batch(tokenizer)
    ours_loss, ours = _loss_and_grads(model, batch)
    # every adapted projection, every MLP and both token layers (embedding, tied LM head) had been routed
    assert _own_forwards(model) == 7 * layers + layers + 2
    own_loss, own = _loss_and_grads(model, batch, own=True)
    assert ours_loss == pytest.approx(own_loss, abs=1e-5)
    assert ours.keys() == own.keys() and len(own) == 2 * 7 * layers + 1  # + the turn tokens' rows, shared by embedding and head
    for name in own:
        assert torch.allclose(ours[name], own[name], rtol=1e-4, atol=1e-7), name
        assert own[name].abs().sum() > 0, name


def test_lora_dropout_gradients_follow_the_mask_it_drew():
    torch.manual_seed(1)
    x = torch.randn(3, 5, 16, requires_grad=True)
    a = torch.randn(4, 16, requires_grad=True)
    b = torch.randn(8, 4, requires_grad=True)
    grad = torch.randn(3, 5, 8)
    torch.manual_seed(7)
    out = kernels._LoraDelta.apply(x, a, b, 2.0, 0.25, True)
    out.backward(grad)
    ours = (x.grad.clone(), a.grad.clone(), b.grad.clone())
    x.grad = a.grad = b.grad = None

    torch.manual_seed(7)  # the same draw: the mask the kernel used
    keep = kernels.keep_mask(x, 0.25)
    assert 0.5 < keep.float().mean() < 0.95
    reference = ((x * keep / 0.75) @ a.T @ b.T) * 2.0
    assert torch.allclose(out, reference, atol=1e-5)
    reference.backward(grad)
    for mine, theirs in zip(ours, (x.grad, a.grad, b.grad)):
        assert torch.allclose(mine, theirs, rtol=1e-5, atol=1e-5)
    assert (ours[0][~keep] == 0).all()  # dropped inputs get no gradient


def test_the_dropout_mask_keeps_each_element_with_probability_one_minus_p():
    torch.manual_seed(3)
    x = torch.empty(1000, 1000)
    for p in (0.1, 0.5):
        keep = kernels.keep_mask(x, p)
        assert keep.dtype == torch.bool and keep.shape == x.shape
        assert abs(keep.float().mean().item() - (1 - p)) < 0.002  # 10^6 draws: sd 0.0005
        assert abs(keep[:, :500].float().mean() - keep[:, 500:].float().mean()) < 0.004  # no pattern by column
    assert not torch.equal(kernels.keep_mask(x, 0.1), kernels.keep_mask(x, 0.1))  # a fresh draw each call


def test_the_kernels_keep_less_for_backward(tiny_base, tokenizer):
    model = _model(tiny_base, dropout=0.1)
    batch = seed_batch(tokenizer)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def saved_bytes() -> int:
        seen: dict[int, int] = {}

        def pack(t):
            key = t.untyped_storage().data_ptr()
            if key not in params:
                seen[key] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            answer_loss(model, batch)
        return sum(seen.values())

    ours = saved_bytes()
    _own_forwards(model)
    own = saved_bytes()
    assert ours < 0.75 * own, (ours, own)


# ------------------------------------------------------------------------------------- bf16 autocast (mixed precision)
def test_under_bf16_autocast_the_kernels_match_the_models_own_autocast_loss_and_gradients(tiny_base, tokenizer):
    """Mixed-precision training (CPUs with AVX512-BF16 or AMX): banklora's kernels and its head loss
    from a cached bf16 head under bf16 autocast give what transformers and PEFT's own layers give
    under the same autocast, and stay near the fp32 values: bf16 products, fp32 parameters and grads."""
    model = _model(tiny_base, dropout=0.0)
    batch = seed_batch(tokenizer)
    fp32_loss, fp32 = _loss_and_grads(model, batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours_loss, ours = _loss_and_grads(model, batch)
    head = model.get_base_model().lm_head.token_adapter.base_layer
    assert head._banklora_bf16[1].dtype == torch.bfloat16  # the cached copy the head loss read
    _own_forwards(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        own_loss, own = _loss_and_grads(model, batch, own=True)
    assert ours_loss == pytest.approx(own_loss, rel=2e-3) and ours_loss == pytest.approx(fp32_loss, rel=2e-3)
    for name in own:
        assert ours[name].dtype == torch.float32, name  # the optimizer sees fp32 gradients
        for reference in (own[name], fp32[name]):
            err = ((ours[name] - reference).norm() / reference.norm()).item()
            assert err < 0.1, (name, err)  # bf16's 8-bit mantissa, through a 2-layer model: a few % at most


def test_the_cached_bf16_head_follows_its_weight():
    from banklora.loss import _bf16_copy

    head = torch.nn.Linear(4, 6, bias=False)
    first = _bf16_copy(head)
    assert _bf16_copy(head) is first and torch.equal(first, head.weight.detach().to(torch.bfloat16))
    with torch.no_grad():
        head.weight.mul_(2)  # an in-place change bumps the version: a fresh copy
    assert torch.equal(_bf16_copy(head), head.weight.detach().to(torch.bfloat16))


def test_mixed_precision_is_chosen_by_what_the_cpu_has(monkeypatch):
    from banklora import modeling

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(modeling, "cpu_bf16", lambda: True)
    assert [modeling.mixed_precision(s, cpu) for s in ("auto", "bf16", "fp32")] == ["bf16", "bf16", None]
    assert modeling.mixed_precision("auto", cuda) is None  # CUDA's bf16 is bf16 weights (pick_dtype)
    monkeypatch.setattr(modeling, "cpu_bf16", lambda: False)  # an AVX2-only CPU: fp32, as before
    assert modeling.mixed_precision("auto", cpu) is None
    assert modeling.mixed_precision("bf16", cpu) == "bf16"  # asked for: done, with a warning that it is slow here


def test_a_run_records_its_precision_and_an_avx2_cpu_trains_in_fp32(tiny_base, small_data, tmp_path, monkeypatch):
    from banklora import modeling
    from banklora.config import TrainSettings
    from banklora.train import train

    def run(name):
        settings = TrainSettings(base_model=str(tiny_base), data=(str(small_data),), output_dir=str(tmp_path / name), max_steps=2,
                                 batch_size=2, turn_end_budget=0)
        return train(settings, show_progress=False).meta

    expected = "bf16 autocast over float32 weights" if modeling.cpu_bf16() else "float32"
    assert run("here")["dtype"] == expected
    monkeypatch.setattr(modeling, "cpu_bf16", lambda: False)
    meta = run("avx2")
    assert meta["dtype"] == "float32" and all(x is not None for x in meta["loss_per_step"])
    assert "float32 on cpu" in (tmp_path / "avx2" / "README.md").read_text()


def test_each_run_in_one_process_trains_in_its_own_precision(tiny_base, small_data, tmp_path):
    """accelerate keeps one state per process: a fp32 run after a bf16 one must not inherit bf16 autocast."""
    from accelerate.state import AcceleratorState

    from banklora.config import TrainSettings
    from banklora.train import train

    seen = {}

    def run(name, dtype):
        settings = TrainSettings(base_model=str(tiny_base), data=(str(small_data),), output_dir=str(tmp_path / name), max_steps=1,
                                 batch_size=2, turn_end_budget=0, dtype=dtype)
        train(settings, show_progress=False, on_step=lambda state: seen.__setitem__(name, AcceleratorState().mixed_precision))

    run("mixed", "bf16")
    run("plain", "fp32")
    run("mixed-again", "bf16")
    assert seen == {"mixed": "bf16", "plain": "no", "mixed-again": "bf16"}
