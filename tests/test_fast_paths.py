"""Serving fast paths on the tiny Gemma3: a merged adapter, an int8 head, fp16 decoder weights."""

import pytest
import torch

from banklora.config import GenerationSettings
from banklora.errors import UsageError
from banklora.data.format import encode_prompt
from banklora.inference.generate import generate_batch
from banklora.loss import token_rows
from banklora.modeling import load
from banklora.inference.fast_paths import DecodeLinear, ServingSettings, serving_quantize

from conftest import cli

MERGED, INT8 = ServingSettings(merge=True), ServingSettings(merge=True, int8_head=True)
QUANTIZED = ServingSettings(merge=True, int8_weights=True)


def _ids(tokenizer):
    return torch.tensor([tokenizer("您好，请问信用卡逾期会影响征信吗？")["input_ids"]])


def test_a_merged_adapter_gives_the_adapters_logits_without_lora_layers(tiny_adapter, tokenizer):
    adapter = load(str(tiny_adapter), dtype="fp32")
    merged = load(str(tiny_adapter), dtype="fp32", serve=MERGED)
    assert not any("lora_" in name for name, _ in merged.model.named_parameters())
    with torch.no_grad():
        a, b = adapter.model(input_ids=_ids(tokenizer)).logits, merged.model(input_ids=_ids(tokenizer)).logits
        with adapter.model.disable_adapter():
            base = adapter.model(input_ids=_ids(tokenizer)).logits
    assert torch.allclose(a, b, atol=1e-4)
    assert not torch.allclose(b, base, atol=1e-4)  # the merge carried the adapter's change


def test_int8_weights_stay_close_and_generate(tiny_adapter, tokenizer):
    fp32 = load(str(tiny_adapter), serve=MERGED)
    int8 = load(str(tiny_adapter), serve=INT8)
    from torch.ao.nn.quantized.dynamic import Linear as Int8Linear

    assert isinstance(int8.model.lm_head, Int8Linear)
    assert sum(isinstance(m, Int8Linear) for m in int8.model.modules()) == 1  # only the head: the decoder stays fp32
    with torch.no_grad():
        a, b = fp32.model(input_ids=_ids(tokenizer)).logits, int8.model(input_ids=_ids(tokenizer)).logits
    # int8 rounding moves the logits a little, not the picture: the top-1 token agrees at most positions
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.8
    assert not torch.equal(a, b)
    out = generate_batch(int8.model, int8.tokenizer, [tokenizer("您好")["input_ids"]], GenerationSettings(max_new_tokens=5))
    assert out[0].new_tokens > 0


def test_int8_is_refused_for_training(tiny_base):
    with pytest.raises(UsageError, match="int8 weights are for CPU inference"):
        load(str(tiny_base), training=True, serve=ServingSettings(int8_head=True))


def test_fp16_decoder_weights_decode_in_fp16_and_fall_back_to_fp32_on_overflow(tiny_adapter, tokenizer):
    fp32 = load(str(tiny_adapter), serve=MERGED)
    fast = load(str(tiny_adapter), serve=ServingSettings(merge=True, int8_head=True, fp16_weights=True))
    halves = [m for m in fast.model.modules() if isinstance(m, DecodeLinear) and m.weight16 is not None]
    assert len(halves) == 7 * fast.model.config.num_hidden_layers  # q/k/v/o/gate/up/down of every layer, not the head
    assert all(m.weight16.dtype == torch.float16 and m.weight.dtype == torch.float32 for m in halves)
    with torch.no_grad():
        a, b = fp32.model(input_ids=_ids(tokenizer)).logits, fast.model(input_ids=_ids(tokenizer)).logits
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.8
    # one decoding row runs in fp16 (close, not equal); small batches, prompts and an input
    # beyond fp16's range run in fp32 (equal to rounding)
    layer = halves[0]
    for rows in (1, 5, 40):
        x = torch.randn(rows, layer.in_features)
        exact = x @ layer.weight.T
        assert torch.allclose(layer(x), exact, rtol=1e-2, atol=1e-2)
        assert torch.allclose(layer(x), exact, atol=1e-5) != (rows == 1)
    x[0, 0] = 1e6
    assert torch.isfinite(layer(x[:1])).all()
    assert torch.allclose(layer(x[:1]), x[:1] @ layer.weight.T, rtol=1e-5)
    out = generate_batch(fast.model, fast.tokenizer, [tokenizer("您好")["input_ids"]], GenerationSettings(max_new_tokens=5, temperature=0.0))
    assert out[0].new_tokens > 0


def test_fp16_weights_are_refused_for_training(tiny_base):
    with pytest.raises(UsageError, match="fp16 weights are for CPU inference"):
        load(str(tiny_base), training=True, serve=ServingSettings(fp16_weights=True))


def test_the_int8_head_works_on_adapters_kept_beside_the_base(tiny_adapter, tokenizer, tmp_path):
    """Not merged (compare, serving with several adapters): the head inside the PeftModel is int8,
    and every adapter and the base answer through it."""
    import shutil

    from torch.ao.nn.quantized.dynamic import Linear as Int8Linear

    second = tmp_path / "second"
    shutil.copytree(tiny_adapter, second)
    fp32 = load(str(tiny_adapter), more_adapters=(str(second),))
    int8 = load(str(tiny_adapter), more_adapters=(str(second),), serve=ServingSettings(int8_head=True))
    head, rows = token_rows(int8.model.get_output_embeddings())
    assert isinstance(head, Int8Linear) and rows is not None  # the head's base is int8; the adapter's trained turn-token rows stay fp32
    assert sum(isinstance(m, Int8Linear) for m in int8.model.modules()) == 1
    ids = _ids(tokenizer)
    with torch.no_grad():
        for name in ("tiny", "second"):
            fp32.model.set_adapter(name)
            int8.model.set_adapter(name)
            a, b = fp32.model(input_ids=ids).logits, int8.model(input_ids=ids).logits
            assert not torch.equal(a, b) and (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.8
        with int8.model.disable_adapter():
            assert torch.isfinite(int8.model(input_ids=ids).logits).all()



def test_stacked_adapters_give_peft_mixed_batch_logits(tiny_adapter, tokenizer, tmp_path):
    """The server's stacked adapters: a batch whose rows ask the base and two adapters gives, row
    by row, what PEFT's own mixed-batch path gives (the same products, another summation order),
    for a prompt's prefill and for a decoding step of one token per row."""
    import shutil

    from peft.tuners.lora import Linear as LoraLinear
    from safetensors.torch import load_file, save_file

    second = tmp_path / "second"
    shutil.copytree(tiny_adapter, second)
    weights = load_file(second / "adapter_model.safetensors")
    torch.manual_seed(0)  # the second adapter: other LoRA products and other turn-token rows
    save_file({k: -3 * v if "lora_B" in k else v + torch.randn_like(v) if "trainable_tokens" in k else v for k, v in weights.items()},
              second / "adapter_model.safetensors")
    assert any("trainable_tokens" in k for k in weights)
    peft = load(str(tiny_adapter), more_adapters=(str(second),))
    stacked = load(str(tiny_adapter), more_adapters=(str(second),), serve=ServingSettings(stacked=True))
    layers = [m for m in stacked.model.modules() if type(m) is LoraLinear]
    assert layers and all("forward" in vars(m) for m in layers)  # every LoRA layer answers through the stack
    # the embedding and the head with the adapters' trained turn-token rows answer through theirs
    assert all("forward" in vars(m) for m in (stacked.model.get_input_embeddings(), stacked.model.get_output_embeddings()))
    ids = torch.tensor([encode_prompt(tokenizer, "您好，请问信用卡逾期会影响征信吗？")]).repeat(4, 1)  # holds <start_of_turn> and <end_of_turn>
    names = ["__base__", "tiny", "second", "tiny"]
    with torch.no_grad():
        a = peft.model(input_ids=ids, adapter_names=names).logits
        b = stacked.model(input_ids=ids, adapter_names=names).logits
        a1 = peft.model(input_ids=ids[:, -1:], adapter_names=names).logits
        b1 = stacked.model(input_ids=ids[:, -1:], adapter_names=names).logits
        with peft.model.disable_adapter():
            base = peft.model(input_ids=ids[:1]).logits
    assert torch.allclose(a, b, atol=1e-4, rtol=1e-4) and torch.allclose(a1, b1, atol=1e-4, rtol=1e-4)
    assert torch.allclose(b[0], base[0], atol=1e-4)  # "__base__" rows get no adapter
    assert torch.allclose(b[1], b[3], atol=1e-5)  # rows asking the same adapter agree
    assert (b[1] - b[2]).abs().max() > 1e-2 and (b[1] - b[0]).abs().max() > 1e-3  # and the adapters differ
    assert (b1[1, -1, 106] - b1[2, -1, 106]).abs() > 1e-2  # <end_of_turn>'s logit comes from each row's own adapter


def test_adapters_with_and_without_turn_token_rows_serve_together_in_either_order(tiny_adapter, tiny_lora_only_adapter, tokenizer):
    """PEFT fails to load an adapter without trained token rows after one with them; the loader
    orders them, and each row still gets its own adapter's logits, as when loaded alone."""
    ids = torch.tensor([encode_prompt(tokenizer, "您好，请问信用卡逾期会影响征信吗？")]).repeat(2, 1)  # holds the turn tokens
    alone = {}
    for path in (tiny_adapter, tiny_lora_only_adapter):
        loaded = load(str(path), dtype="fp32")
        with torch.no_grad():
            alone[loaded.adapter_names[0]] = loaded.model(input_ids=ids[:1]).logits[0]
    assert (alone["tiny"] - alone["tiny-lora-only"]).abs().max() > 1e-2
    for first, second in ((tiny_adapter, tiny_lora_only_adapter), (tiny_lora_only_adapter, tiny_adapter)):
        for stacked in (True, False):  # the server's mixed batches; chat's and compare's one adapter at a time
            both = load(str(first), more_adapters=(str(second),), serve=ServingSettings(stacked=stacked), dtype="fp32")
            names = both.adapter_names
            assert both.model.active_adapter == names[0]
            with torch.no_grad():
                if stacked:
                    rows = both.model(input_ids=ids, adapter_names=names).logits
                else:
                    rows = [both.model.set_adapter(name) or both.model(input_ids=ids[:1]).logits[0] for name in names]
            for row, name in zip(rows, names):
                assert torch.allclose(row, alone[name], atol=1e-4, rtol=1e-4), (name, stacked)


def test_stacked_adapters_are_for_serving_only(tiny_adapter, tiny_base):
    with pytest.raises(UsageError, match="stacked"):
        load(str(tiny_adapter), serve=ServingSettings(merge=True, stacked=True))
    with pytest.raises(UsageError, match="stacked"):
        load(str(tiny_base), training=True, serve=ServingSettings(stacked=True))


def test_answering_loads_bf16_weights_where_the_cpu_multiplies_them(tiny_base, monkeypatch):
    """--dtype auto: bf16 weights for answering on a CPU with AVX512-BF16 or AMX, fp32 on one
    without (emulated bf16 is many times slower), fp32 for training (its bf16 is autocast over fp32
    weights) and under the fp32 fast paths (--int8, --fp16)."""
    from banklora import modeling

    monkeypatch.setattr(modeling, "cpu_bf16", lambda: True)
    answering = load(str(tiny_base))
    assert answering.dtype == torch.bfloat16 and {p.dtype for p in answering.model.parameters()} == {torch.bfloat16}
    assert load(str(tiny_base), training=True).dtype == torch.float32
    assert load(str(tiny_base), dtype="fp32").dtype == torch.float32
    assert load(str(tiny_base), serve=INT8).dtype == torch.float32
    with pytest.raises(UsageError, match="--int8 and --fp16 are fast paths over fp32 weights"):
        load(str(tiny_base), dtype="bf16", serve=INT8)
    with pytest.raises(UsageError, match="--dtype must be one of auto, fp32, bf16"):
        load(str(tiny_base), dtype="f32")
    monkeypatch.setattr(modeling, "cpu_bf16", lambda: False)  # an AVX2-only CPU
    assert load(str(tiny_base)).dtype == torch.float32


def test_bf16_answers_score_the_references_as_fp32_does(tiny_adapter):
    """The cost of bf16 weights for answering: each reference answer's NLL within 1% of fp32's,
    through the adapter with its trained turn-token rows, unmerged (compare) and merged (chat)."""
    from banklora.data.dataset import load_examples
    from banklora.evaluation.compare import reference_nll

    examples = load_examples(["banking-eval"])[:4]
    fp32 = load(str(tiny_adapter), dtype="fp32")
    exact = reference_nll(fp32.model, fp32.tokenizer, examples)
    for serve in (ServingSettings(), MERGED):
        bf16 = load(str(tiny_adapter), dtype="bf16", serve=serve)
        assert {p.dtype for n, p in bf16.model.named_parameters() if "lora_" not in n and "trainable_tokens" not in n} == {torch.bfloat16}
        close = reference_nll(bf16.model, bf16.tokenizer, examples)
        assert close != exact and all(abs(a - b) <= 0.01 * a for a, b in zip(exact, close))
        out = generate_batch(bf16.model, bf16.tokenizer, [bf16.tokenizer("您好")["input_ids"]], GenerationSettings(max_new_tokens=5))
        assert out[0].new_tokens > 0


def test_the_lm_head_reads_a_contiguous_input_in_generation(tiny_adapter, tokenizer):
    """transformers hands the head hidden_states[:, -1:, :] when only the last logits are kept; a
    strided 3-D input makes torch's linear broadcast the 262,144-row weight over the batch (measured
    300x slower in bf16, 2x in fp32). The loader makes the head take it contiguous."""
    loaded = load(str(tiny_adapter), dtype="fp32")
    head, _ = token_rows(loaded.model.get_output_embeddings())
    seen = []
    handle = head.register_forward_pre_hook(lambda _m, args: seen.append(args[0].is_contiguous()))
    prompts = [encode_prompt(tokenizer, q) for q in ("您好，请问信用卡逾期会影响征信吗？", "如何开户？", "转账限额是多少？")]
    generate_batch(loaded.model, loaded.tokenizer, prompts, GenerationSettings(max_new_tokens=3), batch_size=3)
    handle.remove()
    assert seen and all(seen)


def test_frozen_in_bf16_puts_the_fp32_weights_back(tiny_adapter):
    """The base's weights in bf16 inside the block (as load gives them for answering), the adapter's
    own (LoRA, trained token rows) in fp32 as PEFT keeps them, and the fp32 tensors back after."""
    from banklora.modeling import frozen_in_bf16

    loaded = load(str(tiny_adapter), dtype="fp32")
    before = {n: p.detach().clone() for n, p in loaded.model.named_parameters()}
    own = lambda name: "lora_" in name or "trainable_tokens_" in name  # noqa: E731
    assert any(own(n) for n in before) and any("trainable_tokens_" in n for n in before)
    with frozen_in_bf16(loaded.model) as model:
        for name, param in model.named_parameters():
            assert param.dtype == (torch.float32 if own(name) else torch.bfloat16), name
        ids = torch.tensor([encode_prompt(loaded.tokenizer, "您好")])
        with torch.no_grad():
            assert torch.isfinite(model(input_ids=ids).logits).all()
    assert all(torch.equal(p, before[n]) and p.dtype == torch.float32 for n, p in loaded.model.named_parameters())


def test_answering_in_a_bf16_run_merges_the_adapter_into_the_bf16_copies_only(tiny_adapter, tokenizer):
    """Training's greedy answers (the turn-end check, --sequence-unlikelihood's loops: train._answering)
    in a bf16 run read the adapter merged into the base's bf16 copies, as chat answers: the logits are
    the unmerged model's to bf16 rounding, every fp32 weight is bit-identical afterwards and nothing is
    left merged; an fp32 run answers unmerged (merging its weights would move them by rounding)."""
    from types import SimpleNamespace

    from peft.tuners.trainable_tokens import TrainableTokensLayer
    from peft.tuners.tuners_utils import BaseTunerLayer

    from banklora.modeling import frozen_in_bf16
    from banklora.train import _answering

    model = load(str(tiny_adapter), dtype="fp32").model
    with torch.no_grad():  # a short run's adapter barely moves the logits: make its effect plain next to bf16 rounding
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.mul_(50)
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    assert any(type(m) is TrainableTokensLayer for m in layers)  # the turn tokens' rows merge too
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.tensor([encode_prompt(tokenizer, "您好，请问信用卡逾期会影响征信吗？")])
    model.eval()
    with torch.inference_mode():
        full = model(input_ids=ids).logits.float()  # fp32, unmerged
    with torch.inference_mode(), frozen_in_bf16(model):
        unmerged = model(input_ids=ids).logits.float()
        with model.disable_adapter():
            base = model(input_ids=ids).logits.float()
    model.train()  # as training calls it: in train mode, put back after
    with torch.inference_mode(), _answering(SimpleNamespace(peft_model=model, precision="bf16")):
        assert all(m.merged for m in layers) and not model.training
        merged = model(input_ids=ids).logits.float()
    assert not any(m.merged for m in layers) and model.training
    assert all(torch.equal(p, before[n]) and p.dtype == torch.float32 for n, p in model.named_parameters())
    off = (merged - unmerged).abs().max()
    # merging costs about what bf16 itself does (against the fp32 model), a tenth of the adapter's own effect at most
    assert off <= 2 * (full - unmerged).abs().max() and off < 0.1 * (unmerged - base).abs().max()
    with _answering(SimpleNamespace(peft_model=model, precision=None)):
        assert not any(m.merged for m in layers)


def test_answering_during_training_attends_as_a_model_loaded_for_answering(tiny_adapter, tokenizer, monkeypatch):
    """Training loads the base with eager attention; its greedy answers (train._answering: the turn-end
    check, --sequence-unlikelihood's loops) attend through SDPA, as `load` loads a model for answering
    (compare, chat, serve): the same logits to float rounding. Training gets eager back after."""
    from types import SimpleNamespace

    from banklora.train import _answering

    trained = load(str(tiny_adapter), dtype="fp32", training=True).model
    answering = load(str(tiny_adapter), dtype="fp32").model.eval()
    causal_lm = trained.get_base_model()
    assert causal_lm.config._attn_implementation == "eager"
    sdpa_calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", lambda *a, **k: sdpa_calls.append(1) or sdpa(*a, **k))
    ids = torch.tensor([encode_prompt(tokenizer, "您好，请问信用卡逾期会影响征信吗？")])
    trained.train()
    with torch.inference_mode(), _answering(SimpleNamespace(peft_model=trained, precision=None)):
        got = trained(input_ids=ids).logits
    layers = causal_lm.config.num_hidden_layers
    assert len(sdpa_calls) == layers and causal_lm.config._attn_implementation == "eager" and trained.training
    with torch.inference_mode():
        expected = answering(input_ids=ids).logits
        trained(input_ids=ids)  # training's forward: eager again
    assert len(sdpa_calls) == 2 * layers  # the answering model's, not training's
    assert torch.allclose(got, expected, atol=1e-5)


def test_an_adapter_scores_merged_into_copies_with_its_unmerged_likelihoods_and_the_base_untouched(tiny_adapter, tokenizer):
    """compare scores an adapter's reference answers and knowledge options merged into copies of the
    base's fp32 weights (modeling.merged_adapter): the same likelihoods as unmerged to float rounding,
    every tensor bit-identical afterwards (unmerging in place would move them by rounding), nothing
    left merged, and the base read through disable_adapter unchanged."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from banklora.data.dataset import Example
    from banklora.evaluation.compare import reference_nll
    from banklora.modeling import merged_adapter

    model = load(str(tiny_adapter), dtype="fp32").model.eval()
    with torch.no_grad():  # make the adapter's effect plain next to float rounding
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.mul_(50)
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    examples = [Example(instruction=q, output=a) for q, a in (("信用卡逾期会影响征信吗？", "会的，逾期记录会上报征信系统。"),
                                                              ("What is LPR?", "The loan prime rate, published monthly."))]
    unmerged = reference_nll(model, tokenizer, examples)
    with model.disable_adapter():
        base = reference_nll(model, tokenizer, examples)
    with merged_adapter(model):
        assert all(m.merged for m in layers)
        merged = reference_nll(model, tokenizer, examples)
    assert not any(m.merged for m in layers)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert all(abs(m - u) < 1e-4 for m, u in zip(merged, unmerged))
    assert all(abs(u - b) > 1e-2 for u, b in zip(unmerged, base))  # the adapter's own effect, for scale
    with model.disable_adapter():
        assert reference_nll(model, tokenizer, examples) == base

ONEDNN_BF16 = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def _check_lossless_fp16_copy(m) -> None:
    """exact in fp16's normal range (|w| >= 2^-14; the embedded 270M's weights all are), off by a subnormal step below"""
    back, normal = m.weight16.to(torch.bfloat16), m.weight.abs() >= 2**-14
    assert m.weight.dtype == torch.bfloat16 and torch.equal(back[normal], m.weight[normal])
    assert (back.float() - m.weight.float()).abs().max() <= 2**-24


def _check_overflow_falls_back(layer) -> None:
    x = torch.randn(1, layer.in_features, dtype=torch.bfloat16)
    x[0, 0] = 1e6  # beyond fp16's range
    assert torch.equal(layer(x), torch.nn.functional.linear(x, layer.weight)) and torch.isfinite(layer(x)).all()


def test_bf16_weights_decode_one_row_through_their_lossless_fp16_copies(tiny_adapter, monkeypatch):
    """A merged model in bf16 (chat on a CPU with native bf16) where oneDNN has no packed bf16 layout:
    every linear layer, the LM head included, holds an fp16 copy equal to its bf16 weight (fp16 carries
    bf16's significant bits), which one or two decoding rows read (a single row reads at the memory's
    speed in fp16, not in bf16); more rows read the bf16 weight; an fp16 product out of range is redone in bf16."""
    from banklora.inference import fast_paths

    monkeypatch.setattr(fast_paths, "packed_bf16", lambda weight: None)
    merged = load(str(tiny_adapter), dtype="bf16", serve=MERGED)
    layers = [m for m in merged.model.modules() if isinstance(m, DecodeLinear)]
    assert merged.model.get_output_embeddings() in layers
    assert len(layers) == 7 * merged.model.config.num_hidden_layers + 1
    for m in layers:
        assert m.packed is None
        _check_lossless_fp16_copy(m)
    layer = layers[0]
    torch.manual_seed(0)
    for rows in (1, 2, 5, 40):
        x = torch.randn(rows, layer.in_features, dtype=torch.bfloat16)
        via16 = torch.nn.functional.linear(x.half(), layer.weight16).to(torch.bfloat16)
        plain = torch.nn.functional.linear(x, layer.weight)
        assert torch.equal(layer(x), via16 if rows <= 2 else plain), rows
        assert torch.allclose(layer(x).float(), x.float() @ layer.weight.float().T, rtol=2e-2, atol=2e-2)
    _check_overflow_falls_back(layer)


@pytest.mark.skipif(not ONEDNN_BF16, reason="this CPU or torch has no oneDNN bf16 kernels to pack weights for")
def test_bf16_weights_take_onednn_packed_copies_with_the_same_products(tiny_adapter):
    """Where oneDNN packs bf16 weights: the decoder's layers hold the packed copy and no fp16 copy, and
    every product (one row, a decoding step's few, a prompt's many) equals F.linear over the bf16
    weight to the bit; the LM head keeps its lossless fp16 copy for one or two rows (faster there)
    and reads the packed copy for more. Under autograd the plain weight is read (the packed op has
    no backward)."""
    merged = load(str(tiny_adapter), dtype="bf16", serve=MERGED)
    head = merged.model.get_output_embeddings()
    layers = [m for m in merged.model.modules() if isinstance(m, DecodeLinear)]
    assert len(layers) == 7 * merged.model.config.num_hidden_layers + 1 and head in layers
    assert all(m.packed is not None for m in layers)
    assert all(m.weight16 is None for m in layers if m is not head)
    _check_lossless_fp16_copy(head)
    torch.manual_seed(0)
    for layer in (layers[0], layers[5], head):
        for rows in (1, 2, 5, 16, 40):
            x = torch.randn(rows, 3, layer.in_features, dtype=torch.bfloat16)[:, 1]  # a strided view, as transformers hands some
            plain = torch.nn.functional.linear(x, layer.weight)
            with torch.inference_mode():
                got = layer(x)
            if layer is head and rows <= 2:
                plain = torch.nn.functional.linear(x.half(), layer.weight16).to(torch.bfloat16)
            assert torch.equal(got, plain), (rows, (got.float() - plain.float()).abs().max())
    x = torch.randn(4, layers[0].in_features, dtype=torch.bfloat16, requires_grad=True)
    layers[0](x).sum().backward()
    assert torch.allclose(x.grad.float(), layers[0].weight.float().sum(0).expand_as(x), rtol=2e-2, atol=2e-2)
    _check_overflow_falls_back(head)


def test_quantize_int8_decodes_with_int8_weights_and_prefills_in_bf16(tiny_adapter, tokenizer, monkeypatch):
    """--quantize int8 on a CPU with native bf16: the decoder's layers hold weight-only int8 copies
    (one scale per row) and the head a dynamic int8 linear, read by decoding steps of up to 8 rows;
    a prompt reads the bf16 weights, so its logits equal the unquantized model's."""
    from banklora import modeling

    monkeypatch.setattr(modeling, "cpu_bf16", lambda: True)
    plain = load(str(tiny_adapter), serve=MERGED)
    quantized = load(str(tiny_adapter), serve=QUANTIZED)
    assert quantized.dtype == torch.bfloat16
    head = quantized.model.get_output_embeddings()
    assert isinstance(head, DecodeLinear) and head.dynamic8 is not None and head.int8 is None and head.weight16 is None
    decoder = [m for m in quantized.model.modules() if isinstance(m, DecodeLinear) and m is not head]
    assert len(decoder) == 7 * quantized.model.config.num_hidden_layers and all(m.weight16 is None for m in decoder)
    for m in decoder:  # each weight within half an int8 step of its int8 copy
        step = m.int8.scales.float()[:, None]
        assert m.int8.values.dtype == torch.int8 and m.int8.values.abs().max() >= 126
        assert ((m.int8.values.float() * step - m.weight.float()).abs() <= 0.5005 * step).all()
    prompt = torch.tensor([encode_prompt(tokenizer, "您好，请问信用卡逾期会影响征信吗？")])
    step_ids = prompt[0, -4:, None]  # four rows of one token: a decoding step's shape
    with torch.no_grad():
        assert torch.equal(plain.model(input_ids=prompt).logits, quantized.model(input_ids=prompt).logits)
        a, b = plain.model(input_ids=step_ids).logits.float(), quantized.model(input_ids=step_ids).logits.float()
    assert not torch.equal(a, b)
    assert (a - b).abs().max() < 0.1 * a.abs().max() and (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.75
    out = generate_batch(quantized.model, quantized.tokenizer, [encode_prompt(tokenizer, "如何开户？")], GenerationSettings(max_new_tokens=5))
    assert out[0].new_tokens > 0


def test_quantize_int8_serves_adapters_kept_beside_the_base(tiny_adapter, tokenizer, monkeypatch, tmp_path):
    """The server's stacked adapters with --quantize int8: a mixed decoding step close to PEFT's
    mixed-batch logits, each row with its own adapter."""
    import shutil

    from banklora import modeling

    monkeypatch.setattr(modeling, "cpu_bf16", lambda: True)
    second = tmp_path / "second"
    shutil.copytree(tiny_adapter, second)
    peft = load(str(tiny_adapter), more_adapters=(str(second),))
    stacked = load(str(tiny_adapter), more_adapters=(str(second),), serve=ServingSettings(stacked=True, int8_weights=True))
    stacks = [m._banklora_stack for m in stacked.model.modules() if hasattr(m, "_banklora_stack")]
    assert len(stacks) == 7 * stacked.model.config.num_hidden_layers and all(s.int8 is not None and s.weight16 is None for s in stacks)
    assert all(type(m.base_layer) is torch.nn.Linear for m in stacked.model.modules() if hasattr(m, "_banklora_stack"))  # read through the stack
    head = token_rows(stacked.model.get_output_embeddings())[0]
    assert isinstance(head, DecodeLinear) and head.dynamic8 is not None and head.weight16 is None
    ids = torch.tensor([encode_prompt(tokenizer, "您好，请问信用卡逾期会影响征信吗？")[-1:]]).repeat(3, 1)
    names = ["__base__", "tiny", "second"]
    with torch.no_grad():
        a = peft.model(input_ids=ids, adapter_names=names).logits.float()
        b = stacked.model(input_ids=ids, adapter_names=names).logits.float()
    assert not torch.equal(a, b) and (a - b).abs().max() < 0.1 * a.abs().max()


def test_quantize_int8_is_refused_where_it_cannot_work(tiny_base, monkeypatch):
    from banklora import modeling

    monkeypatch.setattr(modeling, "cpu_bf16", lambda: True)
    with pytest.raises(UsageError, match="--quantize int8 multiplies int8 weights with bf16 inputs"):
        load(str(tiny_base), dtype="fp32", serve=QUANTIZED)
    with pytest.raises(UsageError, match="drop --int8 and --fp16"):
        load(str(tiny_base), serve=ServingSettings(merge=True, int8_weights=True, int8_head=True))
    with pytest.raises(UsageError, match="int8 weights are for CPU inference"):
        load(str(tiny_base), training=True, serve=ServingSettings(int8_weights=True))
    with pytest.raises(UsageError, match="--quantize int8 needs the adapter merged"):
        ServingSettings(int8_weights=True).check(training=False, device=torch.device("cpu"), adapters=1)
    monkeypatch.setattr(modeling, "cpu_bf16", lambda: False)  # an AVX2-only CPU: auto loads fp32
    with pytest.raises(UsageError, match="AVX512-BF16 or AMX"):
        load(str(tiny_base), serve=QUANTIZED)
    assert serving_quantize("int8") and not serving_quantize(None)
    with pytest.raises(UsageError, match="4bit is QLoRA"):
        serving_quantize("4bit")
    result = cli("chat", "--model-path", str(tiny_base), "--quantize", "int4", "--prompt", "你好")
    assert result.returncode == 2 and "--quantize for answering takes int8 (got 'int4')" in result.stderr


def test_stacked_adapters_decode_one_row_through_the_fp16_copies(tiny_adapter, tokenizer):
    """The server's single stream in bf16: the head (the base layer of the head with trained rows)
    reads a lossless fp16 copy for one row, the base layers under the stacked adapters oneDNN's packed
    copies (an fp16 copy where oneDNN packs no bf16), and the logits stay PEFT's to bf16 rounding."""
    peft = load(str(tiny_adapter), dtype="bf16")
    stacked = load(str(tiny_adapter), dtype="bf16", serve=ServingSettings(stacked=True))
    head = token_rows(stacked.model.get_output_embeddings())[0]
    assert isinstance(head, DecodeLinear) and head.weight16 is not None
    stacks = [m._banklora_stack for m in stacked.model.modules() if hasattr(m, "_banklora_stack")]
    assert stacks and all((s.packed is not None and s.weight16 is None) if ONEDNN_BF16 else s.weight16 is not None for s in stacks)
    ids = torch.tensor([encode_prompt(tokenizer, "您好，请问信用卡逾期会影响征信吗？")[-1:]])
    with torch.no_grad():
        a = peft.model(input_ids=ids, adapter_names=["tiny"]).logits.float()
        b = stacked.model(input_ids=ids, adapter_names=["tiny"]).logits.float()
    assert (a - b).abs().max() < 0.02 * a.abs().max() and a.argmax(-1).equal(b.argmax(-1))


def test_chat_answers_with_quantize_int8(tiny_adapter):
    result = cli("chat", "--model-path", str(tiny_adapter), "--dtype", "bf16", "--quantize", "int8", "--prompt", "你好",
                 "--max-new-tokens", "4", "--temperature", "0", "--no-stream")
    assert result.returncode == 0 and result.stdout.strip()


@pytest.mark.skipif(not ONEDNN_BF16, reason="this CPU or torch has no oneDNN bf16 kernels to pack weights for")
def test_packed_linears_answer_with_the_same_logits_and_put_the_layers_back(tiny_adapter, tokenizer):
    """compare's answers and the turn-end check (a PeftModel with fp32 weights, answered in bf16):
    inside packed_linears every frozen bf16 linear, the base layers under LoRA and the LM head,
    reads its packed copy and the logits equal the unpacked ones to the bit; the fp32 LoRA weights
    are left alone, and afterwards every layer is its plain self again."""
    from banklora.inference.fast_paths import packed_linears
    from banklora.modeling import frozen_in_bf16

    loaded = load(str(tiny_adapter), dtype="fp32")
    model = loaded.model
    ids = torch.tensor([encode_prompt(tokenizer, "您好，请问信用卡逾期会影响征信吗？")])
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear]
    with torch.inference_mode(), frozen_in_bf16(model):
        plain = model(input_ids=ids).logits
        with packed_linears(model):
            packed = [m for m in linears if "_banklora_packed" in vars(m)]
            assert packed and all(m.weight.dtype == torch.bfloat16 for m in packed)
            assert not any(m.weight.dtype == torch.float32 and "_banklora_packed" in vars(m) for m in linears)  # LoRA's A and B
            assert any(m is token_rows(model.get_output_embeddings())[0] for m in packed)  # the LM head (with trained rows)
            answered = model(input_ids=ids).logits
    assert torch.equal(plain, answered)
    assert not any("forward" in vars(m) or "_banklora_packed" in vars(m) for m in linears)
    with packed_linears(model):  # fp32 weights: nothing to pack
        assert not any("_banklora_packed" in vars(m) for m in linears)
