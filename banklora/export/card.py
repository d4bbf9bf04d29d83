"""The model card (README.md) of an export: what the files are, where they came from, how to run them."""

from __future__ import annotations

from pathlib import Path

from banklora.card import GEMMA_TERMS
from banklora.io import atomic_write_text

_RUN = {
    "hf": [
        "transformers: `AutoModelForCausalLM.from_pretrained(\"{dir}\")` (no banklora code needed)",
        "vLLM: `vllm serve {dir}`",
        "llama.cpp: `python convert_hf_to_gguf.py {dir}`, or `banklora export --format gguf`",
    ],
    "gguf": [
        "llama.cpp: `llama-server -m {dir}/{file}` (the chat template and `<end_of_turn>` stop are in the file)",
        "Ollama: `ollama create {name} -f {dir}/Modelfile`, then `ollama run {name}`",
        "smaller: `llama-quantize {dir}/{file} {name}-q4_k_m.gguf Q4_K_M` (from the f16 or q8_0 file)",
    ],
    "gguf-lora": [
        "llama.cpp (recommended): `llama-server -m BASE.gguf --lora {dir}/{file}`",
        "Ollama: `ollama create {name} -f {dir}/Modelfile` (ADAPTER over the base GGUF; Ollama does not list Gemma 3 adapters)",
    ],
}


def write_card(directory: Path, kind: str, lineage: dict, file: str | None = None) -> None:
    base, adapter = lineage["base_model"], lineage["adapter"]
    name = adapter["name"]
    training = adapter.get("meta", {}).get("training", {})
    what = {"hf": "the adapter merged into its base, fp32 safetensors (Gemma3ForCausalLM)",
            "gguf": f"the adapter merged into its base, one GGUF file ({file})",
            "gguf-lora": f"the LoRA adapter alone as a llama.cpp LoRA GGUF ({file})"}[kind]
    lines = [
        "---",
        f"base_model: {base['hub_id']}",
        "library_name: " + ("transformers" if kind == "hf" else "gguf"),
        "license: gemma",
        "tags: [banklora, gemma3, banking, lora]",
        "---",
        "",
        f"# {name} ({kind})",
        "",
        f"Exported by banklora {lineage['banklora_version']}: {what}.",
        "",
        f"- base: {base['name']} (weights sha256 {base['sha256'][:16]}...)",
        f"- adapter: {adapter['path']} (sha256 {(adapter['sha256'] or '?')[:16]}...)",
    ]
    if training:
        lines.append(f"- trained on {', '.join(map(str, training.get('data', []))) or '?'} for {training.get('steps', '?')} steps")
    # the directory's name once renamed into place: `directory` is still the temporary build folder here
    shown = Path(lineage.get("output", directory)).name
    lines += ["", "## Run it", ""] + [f"- {line.format(dir=shown, file=file, name=name)}" for line in _RUN[kind]]
    lines += ["", "Chat format: `<start_of_turn>user\\n...<end_of_turn>\\n<start_of_turn>model\\n`; stop at `<end_of_turn>` (id 106) and `<eos>` (id 1).",
              "", f"Gemma is provided under the Gemma Terms of Use: {GEMMA_TERMS}", ""]
    atomic_write_text(directory / "README.md", "\n".join(lines))
