"""Bad inputs outside the server and the output paths: each a sentence with exit 2, never a
traceback, never a silent wrong answer (damaged adapters, text that is not UTF-8, messages that
name what the user really gave)."""

import json
import re
import shutil
import subprocess
import sys

import pytest
from safetensors.torch import load_file, save_file

from banklora.data.dataset import load_examples
from banklora.data.prepare import prepare
from conftest import cli


def _copy(adapter, tmp_path):
    out = tmp_path / "adapter"
    shutil.copytree(adapter, out)
    return out


def test_an_adapter_with_a_nan_tensor_is_refused_by_name_in_chat_and_export(tiny_lora_only_adapter, tiny_base, tmp_path):
    adapter = _copy(tiny_lora_only_adapter, tmp_path)
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    name = sorted(weights)[3]
    weights[name][0, 0] = float("nan")
    save_file(weights, str(adapter / "adapter_model.safetensors"))  # a valid file of the right size
    match = rf"1 tensor\(s\) hold NaN or inf \(first: {name}\).*damaged"
    for args in (("chat", "--model-path", str(adapter), "--base-model", str(tiny_base), "--prompt", "你好", "--max-new-tokens", "4"),
                 ("export", "--model-path", str(adapter), "--base-model", str(tiny_base), "--format", "gguf-lora", "--output", str(tmp_path / "o"))):
        result = cli(*args)
        assert result.returncode == 2 and re.search(match, " ".join(result.stderr.split())), result.stderr
    assert not (tmp_path / "o").exists()


def test_an_unknown_base_named_by_the_adapter_is_not_called_a_flag(tiny_lora_only_adapter, tmp_path):
    adapter = _copy(tiny_lora_only_adapter, tmp_path)
    meta = json.loads((adapter / "banklora_meta.json").read_text())
    meta["base_model"]["name"] = "gemma-3-1b"
    (adapter / "banklora_meta.json").write_text(json.dumps(meta))
    result = cli("chat", "--model-path", str(adapter), "--prompt", "你好")
    text = " ".join(result.stderr.split())
    assert result.returncode == 2 and "was trained on base model 'gemma-3-1b', which is not on this machine" in text, text
    assert "--base-model gemma-3-1b" not in text  # a flag the user never passed


def test_a_summary_with_nothing_kept_reads_as_a_sentence(tokenizer, tmp_path):
    path = tmp_path / "tiny.jsonl"
    path.write_text("".join(json.dumps({"instruction": f"问题{i}", "output": "很长的回答。" * 100}, ensure_ascii=False) + "\n" for i in range(4)))
    summary = prepare(load_examples([str(path)]), tokenizer, 32).summary()
    assert summary == "none kept; dropped 4 over max length"


def test_chat_takes_a_prompt_that_is_not_utf8_without_a_traceback(tiny_base):
    # bash's $'caf\xe9': the byte 0xE9 alone is Latin-1, not UTF-8; Python keeps it as a lone surrogate
    result = subprocess.run([sys.executable, "-m", "banklora", "chat", "--model-path", str(tiny_base), "--prompt", b"caf\xe9",
                             "--max-new-tokens", "3", "--no-stream"], capture_output=True, timeout=300)
    assert result.returncode == 0, result.stderr.decode(errors="replace")[-2000:]
    assert b"Traceback" not in result.stderr


def test_the_chat_repl_survives_a_line_that_is_not_utf8(tiny_base):
    from io import StringIO

    from banklora.chat import repl
    from banklora.config import GenerationSettings
    from banklora.modeling import load

    loaded = load(str(tiny_base))
    lines = iter(["caf\udce9", None, "/exit"])

    def read(prompt):
        line = next(lines)
        if line is None:
            raise UnicodeDecodeError("utf-8", b"\xe9", 0, 1, "invalid continuation byte")
        return line

    out = StringIO()
    repl(loaded, GenerationSettings(max_new_tokens=2), stream=False, max_context=512, out=out, read=read)
    text = out.getvalue()
    assert "read as \ufffd" in text and "bot> " in text  # answered, with the bad byte replaced
    assert "not UTF-8 text; set the terminal to UTF-8" in text  # and the undecodable line did not end the chat


def test_non_finite_generation_settings_are_sentences(tiny_adapter):
    for flag in ("--temperature", "--top-p", "--repetition-penalty"):
        result = cli("chat", "--model-path", str(tiny_adapter), "--prompt", "hi", flag, "nan")
        assert result.returncode == 2 and f"{flag} must be a finite number" in result.stderr, result.stderr
