"""banklora export on the tiny Gemma3: a merged HF checkpoint, merged GGUFs and a LoRA GGUF, each
read back by other code than the writer's (plain transformers, gguf's reader, transformers' GGUF
loader), and every refusal."""

import json
import re
import shutil

import gguf
import numpy as np
import pytest
import torch
from conftest import cli
from safetensors import safe_open
from safetensors.torch import load_file

from banklora.basemodel import embedded_gguf
from banklora.data.dataset import load_examples
from banklora.data.format import encode_prompt

TOL = {"f32": 1e-4, "f16": 0.05, "q8_0": 0.25}  # max |logit difference| against the merged fp32 model (measured below)


@pytest.fixture(scope="module")
def exports(tmp_path_factory, tiny_adapter, tiny_lora_only_adapter, tiny_base):
    """Merged exports of tiny_adapter (LoRA and trained turn-token rows), LoRA GGUFs of the LoRA-only adapter."""
    root = tmp_path_factory.mktemp("exports")
    out = {}
    for fmt, kind in (("hf", None), ("gguf", "f32"), ("gguf", "q8_0"), ("gguf-lora", "f32"), ("gguf-lora", "q8_0")):
        path = root / f"{fmt}-{kind}"
        adapter = tiny_lora_only_adapter if fmt == "gguf-lora" else tiny_adapter
        args = ["export", "--model-path", str(adapter), "--base-model", str(tiny_base), "--format", fmt, "--output", str(path)]
        result = cli(*args, *(["--type", kind] if kind else []))
        assert result.returncode == 0, result.stderr
        out[(fmt, kind)] = path
    return out


def _prompts(tokenizer):
    return [encode_prompt(tokenizer, e.instruction, e.input) for e in load_examples(["banking-eval"], questions=True)]


@pytest.fixture(scope="module")
def reference(tiny_adapter, tiny_base, tokenizer):
    """PeftModel(base, adapter) in fp32, with plain PEFT: each eval prompt's logits and 12-token greedy answer."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, tiny_adapter).eval()
    return _run(model, tokenizer)


def _run(model, tokenizer):
    out = []
    with torch.no_grad():
        for ids in _prompts(tokenizer):
            x = torch.tensor([ids])
            logits = model(input_ids=x).logits[0]
            answer = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=12, do_sample=False,
                                    eos_token_id=[1, 106], pad_token_id=0)[0, len(ids):]
            out.append((logits, answer.tolist()))
    return out


def test_the_merged_checkpoint_loads_in_plain_transformers_with_the_adapters_logits(exports, reference, tokenizer, tiny_base, tiny_adapter):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    path = exports[("hf", None)]
    with safe_open(path / "model.safetensors", "pt") as f:
        names = set(f.keys())
    assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names  # tied: one copy
    assert all(n.startswith("model.") for n in names) and not any("lora" in n or "language_model" in n for n in names)
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == ["Gemma3ForCausalLM"] and config["tie_word_embeddings"] is True
    assert GenerationConfig.from_pretrained(path).eos_token_id == [1, 106]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert type(model).__name__ == "Gemma3ForCausalLM"
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    exported_tokenizer = AutoTokenizer.from_pretrained(path)
    assert "<start_of_turn>" in exported_tokenizer.chat_template
    assert exported_tokenizer.apply_chat_template([{"role": "user", "content": "你好"}], add_generation_prompt=True)["input_ids"] == \
        encode_prompt(tokenizer, "你好")  # the template gives banklora's own prompt ids
    for (want, want_answer), (got, got_answer) in zip(reference, _run(model, tokenizer)):
        assert (want - got).abs().max() < 1e-4
        assert got_answer == want_answer
    # the adapter's trained turn-token rows are the merged embedding's (and so the tied head's) rows
    with safe_open(tiny_adapter / "adapter_model.safetensors", "pt") as f:
        (key,) = [k for k in f.keys() if "trainable_tokens" in k]
        rows = f.get_tensor(key)
    assert torch.equal(model.model.embed_tokens.weight[[105, 106]], rows)
    # the merge carried the adapter: the base alone differs
    base = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32).eval()
    with torch.no_grad():
        assert (base(input_ids=torch.tensor([_prompts(tokenizer)[0]])).logits[0] - reference[0][0]).abs().max() > 1e-3


def test_export_metadata_and_card_give_the_lineage(exports, tiny_adapter, tiny_lora_only_adapter):
    for (fmt, _), path in exports.items():
        source = tiny_lora_only_adapter if fmt == "gguf-lora" else tiny_adapter
        adapter_meta = json.loads((source / "banklora_meta.json").read_text())
        meta = json.loads((path / "banklora_meta.json").read_text())
        assert meta["format"] == "banklora-export/1" and meta["adapter"]["path"] == str(source.resolve())
        assert meta["base_model"]["sha256"] == adapter_meta["base_model"]["sha256"]
        assert meta["adapter"]["meta"]["dataset"]["sha256"] == adapter_meta["dataset"]["sha256"]
        weights = source / "adapter_model.safetensors"
        import hashlib

        assert meta["adapter"]["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
        for name, entry in meta["files"].items():
            assert (path / name).stat().st_size == entry["bytes"]
        card = (path / "README.md").read_text()
        assert "README.md" in meta["files"] and "base_model:" in card
        run_lines = card.split("## Run it", 1)[1]
        assert ".tmp-" not in card and path.name in run_lines  # the folder's final name, not the temporary build folder's
        assert not [p for p in path.parent.iterdir() if ".tmp-" in p.name]  # nothing left half-written


@pytest.fixture(scope="module")
def embedded_fields():
    return _fields(gguf.GGUFReader(embedded_gguf()))  # parsing its 262,144 tokens takes ~10 s: once


def _fields(reader) -> dict:
    return {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}


@pytest.mark.parametrize("kind", ["f32", "q8_0"])
def test_the_merged_gguf_reads_back_with_gemma3_metadata_and_tensors(exports, kind, tiny_base, embedded_fields):
    path = exports[("gguf", kind)]
    (file,) = path.glob("*.gguf")
    reader = gguf.GGUFReader(file)
    fields = _fields(reader)
    assert fields["general.architecture"] == "gemma3" and fields["general.type"] == "model"
    source = embedded_fields
    for key in (k for k in source if k.startswith("tokenizer.")):  # every tokenizer key copied as it is
        assert fields[key] == source[key], key
    assert fields["tokenizer.ggml.eot_token_id"] == 106 and "<start_of_turn>" in fields["tokenizer.chat_template"]
    config = json.loads((tiny_base / "config.json").read_text())
    assert fields["gemma3.block_count"] == config["num_hidden_layers"] and fields["gemma3.embedding_length"] == config["hidden_size"]
    assert fields["gemma3.attention.key_length"] == config["head_dim"] and fields["gemma3.attention.sliding_window"] == config["sliding_window"]
    tensors = {t.name: t for t in reader.tensors}
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA3, config["num_hidden_layers"])
    with safe_open(tiny_base / "model.safetensors", "pt") as f:
        expected = {names.get_name(n, try_suffixes=(".weight",)): f.get_slice(n).get_shape() for n in f.keys() if n != "lm_head.weight"}
    assert set(tensors) == set(expected) and "output.weight" not in tensors  # tied embeddings
    for name, t in tensors.items():
        assert list(reversed([int(d) for d in t.shape])) == list(expected[name]), name  # GGUF lists dims innermost first
        want = "F32" if len(expected[name]) == 1 or kind == "f32" else "Q8_0"
        assert t.tensor_type.name == want, name
    # norms hold (1 + w), as llama.cpp's converter writes Gemma's RMSNorm
    with safe_open(exports[("hf", None)] / "model.safetensors", "pt") as f:
        hf_norm = f.get_tensor("model.norm.weight").numpy()
    assert np.allclose(tensors["output_norm.weight"].data, hf_norm + 1, atol=1e-6)


@pytest.mark.parametrize("kind", ["f32", "q8_0"])
def test_transformers_gguf_loader_gives_the_merged_models_logits(exports, kind, tokenizer):
    """transformers' own GGUF reader (another implementation than ours) on the exported file:
    f32 equals the merged checkpoint to float rounding; q8_0 within the measured TOL."""
    from transformers import AutoModelForCausalLM

    path = exports[("gguf", kind)]
    (file,) = path.glob("*.gguf")
    from_gguf = AutoModelForCausalLM.from_pretrained(path, gguf_file=file.name, dtype=torch.float32).eval()
    merged = AutoModelForCausalLM.from_pretrained(exports[("hf", None)], dtype=torch.float32).eval()
    worst, agree, total = 0.0, 0, 0
    with torch.no_grad():
        for ids in _prompts(tokenizer):
            x = torch.tensor([ids])
            a, b = merged(input_ids=x).logits[0], from_gguf(input_ids=x).logits[0]
            worst = max(worst, float((a - b).abs().max()))
            agree += int((a.argmax(-1) == b.argmax(-1)).sum())
            total += len(ids)
    print(f"{kind}: max |dlogit| {worst:.2e}, top-1 agreement {agree}/{total}")
    assert worst < TOL[kind]
    assert agree / total >= (1.0 if kind == "f32" else 0.95)


@pytest.mark.parametrize("kind", ["f32", "q8_0"])
def test_the_lora_gguf_reproduces_the_merged_weights(exports, kind, tiny_base):
    from gguf.quants import dequantize

    path = exports[("gguf-lora", kind)]
    (file,) = path.glob("*.gguf")
    reader = gguf.GGUFReader(file)
    fields = _fields(reader)
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora" and fields["general.architecture"] == "gemma3"
    config = json.loads((exports[("hf", None)].parent / "hf-None" / "config.json").read_text())
    adapter_config = json.loads((tiny_adapter_dir(exports) / "adapter_config.json").read_text())
    scale = fields["adapter.lora.alpha"] / adapter_config["r"]
    assert fields["adapter.lora.alpha"] == adapter_config["lora_alpha"]
    tensors = {t.name: dequantize(t.data, t.tensor_type).reshape([int(d) for d in reversed(t.shape)]) for t in reader.tensors}
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA3, config["num_hidden_layers"])
    base = load_file(tiny_base / "model.safetensors")
    merged = _merged_by_peft(tiny_base, tiny_adapter_dir(exports))
    adapted = [n for n in merged if f"{names.get_name(n, try_suffixes=('.weight',))}.lora_a" in tensors]
    assert len(adapted) == 2 * 7  # 2 layers x q/k/v/o/gate/up/down
    tol = 1e-5 if kind == "f32" else 2e-3
    for n in adapted:
        g = names.get_name(n, try_suffixes=(".weight",))
        a, b = tensors[f"{g}.lora_a"], tensors[f"{g}.lora_b"]  # (r, in), (out, r)
        assert a.shape[0] == b.shape[1] == adapter_config["r"]
        rebuilt = base[n].numpy() + scale * (b @ a)
        assert np.abs(rebuilt - merged[n].numpy()).max() < tol, n
    if kind == "q8_0":  # A's rows (in = 64) quantize; B's rows (r = 8) are not a multiple of 32 and go f16
        types = {t.name: t.tensor_type.name for t in reader.tensors}
        assert {types[k] for k in types if k.endswith("lora_a")} == {"Q8_0"} and {types[k] for k in types if k.endswith("lora_b")} == {"F16"}


def _merged_by_peft(base_dir, adapter_dir) -> dict:
    """The adapter merged into its base by plain PEFT: {HF name: tensor}."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), adapter_dir).merge_and_unload()
    return {k: v.detach() for k, v in model.state_dict().items()}


def tiny_adapter_dir(exports):
    meta = json.loads((exports[("gguf-lora", "f32")] / "banklora_meta.json").read_text())
    from pathlib import Path

    return Path(meta["adapter"]["path"])


def parse_modelfile(path) -> dict:
    """FROM, ADAPTER, TEMPLATE and the PARAMETERs of a Modelfile, as Ollama's parser reads them."""
    text = path.read_text()
    out = {"PARAMETER": {}}
    for m in re.finditer(r'^(FROM|ADAPTER|TEMPLATE|PARAMETER|SYSTEM)\s+(?:"""(.*?)"""|(.+?))\s*$', text, re.M | re.S):
        command, value = m.group(1), m.group(2) if m.group(2) is not None else m.group(3)
        if command == "PARAMETER":
            key, _, rest = value.partition(" ")
            out["PARAMETER"].setdefault(key, []).append(rest.strip().strip('"'))
        else:
            out[command] = value
    return out


def test_every_gguf_has_an_ollama_modelfile(exports):
    merged = parse_modelfile(exports[("gguf", "q8_0")] / "Modelfile")
    (file,) = exports[("gguf", "q8_0")].glob("*.gguf")
    assert merged["FROM"] == f"./{file.name}" and "ADAPTER" not in merged
    assert "<start_of_turn>user" in merged["TEMPLATE"] and "<start_of_turn>model" in merged["TEMPLATE"]
    assert merged["PARAMETER"]["stop"] == ["<end_of_turn>"] and int(merged["PARAMETER"]["num_ctx"][0]) >= 2048
    lora = parse_modelfile(exports[("gguf-lora", "f32")] / "Modelfile")
    (lora_file,) = exports[("gguf-lora", "f32")].glob("*.gguf")
    assert lora["ADAPTER"] == f"./{lora_file.name}" and lora["PARAMETER"]["stop"] == ["<end_of_turn>"]
    assert lora["FROM"]  # the tiny base has no GGUF of its own: a placeholder the comment explains
    assert "# FROM:" in (exports[("gguf-lora", "f32")] / "Modelfile").read_text()


# ------------------------------------------------------------------------------------- refusals
def _refused(*args, match: str):
    result = cli("export", *args)
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert re.search(match, " ".join(result.stderr.split())), result.stderr
    return result


def test_bad_input_is_refused_with_a_sentence_and_nothing_written(tiny_adapter, tiny_base, other_tiny_base, tmp_path):
    out = tmp_path / "out"
    base = ["--base-model", str(tiny_base)]
    _refused("--model-path", str(tmp_path), "--output", str(out), *base, match="not a LoRA adapter directory")
    _refused("--model-path", str(tiny_adapter), "--output", str(out), "--format", "gguf", "--type", "q4_k_m", *base, match="offers q8_0, f16, f32.*llama-quantize")
    _refused("--model-path", str(tiny_adapter), "--output", str(out), "--format", "onnx", *base, match="choose one of hf, gguf, gguf-lora")
    _refused("--model-path", str(tiny_adapter), "--output", str(out), "--type", "f16", *base, match="--type applies to")
    _refused("--model-path", str(tiny_adapter), "--output", str(out), "--base-model", str(other_tiny_base), match="was trained on base model")
    assert not out.exists() and not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    _refused("--model-path", str(tiny_adapter), "--output", str(out), *base, match="exists.*--overwrite")
    assert (out / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("change, match", [
    ({"use_rslora": True}, "rsLoRA"),
    ({"use_dora": True}, "DoRA"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"target_modules": ["q_proj", "embed_tokens"]}, "embedding or LM head"),
    ({"trainable_token_indices": {"embed_tokens": [105, 106]}}, "trained token rows .*--train-tokens none"),
])
def test_gguf_lora_refuses_what_llama_cpp_cannot_apply(change, match, tiny_lora_only_adapter, tiny_base, tmp_path):
    adapter = tmp_path / "adapter"
    shutil.copytree(tiny_lora_only_adapter, adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps(config | change))
    _refused("--model-path", str(adapter), "--base-model", str(tiny_base), "--format", "gguf-lora", "--output", str(tmp_path / "o"),
             match=f"adapter_config.json: --format gguf-lora cannot carry .*{match}.*--format gguf")
    assert not (tmp_path / "o").exists()


def test_overwrite_replaces_a_previous_export(exports, tiny_lora_only_adapter, tiny_base, tmp_path):
    out = tmp_path / "again"
    shutil.copytree(exports[("gguf-lora", "f32")], out)
    (out / "stale.txt").write_text("old")
    result = cli("export", "--model-path", str(tiny_lora_only_adapter), "--base-model", str(tiny_base), "--format", "gguf-lora", "--output", str(out), "--overwrite")
    assert result.returncode == 0, result.stderr
    assert not (out / "stale.txt").exists() and list(out.glob("*.gguf"))
