"""The command line on bad input: a sentence that names the problem, exit code 2, nothing written."""

import io
import json

from conftest import run_cli

from banklora.chat import Conversation, repl
from banklora.config import GenerationSettings
from banklora.data.format import encode_prompt
from banklora.generate import generate_batch
from banklora.modeling import load


def test_missing_data_file_exit_2_and_no_adapter(tmp_path):
    out = tmp_path / "adapter"
    result = run_cli("train", "--data", str(tmp_path / "nope.jsonl"), "--output-dir", str(out))
    assert result.returncode == 2
    assert "nope.jsonl does not exist" in result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists()


def test_malformed_data_names_line_and_field(tmp_path):
    bad = tmp_path / "faq.jsonl"
    bad.write_text('{"instruction": "开户需要什么？", "output": "身份证"}\n{"instruction": "挂失", "outptu": "x"}\n')
    result = run_cli("train", "--data", str(bad), "--output-dir", str(tmp_path / "a"))
    assert result.returncode == 2
    assert f"{bad}:2: field 'output' is missing" in " ".join(result.stderr.split())
    assert list(tmp_path.iterdir()) == [bad]


def test_fp16_refused(tmp_path):
    result = run_cli("train", "--dtype", "fp16", "--output-dir", str(tmp_path / "a"))
    assert result.returncode == 2 and "fp16 is refused for Gemma" in result.stderr


def test_compare_with_missing_adapter(tmp_path):
    result = run_cli("compare", "--peft-model-path", str(tmp_path / "none"))
    assert result.returncode == 2
    assert "does not exist; train an adapter first" in " ".join(result.stderr.split())
    assert not (tmp_path / "reports").exists()


def test_adapter_trained_on_another_base_is_refused(tiny_adapter, other_tiny_base):
    result = run_cli("chat", "--model-path", str(tiny_adapter), "--base-model", str(other_tiny_base), "--prompt", "你好")
    assert result.returncode == 2
    assert "was trained on base model" in " ".join(result.stderr.split())


def test_chat_one_shot_prompt_on_tiny_adapter(tiny_adapter):
    result = run_cli("chat", "--model-path", str(tiny_adapter), "--prompt", "怎么开户？", "--max-new-tokens", "5", "--temperature", "0", "--no-stream")
    assert result.returncode == 0, result.stderr
    # the CLI prints exactly the greedy answer of the adapter it loaded
    loaded = load(str(tiny_adapter))
    prompt = encode_prompt(loaded.tokenizer, "怎么开户？")
    expected = generate_batch(loaded.model, loaded.tokenizer, [prompt], GenerationSettings(max_new_tokens=5))[0]
    assert result.stdout.strip() == expected.text


def test_repl_commands_history_and_reset(tiny_adapter):
    loaded = load(str(tiny_adapter))
    inputs = iter(["/help", "第一个问题", "第二个问题", "/reset", "/bogus", "/exit", "never read"])
    out = io.StringIO()
    seen_prompts = []

    def read(prompt):
        seen_prompts.append(prompt)
        return next(inputs)

    repl(loaded, GenerationSettings(max_new_tokens=3), stream=True, max_context=512, out=out, read=read)
    text = out.getvalue()
    assert "/reset" in text and "Ctrl-C" in text  # help was shown
    assert text.count("bot> ") == 2
    assert "(conversation cleared)" in text and "unknown command /bogus" in text
    assert len(seen_prompts) == 6  # stopped reading at /exit


def test_history_is_trimmed_oldest_first(tokenizer):
    conv = Conversation(tokenizer, max_context=60, max_new_tokens=10)
    for i in range(5):
        ids = conv.prompt_for(f"第{i}个问题：请详细说明开户流程")
        assert ids is not None and len(ids) + 10 <= 60
        conv.answered(f"第{i}个回答：需要身份证")
    assert conv.turns[0]["content"].startswith("第4") or conv.turns[0]["content"].startswith("第3")
    assert conv.prompt_for("很长" * 200) is None  # alone it cannot fit


class _InterruptOnFirstPiece(io.StringIO):
    """A terminal where the user presses Ctrl-C as soon as the answer starts to appear."""

    def __init__(self):
        super().__init__()
        self.interrupted = False

    def write(self, text):
        if not self.interrupted and self.getvalue().endswith("bot> "):
            self.interrupted = True
            raise KeyboardInterrupt
        return super().write(text)


def test_ctrl_c_stops_the_answer_but_not_the_chat(tiny_adapter):
    loaded = load(str(tiny_adapter))
    inputs = iter(["说一段很长的话", "/exit"])
    out = _InterruptOnFirstPiece()
    settings = GenerationSettings(max_new_tokens=2000)  # far longer than the test lets it run
    repl(loaded, settings, stream=True, max_context=4096, out=out, read=lambda _: next(inputs))
    text = out.getvalue()
    assert out.interrupted and "[stopped]" in text
    answer = text.split("bot> ", 1)[1].split(" [stopped]")[0]
    assert len(loaded.tokenizer(answer)["input_ids"]) < 1000  # stopped long before the budget


def test_doctor_reports_each_check(tiny_base, tmp_path):
    ok = run_cli("doctor", "--base-model", str(tiny_base))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    for check in ("python", "libraries", "device", "threads", "model", "generation"):
        assert f" {check}" in ok.stdout
    assert "everything is ready" in ok.stdout

    broken = run_cli("doctor", "--base-model", str(tmp_path / "missing"))
    assert broken.returncode != 0
    assert "FAIL" in broken.stdout and "no such directory" in broken.stdout


def test_data_tools_stats_check_augment_export(tmp_path):
    plot = tmp_path / "stats.png"
    stats = run_cli("data", "stats", "--plot", str(plot))
    assert stats.returncode == 0, stats.stderr
    assert "360 examples" in stats.stdout and "p50" in stats.stdout and "12 categories" in stats.stdout
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    augmented = tmp_path / "augmented.jsonl"
    assert run_cli("data", "augment", "--output", str(augmented)).returncode == 0
    rows = [json.loads(line) for line in augmented.read_text().splitlines()]
    assert len(rows) > 360 and sum(r["id"].endswith("-aug1") for r in rows) == sum(r["split"] == "train" for r in rows[:360])
    check = run_cli("data", "check", "--data", str(augmented))
    assert check.returncode == 0 and "no leakage" in check.stdout

    leaky = tmp_path / "leaky.jsonl"
    leaky.write_text(json.dumps({"instruction": "信用卡逾期了会有什么后果？", "output": "x", "split": "test"}, ensure_ascii=False) + "\n")
    leak = run_cli("data", "check", "--data", "banking", "--data", str(leaky))
    assert leak.returncode == 1 and "LEAK" in leak.stdout and "near-copies" in leak.stderr

    pii = tmp_path / "pii.jsonl"
    pii.write_text(json.dumps({"instruction": "我的卡号4111111111111111被冻结了", "output": "请携带身份证到网点处理。"}, ensure_ascii=False) + "\n")
    refused = run_cli("train", "--data", str(pii), "--output-dir", str(tmp_path / "never"))
    assert refused.returncode == 2 and f"{pii}:1: field 'instruction': bank_card" in refused.stderr
    assert not (tmp_path / "never").exists()
    exported = tmp_path / "clean.jsonl"
    assert run_cli("data", "export", "--data", str(pii), "--redact", "--output", str(exported)).returncode == 0
    assert json.loads(exported.read_text())["instruction"] == "我的卡号[银行卡号]被冻结了"
