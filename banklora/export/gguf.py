"""GGUF files for llama.cpp and Ollama, written with llama.cpp's own `gguf` package, and their Modelfiles.

The merged model (write_model): hyperparameters from the base's config.json, the tokenizer
metadata copied from the embedded model's GGUF (every Gemma 3 size shares the one 262,144-token
SentencePiece vocabulary; a base whose vocabulary differs is refused), plus what that file lacks:
the Gemma turn template and `<end_of_turn>` (106) as the end-of-turn token. Tensor names from
gguf's own map for gemma3; Gemma's RMSNorm weights are stored as (1 + w), as llama.cpp's converter
stores them; the embedding is tied, so there is no `output.weight`. Types: f32; f16 (1-D tensors
stay f32); q8_0 in blocks of 32 (a tensor whose rows are not a multiple of 32 goes f16).

The adapter alone (write_lora), in convert_lora_to_gguf.py's layout: `general.type = adapter`,
`adapter.type = lora`, `adapter.lora.alpha`, and per adapted weight `<name>.lora_a` = A (r x in)
and `<name>.lora_b` = B (out x r). llama.cpp scales it by alpha / r, so what it cannot carry is
refused (check_lora_exportable).
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path

import numpy as np

from banklora.errors import BankloraError, UsageError
from banklora.io import atomic_write_text

log = logging.getLogger(__name__)

EOT_ID = 106
NUM_CTX = 4096  # Ollama's context for the Modelfile: room for banking answers, modest KV memory on CPU
OLLAMA_TEMPLATE = """{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if or (eq .Role "user") (eq .Role "system") }}<start_of_turn>user
{{ .Content }}<end_of_turn>
{{ if $last }}<start_of_turn>model
{{ end }}
{{- else if eq .Role "assistant" }}<start_of_turn>model
{{ .Content }}{{ if not $last }}<end_of_turn>
{{ end }}
{{- end }}
{{- end }}"""
_FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "q8_0": "MOSTLY_Q8_0"}
_LORA_KEY = re.compile(r"base_model\.model\.(.+)\.lora_([AB])\.weight")


# ------------------------------------------------------------------------------------- the merged model
def write_model(adapter: Path, base_model: str | None, directory: Path, gguf_type: str, lineage: dict) -> None:
    import gguf

    from banklora.export.card import write_card
    from banklora.export.hf import merged_model, merged_state

    model, tokenizer = merged_model(adapter, base_model)
    config = model.config
    source = _embedded_reader()
    _check_vocabulary(tokenizer, source)
    file = f"{lineage['adapter']['name']}-{gguf_type}.gguf"
    writer = gguf.GGUFWriter(str(directory / file), "gemma3")
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(lineage["adapter"]["name"])
    writer.add_license("gemma")
    writer.add_file_type(getattr(gguf.LlamaFileType, _FILE_TYPES[gguf_type]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _hyperparameters(writer, config)
    copy_tokenizer_fields(writer, source)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA3, config.num_hidden_layers)
    state = merged_state(model)
    log.info("encoding %d tensors as %s", len(state), gguf_type)
    for hf_name, tensor in state.items():
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise BankloraError(f"the merged model's tensor {hf_name} has no gemma3 GGUF name; nothing was exported")
        data = tensor.float().numpy()
        if hf_name.endswith("norm.weight"):
            data = data + 1  # GGUF keeps Gemma's RMSNorm scale as (1 + w)
        array, qtype = encode(data, gguf_type)
        writer.add_tensor(gguf_name, array, raw_dtype=qtype)
    log.info("writing %s", file)
    _write(writer)
    write_modelfile(directory, f"./{file}")
    write_card(directory, "gguf", lineage, file)


def encode(data: np.ndarray, gguf_type: str):
    """(array, GGML type) of a float32 tensor in `gguf_type`; 1-D tensors (norms) always f32."""
    import gguf

    q = gguf.GGMLQuantizationType
    if data.ndim == 1 or gguf_type == "f32":
        return data.astype(np.float32), q.F32
    if gguf_type == "q8_0" and data.shape[-1] % gguf.GGML_QUANT_SIZES[q.Q8_0][0] == 0:
        return gguf.quants.quantize(data, q.Q8_0), q.Q8_0
    return data.astype(np.float16), q.F16


def _hyperparameters(writer, config) -> None:
    rope = getattr(config, "rope_parameters", None) or {}
    full = rope.get("full_attention", rope) if isinstance(rope, dict) else {}
    local = rope.get("sliding_attention", {}) if isinstance(rope, dict) else {}
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(float(full.get("rope_theta", getattr(config, "rope_theta", 1_000_000.0))))
    if local.get("rope_theta") not in (None, 10_000.0):  # llama.cpp's gemma3 default for sliding layers
        writer.add_rope_freq_base_swa(float(local["rope_theta"]))
    if full.get("rope_type") == "linear":
        import gguf

        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(full["factor"]))
    elif full.get("rope_type") not in (None, "default"):
        raise UsageError(f"the base uses {full['rope_type']} rope scaling, which this GGUF export does not write; export --format hf "
                         "and convert with llama.cpp's convert_hf_to_gguf.py")
    writer.add_sliding_window(config.sliding_window)


def _embedded_reader():
    import gguf

    from banklora.basemodel import embedded_gguf

    return gguf.GGUFReader(embedded_gguf())


def _check_vocabulary(tokenizer, source) -> None:
    """The base's tokenizer must be Gemma 3's, whose GGUF metadata is copied."""
    field = source.fields["tokenizer.ggml.tokens"]
    tokens = field.contents()
    ours = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    same = len(ours) == len(tokens) and all(a == b or a.replace("\u2581", " ") == b.replace("\u2581", " ") for a, b in zip(ours, tokens))
    if not same:  # (the GGUF spells its runs-of-spaces tokens with spaces, the HF tokenizer with U+2581)
        raise UsageError(f"the base's tokenizer ({len(ours)} tokens) is not Gemma 3's {len(tokens)}-token vocabulary, whose GGUF "
                         "metadata banklora writes; export --format hf and convert with llama.cpp's convert_hf_to_gguf.py")


def copy_tokenizer_fields(writer, source) -> None:
    """Gemma 3's tokenizer metadata as the embedded GGUF has it, plus its chat template and end-of-turn id."""
    import gguf

    from banklora.data.format import GEMMA_CHAT_TEMPLATE

    for name, field in source.fields.items():
        if not name.startswith("tokenizer."):
            continue
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, field.contents(), kind, sub_type=sub)
    writer.add_chat_template(GEMMA_CHAT_TEMPLATE)
    writer.add_eot_token_id(EOT_ID)


def _write(writer) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=True)
    writer.close()


# ------------------------------------------------------------------------------------- the adapter alone
def check_lora_exportable(adapter: Path) -> None:
    """Refuse, with every reason at once, an adapter llama.cpp's LoRA cannot represent."""
    from banklora.modeling import ADAPTER_CONFIG, adapter_config

    config = adapter_config(adapter)  # a damaged file: the sentence every command gives
    targets = config.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else list(targets)
    problems = []
    if config.get("use_rslora"):
        problems.append("rsLoRA (use_rslora: llama.cpp scales by alpha / r, not alpha / sqrt(r))")
    if config.get("use_dora"):
        problems.append("DoRA (use_dora: a magnitude vector llama.cpp does not apply)")
    if config.get("modules_to_save"):
        problems.append(f"modules_to_save ({', '.join(config['modules_to_save'])}: full trained copies, not LoRA)")
    if config.get("trainable_token_indices"):
        problems.append("trained token rows (trainable_token_indices: Gemma's turn tokens, which make the model end its answers; "
                        "llama.cpp's LoRA GGUF holds LoRA pairs of the decoder only, and without those rows every answer runs to the token "
                        "limit). Train with --train-tokens none for a LoRA GGUF")
    if any(re.search(r"embed_tokens|lm_head", t) for t in targets):
        problems.append("LoRA on the embedding or LM head (llama.cpp applies LoRA to the decoder's linear layers)")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        problems.append("per-layer ranks or alphas (rank_pattern/alpha_pattern: llama.cpp has one alpha)")
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        problems.append("trained biases")
    if problems:
        raise UsageError(f"{adapter / ADAPTER_CONFIG}: --format gguf-lora cannot carry " + "; ".join(problems)
                         + ". Export the merged model instead: --format gguf")


def write_lora(adapter: Path, directory: Path, gguf_type: str, lineage: dict) -> None:
    import gguf
    from safetensors.torch import load_file

    from banklora.basemodel import embedded_gguf, is_embedded
    from banklora.export.card import write_card
    from banklora.modeling import ADAPTER_CONFIG, ADAPTER_WEIGHTS

    config = json.loads((adapter / ADAPTER_CONFIG).read_text())
    weights = load_file(adapter / ADAPTER_WEIGHTS)
    parsed = {}
    for key, tensor in weights.items():
        match = _LORA_KEY.fullmatch(key)
        if match is None:
            raise UsageError(f"{adapter / ADAPTER_WEIGHTS}: tensor {key} is not a LoRA A or B weight of the decoder; "
                             "--format gguf-lora cannot carry it. Export the merged model instead: --format gguf")
        parsed[key] = (match.group(1) + ".weight", match.group(2))
    blocks = 1 + max((int(m) for m in re.findall(r"layers\.(\d+)\.", " ".join(weights))), default=0)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA3, blocks)
    file = f"{lineage['adapter']['name']}-lora-{gguf_type}.gguf"
    writer = gguf.GGUFWriter(str(directory / file), "gemma3")
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_name(lineage["adapter"]["name"])
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(config["lora_alpha"]))
    for key in sorted(weights):
        hf_name, part = parsed[key]
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight",))
        if gguf_name is None or math.prod(weights[key].shape) == 0:
            raise UsageError(f"{adapter / ADAPTER_WEIGHTS}: {key} adapts {hf_name}, which has no gemma3 GGUF name; "
                             "export the merged model instead: --format gguf")
        array, qtype = encode(weights[key].float().numpy(), gguf_type)
        writer.add_tensor(f"{gguf_name}.lora_{part.lower()}", array, raw_dtype=qtype)
    _write(writer)
    base_name = lineage["base_model"]["name"]
    if is_embedded(base_name):
        write_modelfile(directory, str(embedded_gguf()), adapter=f"./{file}")
    else:
        write_modelfile(directory, "BASE.gguf", adapter=f"./{file}",
                        note=f"# FROM: the GGUF of the base {base_name} (banklora checked the adapter against its weights' sha256)")
    write_card(directory, "gguf-lora", lineage, file)


# ------------------------------------------------------------------------------------- Ollama
def write_modelfile(directory: Path, source: str, adapter: str | None = None, note: str | None = None) -> None:
    lines = [note] if note else []
    lines += [f"FROM {source}"]
    if adapter:
        lines.append(f"ADAPTER {adapter}")
    lines += [f'TEMPLATE """{OLLAMA_TEMPLATE}"""', 'PARAMETER stop "<end_of_turn>"', f"PARAMETER num_ctx {NUM_CTX}", ""]
    atomic_write_text(directory / "Modelfile", "\n".join(lines))

