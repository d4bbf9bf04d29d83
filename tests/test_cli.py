"""The command line on bad input: a sentence that names the problem, exit code 2, nothing written.

Most run in-process through typer's runner (the same parsing, messages and exit codes); one
smoke test runs the installed program in its own process.
"""

import io
import json
import re
from pathlib import Path

from conftest import cli, run_cli

from banklora.chat import Conversation, repl
from banklora.config import GenerationSettings
from banklora.data.format import encode_prompt
from banklora.config import CHAT_REPETITION_PENALTY
from banklora.inference.generate import generate_batch
from banklora.modeling import load


def test_the_program_refuses_a_missing_data_file_with_exit_2_and_no_adapter(tmp_path):
    out = tmp_path / "adapter"
    result = run_cli("train", "--data", str(tmp_path / "nope.jsonl"), "--output-dir", str(out))
    assert result.returncode == 2
    assert "nope.jsonl does not exist" in result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists()


def test_malformed_data_names_line_and_field(tmp_path):
    bad = tmp_path / "faq.jsonl"
    bad.write_text('{"instruction": "开户需要什么？", "output": "身份证"}\n{"instruction": "挂失", "outptu": "x"}\n')
    result = cli("train", "--data", str(bad), "--output-dir", str(tmp_path / "a"))
    assert result.returncode == 2
    assert f"{bad}:2: field 'output' is missing" in " ".join(result.stderr.split())
    assert list(tmp_path.iterdir()) == [bad]


def test_fp16_refused(tmp_path):
    result = cli("train", "--dtype", "fp16", "--output-dir", str(tmp_path / "a"))
    assert result.returncode == 2 and "fp16 is refused for Gemma" in result.stderr


def test_compare_with_missing_adapter(tmp_path):
    result = cli("compare", "--peft-model-path", str(tmp_path / "none"))
    assert result.returncode == 2
    assert "does not exist; train an adapter first" in " ".join(result.stderr.split())
    assert not (tmp_path / "reports").exists()


def test_adapter_trained_on_another_base_is_refused(tiny_adapter, other_tiny_base):
    result = cli("chat", "--model-path", str(tiny_adapter), "--base-model", str(other_tiny_base), "--prompt", "你好")
    assert result.returncode == 2
    assert "was trained on base model" in " ".join(result.stderr.split())


def test_a_truncated_adapter_is_named_as_damaged(tiny_adapter, tmp_path):
    import shutil

    damaged = tmp_path / "damaged"
    shutil.copytree(tiny_adapter, damaged)
    weights = damaged / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    result = cli("chat", "--model-path", str(damaged), "--prompt", "你好")
    message = " ".join(result.stderr.split())
    assert result.returncode == 2, result.stderr
    assert f"{weights} is damaged" in message and "truncated" in message and "train the adapter again" in message


def test_a_base_with_a_foreign_tokenizer_is_refused_before_training(tiny_base, tmp_path):
    import shutil

    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    foreign = tmp_path / "not-gemma"
    foreign.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_base / name, foreign / name)
    raw = Tokenizer(models.WordLevel({"[UNK]": 0, "<s>": 1, "</s>": 2}, unk_token="[UNK]"))
    PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]", bos_token="<s>", eos_token="</s>").save_pretrained(foreign)
    result = cli("train", "--base-model", str(foreign), "--output-dir", str(tmp_path / "a"), "--max-steps", "1")
    assert result.returncode == 2, result.stderr
    assert "not a Gemma tokenizer" in " ".join(result.stderr.split())
    assert not (tmp_path / "a").exists()


def test_chat_one_shot_prompt_on_tiny_adapter(tiny_adapter):
    result = cli("chat", "--model-path", str(tiny_adapter), "--prompt", "怎么开户？", "--max-new-tokens", "5", "--temperature", "0", "--no-stream")
    assert result.returncode == 0, result.stderr
    # the CLI prints exactly the greedy answer of the adapter it loaded
    loaded = load(str(tiny_adapter))
    prompt = encode_prompt(loaded.tokenizer, "怎么开户？")
    expected = generate_batch(loaded.model, loaded.tokenizer, [prompt], GenerationSettings(max_new_tokens=5, repetition_penalty=CHAT_REPETITION_PENALTY))[0]
    assert result.stdout.strip() == expected.text  # chat's default repetition penalty included


def test_chat_penalty_flags_reach_the_generation_settings(monkeypatch):
    """The flags as parsed reach the answer's settings (the answer itself: test_serve's penalty test)."""
    import banklora.chat
    import banklora.modeling

    seen = []
    monkeypatch.setattr(banklora.modeling, "load", lambda *args, **kwargs: None)
    monkeypatch.setattr(banklora.chat, "answer_once", lambda loaded, prompt, settings, stream, out: seen.append(settings))
    for flags, expected in (((), (CHAT_REPETITION_PENALTY, 0.0, 0.0)),  # chat curbs loops by default
                            (("--repetition-penalty", "1.3", "--frequency-penalty", "0.5", "--presence-penalty", "-0.5"), (1.3, 0.5, -0.5))):
        result = cli("chat", "--prompt", "你好", *flags)
        assert result.returncode == 0, result.stderr
        assert (seen[-1].repetition_penalty, seen[-1].frequency_penalty, seen[-1].presence_penalty) == expected
    for flag, value, sentence in (("--repetition-penalty", "0", "--repetition-penalty must be positive"),
                                  ("--frequency-penalty", "2.5", "--frequency-penalty must be in [-2, 2]"),
                                  ("--presence-penalty", "-3", "--presence-penalty must be in [-2, 2]")):
        result = cli("chat", "--prompt", "你好", flag, value)  # refused before any model loads
        message = " ".join(result.stderr.split())
        assert result.returncode == 2 and sentence in message and f"(got {value})" in message, result.stderr
    assert len(seen) == 2


def test_compare_stays_greedy_unless_a_penalty_is_given_and_the_report_says_so(tiny_adapter, tmp_path):
    import shutil

    adapter = tmp_path / "adapter"
    shutil.copytree(tiny_adapter, adapter)  # compare writes its results into the adapter's card
    report = tmp_path / "r.json"
    result = cli("compare", "--peft-model-path", str(adapter), "--limit", "2", "--knowledge", "none", "--max-new-tokens", "6",
                 "--no-answers", "--repetition-penalty", "1.3", "--report", str(report))
    assert result.returncode == 0, result.stderr
    generation = json.loads(report.read_text())["generation"]
    assert generation["repetition_penalty"] == 1.3 and generation["frequency_penalty"] == 0 and generation["temperature"] == 0
    assert generation["decoding"] == "greedy, repetition_penalty 1.3"
    assert "; greedy, repetition_penalty 1.3, 6 new tokens;" in report.with_suffix(".md").read_text()
    assert "greedy, repetition_penalty 1.3, 6 new tokens" in report.with_suffix(".html").read_text()
    assert "greedy, repetition_penalty 1.3" in result.stdout
    assert GenerationSettings().decoding() == "greedy"  # the default compare's header, as before


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


def test_a_streamed_answer_runs_on_the_engine_and_equals_the_batch_answer(tiny_adapter):
    """chat streams from the same engine compare and the server run, stepped in the thread that reads
    the answer (no worker thread): greedy, the pieces add up to the answer compare would give, and a
    cancelled answer stops where it was and keeps its text."""
    import threading

    from banklora.inference.generate import Stream

    loaded = load(str(tiny_adapter))
    prompt = encode_prompt(loaded.tokenizer, "信用卡逾期有什么后果？")
    settings = GenerationSettings(max_new_tokens=12)
    threads = threading.active_count()
    stream = Stream(loaded.model, loaded.tokenizer, prompt, settings)
    pieces = []
    for piece in stream:
        pieces.append(piece)
        assert threading.active_count() == threads and not any(t.name == "banklora-engine" for t in threading.enumerate())
    assert len(pieces) > 1 and "".join(pieces) == stream.text
    assert stream.text.strip() == generate_batch(loaded.model, loaded.tokenizer, [prompt], settings)[0].text
    long = Stream(loaded.model, loaded.tokenizer, prompt, GenerationSettings(max_new_tokens=2000))
    it = iter(long)
    first = next(it)
    long.cancel()
    assert list(it) == [] and long.text == first


def test_history_is_trimmed_oldest_first_and_kept_when_a_message_is_too_long(tokenizer):
    conv = Conversation(tokenizer, max_context=60, max_new_tokens=10)
    for i in range(5):
        ids = conv.prompt_for(f"第{i}个问题：请详细说明开户流程")
        assert ids is not None and len(ids) + 10 <= 60
        conv.answered(f"第{i}个回答：需要身份证")
    assert conv.turns[0]["content"].startswith("第4") or conv.turns[0]["content"].startswith("第3")
    before = list(conv.turns)
    assert conv.prompt_for("很长" * 200) is None  # alone it cannot fit
    assert conv.turns == before  # and the conversation so far is still there


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
    ok = cli("doctor", "--base-model", str(tiny_base))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    for check in ("python", "libraries", "device", "threads", "model", "generation"):
        assert f" {check}" in ok.stdout
    assert "verified" in ok.stdout and "everything is ready" in ok.stdout

    broken = cli("doctor", "--base-model", str(tmp_path / "missing"))
    assert broken.returncode == 1
    assert "FAIL" in broken.stdout and "no such directory" in broken.stdout


def test_data_tools_stats_check_augment_export_scan_register(tmp_path, monkeypatch):
    plot = tmp_path / "stats.png"
    stats = cli("data", "stats", "--plot", str(plot))
    assert stats.returncode == 0, stats.stderr
    assert "360 examples" in stats.stdout and "p50" in stats.stdout and "12 categories" in stats.stdout
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    augmented = tmp_path / "augmented.jsonl"
    assert cli("data", "augment", "--output", str(augmented)).returncode == 0
    rows = [json.loads(line) for line in augmented.read_text().splitlines()]
    assert len(rows) > 360 and sum(r["id"].endswith("-aug1") for r in rows) == sum(r["split"] == "train" for r in rows[:360])
    check = cli("data", "check", "--data", str(augmented))
    assert check.returncode == 0 and "no leakage" in check.stdout

    leaky = tmp_path / "leaky.jsonl"
    leaky.write_text(json.dumps({"instruction": "信用卡逾期了会有什么后果？", "output": "x", "split": "test"}, ensure_ascii=False) + "\n")
    leak = cli("data", "check", "--data", "banking", "--data", str(leaky))
    assert leak.returncode == 1 and "LEAK" in leak.stdout and "near-copies" in leak.stderr

    pii = tmp_path / "pii.jsonl"
    pii.write_text(json.dumps({"instruction": "我的卡号4111111111111111被冻结了", "output": "请携带身份证到网点处理。"}, ensure_ascii=False) + "\n")
    scan = cli("data", "scan", "--data", str(pii))
    assert scan.returncode == 1 and f"{pii}:1: field 'instruction': bank_card" in scan.stdout
    assert cli("data", "scan").stdout.strip() == "no personal data found in banking"
    refused = cli("train", "--data", str(pii), "--output-dir", str(tmp_path / "never"))
    assert refused.returncode == 2 and f"{pii}:1: field 'instruction': bank_card" in refused.stderr
    assert not (tmp_path / "never").exists()
    exported = tmp_path / "clean.jsonl"
    assert cli("data", "export", "--data", str(pii), "--redact", "--output", str(exported)).returncode == 0
    assert json.loads(exported.read_text())["instruction"] == "我的卡号[银行卡号]被冻结了"

    monkeypatch.chdir(tmp_path)  # the registry file lives in the working directory
    registered = cli("data", "register", "clean_faq", str(exported), "--description", "cleaned")
    assert registered.returncode == 0 and "banklora_datasets.yaml" in registered.stdout
    assert "1 examples from clean_faq" in cli("data", "stats", "--data", "clean_faq").stdout
    assert cli("data", "register", "banking", str(exported)).returncode == 2  # a built-in name


def _commands(group, prefix=()):
    for name, command in group.commands.items():
        if hasattr(command, "commands"):  # a group (typer's groups are not click.Group subclasses)
            yield from _commands(command, (*prefix, name))
        else:
            yield (*prefix, name), command


def test_every_commands_help_fits_80_columns_and_names_every_flag_in_full():
    import typer

    from banklora.cli import app

    commands = list(_commands(typer.main.get_command(app)))
    assert len(commands) >= 12
    for path, command in commands:
        result = cli(*path, "--help", columns=80)
        text = result.stdout
        assert result.returncode == 0, path
        assert max(len(line) for line in text.splitlines()) <= 80, (path, max(text.splitlines(), key=len))
        for param in command.params:
            for flag in param.opts + param.secondary_opts:
                if flag.startswith("--"):
                    assert re.search(rf"(^|[\s,/]){re.escape(flag)}([\s,=/]|$)", text, re.MULTILINE), (path, flag)


def test_quickstart_runs_data_train_compare_on_a_given_base(tiny_base, tmp_path, monkeypatch):
    from rich.cells import cell_len
    from rich.console import Console

    import banklora.cli as cli_module

    monkeypatch.setattr(cli_module, "console", Console(width=80))  # what a CI log or a default terminal gives
    monkeypatch.chdir(tmp_path)
    out = Path("quick")
    result = cli("quickstart", "--base-model", str(tiny_base), "--output-dir", str(out), "--max-steps", "2")
    assert result.returncode == 0, result.stderr
    for stage in ("1/3 data", "2/3 train", "3/3 compare", "quickstart finished", f"banklora chat --model-path {out}",
                  f"banklora serve --model-path {out}"):
        assert stage in result.stdout, stage
    meta = json.loads((out / "banklora_meta.json").read_text())
    assert meta["training"]["data"] == ["banking"] and meta["training"]["epochs"] == 1.0 and meta["training"]["lr"] == 1e-3
    assert meta["base_model"]["path"] == str(tiny_base) and meta["training"]["steps_done"] == 2
    report = json.loads((tmp_path / "reports" / "quick_compare.json").read_text())
    assert report["models"] == ["base", "quick"] and len(report["questions"]) == 8
    assert report["knowledge"]["accuracy"]["quick"]["all"]["n"] == 120 and "knowledge test (banking-mcq)" in result.stdout
    assert meta["evaluation"]["questions"] == 8  # the model card now carries the comparison
    assert "### banklora compare (8 questions from banking-eval" in (out / "README.md").read_text()
    # laid out for 80 columns: no line wider, no cell cut; the only "…" are the answers' excerpts (the reports hold them whole)
    lines = result.stdout.splitlines()
    assert max(cell_len(line) for line in lines) <= 80, max(lines, key=cell_len)  # in terminal cells: a Chinese character takes two
    excerpts = sum(len(" ".join(q["answers"][m]["answer"].split())) > 160 for q in report["questions"] for m in report["models"])
    assert result.stdout.count("…") == excerpts
    for shown in ("means per model", "answers that end", "95% CI of Δ", "significant", "knowledge test (banking-mcq)"):
        assert shown in result.stdout, shown


def test_the_training_pages_flag_table_holds_every_setting_with_its_default():
    from pathlib import Path

    from banklora.config import flags

    readme = (Path(__file__).parent.parent / "docs" / "training.md").read_text()
    table = readme.split("| flag | default | |", 1)[1].split("\n\n", 1)[0]
    shown = {}
    for row in table.splitlines()[2:]:
        names, defaults = (cell.strip() for cell in row.strip("|").split("|")[:2])
        names = [n.strip("` ").split()[0] for n in names.split(" / ")]
        values = [d.strip("` ") for d in defaults.split(" / ")] if " / " in defaults else [defaults.strip("` ")] * len(names)
        shown.update(zip(names, values))
    for f in flags():
        assert f.flag in shown, f"{f.flag} is missing from docs/training.md's table"
        if f.default is None:
            continue  # shown in words (all, off, <output-dir>-checkpoints)
        expected = ("on" if f.default else "off") if f.type is bool else ",".join(f.default) if isinstance(f.default, tuple) else str(f.default)
        assert shown[f.flag] == expected, (f.flag, shown[f.flag], expected)
