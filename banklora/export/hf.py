"""The adapter merged into its base, saved as a plain Hugging Face Gemma3ForCausalLM checkpoint."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from banklora.errors import BankloraError, UsageError

log = logging.getLogger(__name__)

EOS_IDS = [1, 106]  # <eos> and <end_of_turn>: without the second the model never stops


def merged_model(adapter: Path, base_model: str | None):
    """(the merged fp32 Gemma3ForCausalLM, its tokenizer with the chat template), on CPU."""
    from banklora.modeling import load

    loaded = load(str(adapter), base_model=base_model, dtype="fp32", device="cpu")
    config = loaded.model.get_base_model().config
    if config.model_type != "gemma3_text":
        raise UsageError(f"export handles text-only Gemma 3 bases (model_type gemma3_text, e.g. the 270M and 1B); this base is "
                         f"{config.model_type}. Merge it with PEFT's merge_and_unload and convert with llama.cpp's convert_hf_to_gguf.py")
    log.info("merging the adapter into the base (fp32)")
    model = loaded.model.merge_and_unload()
    model.eval()
    return model, loaded.tokenizer


def write_merged(adapter: Path, base_model: str | None, directory: Path, lineage: dict) -> None:
    from safetensors import safe_open
    from transformers import GenerationConfig

    from banklora.export.card import write_card

    model, tokenizer = merged_model(adapter, base_model)
    model.generation_config = GenerationConfig(bos_token_id=2, eos_token_id=EOS_IDS, pad_token_id=0)
    model.config.eos_token_id = EOS_IDS
    model.name_or_path = lineage["adapter"]["name"]
    log.info("saving the merged checkpoint")
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    names = set()
    for shard in directory.glob("*.safetensors"):
        with safe_open(shard, "pt") as f:
            names |= set(f.keys())
    stray = sorted(n for n in names if not n.startswith("model.layers.") and n not in ("model.embed_tokens.weight", "model.norm.weight"))
    if stray:  # what vLLM's and llama.cpp's Gemma 3 loaders would not take
        raise BankloraError(f"the merged checkpoint holds unexpected tensors {stray[:3]}; nothing was exported")
    write_card(directory, "hf", lineage)


def merged_state(model) -> dict[str, torch.Tensor]:
    """The merged model's tensors under HF names, the tied LM head once (as model.embed_tokens)."""
    return {name: tensor.detach() for name, tensor in model.state_dict().items() if name != "lm_head.weight"}
