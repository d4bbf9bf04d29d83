"""Nothing lost: where train, export, data and compare may write (banklora/destination.py).

Each refusal is a sentence with exit 2 before any work, and the user's files are still there
after it. The rule: replace only what banklora wrote or an empty directory; anything else needs
--overwrite; never a path the command reads (adapter, base, data, caches) or a folder holding one.
"""

import json
import os
import re
import shutil
from pathlib import Path

import pytest

from banklora import checkpoint
from banklora.config import TrainSettings
from banklora.train import train
from conftest import cli


def _refused(*args, match: str):
    result = cli(*args)
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert re.search(match, " ".join(result.stderr.split())), result.stderr
    return result


def _tree(path: Path) -> dict[str, bytes]:
    """Every file under `path` with its bytes: what must survive a refusal unchanged."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture
def unwritable(tmp_path) -> Path:
    """A folder this process cannot create files in (root ignores permission bits: /sys then)."""
    if os.geteuid() != 0:
        folder = tmp_path / "read-only"
        folder.mkdir()
        folder.chmod(0o500)
        yield folder
        folder.chmod(0o700)
        return
    try:
        Path("/sys/.banklora-probe").touch()
    except OSError:
        yield Path("/sys")
        return
    pytest.skip("no unwritable folder on this machine")


# ------------------------------------------------------------------------------------- train
def _user_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "thesis"
    folder.mkdir()
    (folder / "thesis.txt").write_text("three years of work")
    return folder


def _user_base(tmp_path: Path) -> Path:
    base = tmp_path / "mybase"
    base.mkdir()
    (base / "config.json").write_text("{}")
    (base / "model.safetensors").write_text("1 GB of weights")
    return base


@pytest.mark.parametrize("case", ["foreign folder", "a file", "the base model", "the folder holding the data", "the embedded cache",
                                  "the current directory", "empty", "same as checkpoints", "checkpoints inside it"])
def test_train_refuses_an_output_it_must_not_replace_before_loading_anything(case, tiny_base, small_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("BANKLORA_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "mydata" / "train.jsonl"
    data.parent.mkdir()
    shutil.copy(small_data, data)
    (tmp_path / "cache" / "gemma-3-270m").mkdir(parents=True)
    (tmp_path / "cache" / "gemma-3-270m" / "config.json").write_text("{}")
    base = ["--base-model", str(tiny_base)]
    args, match = {
        "foreign folder": (["--output-dir", str(_user_folder(tmp_path))], r"exists and is a directory banklora did not write \(it holds thesis.txt\).*--overwrite"),
        "a file": (["--output-dir", str(tmp_path / "notes.txt")], r"exists and is a file.*--overwrite"),
        "the base model": (["--base-model", str(_user_base(tmp_path)), "--output-dir", str(tmp_path / "mybase"), "--overwrite"],
                           r"is the base model .* never replaces it, even with --overwrite"),
        "the folder holding the data": ([*base, "--output-dir", str(data.parent), "--overwrite"], r"holds the data .*which this command reads"),
        "the embedded cache": ([*base, "--output-dir", str(tmp_path / "cache" / "gemma-3-270m"), "--overwrite"], r"is the embedded base model"),
        "the current directory": ([*base, "--output-dir", "."], r"--output-dir \. is the current directory"),
        "empty": ([*base, "--output-dir", ""], r"--output-dir is empty; name a directory"),
        "same as checkpoints": ([*base, "--output-dir", "cx", "--checkpoint-dir", "cx"], r"must be separate folders"),
        "checkpoints inside it": ([*base, "--output-dir", "cx", "--checkpoint-dir", "cx/ck"], r"must be separate folders"),
    }[case]
    (tmp_path / "notes.txt").write_text("my notes")
    before = _tree(tmp_path)
    _refused("train", "--data", str(data), "--max-steps", "1", *([] if "--base-model" in args else base), *args, match=match)
    assert _tree(tmp_path) == before  # nothing deleted, nothing added (no checkpoints folder either)
    assert not any(".old-" in p.name or ".tmp-" in p.name for p in tmp_path.rglob("*"))


def _quick(tiny_base, small_data, out, **kw) -> TrainSettings:
    return TrainSettings(**dict(base_model=str(tiny_base), data=(str(small_data),), output_dir=str(out), max_steps=1, batch_size=2, lr=1e-3,
                                turn_end_budget=0, save_every=0) | kw)


def test_train_replaces_its_own_adapter_and_with_overwrite_a_file(tiny_base, small_data, tmp_path):
    out = tmp_path / "adapter"
    train(_quick(tiny_base, small_data, out), show_progress=False)
    first = (out / "adapter_model.safetensors").stat().st_mtime_ns
    train(_quick(tiny_base, small_data, out, seed=7), show_progress=False)  # banklora's own adapter: replaced without --overwrite
    assert (out / "adapter_model.safetensors").stat().st_mtime_ns != first
    taken = tmp_path / "taken"
    taken.write_text("a file in the way")
    train(_quick(tiny_base, small_data, taken), show_progress=False, overwrite=True)
    assert (taken / "adapter_model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "taken"]  # no hidden .taken.old-PID left beside it


def test_a_checkpoint_folder_of_the_users_keeps_their_files(tiny_base, small_data, tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    out = tmp_path / "adapter"
    train(_quick(tiny_base, small_data, out, checkpoint_dir=str(folder), max_steps=2, save_every=1), show_progress=False)
    assert (out / "metrics.jsonl").is_file()
    assert _tree(folder) == {"notes.txt": b"keep me"}  # the run's checkpoints and metrics went; the user's file stayed
    # a fresh run in a folder of a finished run's leftovers removes only what a run writes
    checkpoint.remove_run(folder, ("metrics.jsonl",))
    assert _tree(folder) == {"notes.txt": b"keep me"}
    (folder / "notes.txt").unlink()
    checkpoint.remove_run(folder)
    assert not folder.exists()  # empty: removed


def test_non_finite_settings_are_sentences_and_a_failed_run_leaves_no_litter(tiny_base, small_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for flag in ("--lr", "--lora-dropout", "--weight-decay", "--epochs", "--warmup-cap"):
        for value in ("nan", "inf"):
            _refused("train", "--base-model", str(tiny_base), "--data", str(small_data), flag, value, match=f"{flag} must be a finite number")
    assert list(tmp_path.iterdir()) == []
    # a run that fails before its first checkpoint (diverged) leaves neither adapter nor checkpoint folder
    with pytest.raises(Exception, match="diverged"):
        train(_quick(tiny_base, small_data, tmp_path / "d", lr=1e30, max_steps=6, max_bad_steps=2), show_progress=False)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------- export
@pytest.mark.parametrize("where", ["the adapter", "its parent", "the current directory"])
def test_export_overwrite_never_replaces_the_adapter_or_a_folder_holding_it(where, tiny_lora_only_adapter, tiny_base, tmp_path, monkeypatch):
    home = tmp_path / "work"
    adapter = home / "adapter"
    shutil.copytree(tiny_lora_only_adapter, adapter)
    (home / "unrelated.txt").write_text("mine")
    monkeypatch.chdir(home)
    output = {"the adapter": str(adapter), "its parent": str(home), "the current directory": "."}[where]
    before = _tree(home)
    _refused("export", "--model-path", str(adapter), "--base-model", str(tiny_base), "--format", "gguf-lora", "--output", output, "--overwrite",
             match=r"is the adapter|holds the adapter|is the current directory")
    assert _tree(home) == before


def test_export_of_a_damaged_adapter_config_is_a_sentence(tiny_lora_only_adapter, tiny_base, tmp_path):
    adapter = tmp_path / "adapter"
    shutil.copytree(tiny_lora_only_adapter, adapter)
    (adapter / "adapter_config.json").write_text("{not json")
    _refused("export", "--model-path", str(adapter), "--base-model", str(tiny_base), "--format", "gguf-lora", "--output", str(tmp_path / "o"),
             match=r"adapter_config.json is damaged: not valid JSON")


# ------------------------------------------------------------------------------------- data
def test_data_export_and_augment_refuse_to_overwrite_without_the_flag(small_data, tmp_path):
    target = tmp_path / "mine.jsonl"
    target.write_text("my own file\n")
    for command in (["data", "export"], ["data", "augment"]):
        _refused(*command, "--data", str(small_data), "--output", str(target), match=r"--output .*mine.jsonl exists and is a file.*--overwrite")
        assert target.read_text() == "my own file\n"
        _refused(*command, "--data", str(small_data), "--output", str(small_data), "--overwrite", match=r"is the data .*which this command reads")
        _refused(*command, "--data", str(small_data), "--output", str(tmp_path), match=r"is a directory; name a file")
    assert cli("data", "export", "--data", str(small_data), "--output", str(target), "--overwrite").returncode == 0
    assert json.loads(target.read_text().splitlines()[0])["instruction"]


def test_data_stats_plot_refuses_a_directory_and_a_foreign_file_and_redraws_its_own(small_data, tmp_path):
    _refused("data", "stats", "--data", str(small_data), "--plot", str(tmp_path), match=r"--plot .* is a directory; name a file")
    mine = tmp_path / "photo.png"
    mine.write_bytes(b"\x89PNG not a plot of banklora's")
    _refused("data", "stats", "--data", str(small_data), "--plot", str(mine), match=r"exists and is a file")
    assert list(tmp_path.iterdir()) == [mine]  # no stray temporary PNG
    plot = tmp_path / "stats.png"
    for _ in range(2):  # the second run redraws its own plot
        assert cli("data", "stats", "--data", str(small_data), "--plot", str(plot)).returncode == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photo.png", "stats.png"]


# ------------------------------------------------------------------------------------- unwritable
def test_an_unwritable_destination_is_refused_before_any_work(unwritable, tiny_lora_only_adapter, tiny_adapter, tiny_base, small_data, tmp_path):
    out = unwritable / "banklora-out"
    cases = [
        ("export", "--model-path", str(tiny_lora_only_adapter), "--base-model", str(tiny_base), "--format", "gguf-lora", "--output", str(out)),
        ("compare", "--peft-model-path", str(tiny_adapter), "--report", str(out / "report.json")),
        ("data", "export", "--data", str(small_data), "--output", str(out / "d.jsonl")),
        ("data", "augment", "--data", str(small_data), "--output", str(out / "d.jsonl")),
        ("data", "stats", "--data", str(small_data), "--plot", str(out / "s.png")),
        ("train", "--base-model", str(tiny_base), "--data", str(small_data), "--output-dir", str(out)),
    ]
    for args in cases:
        _refused(*args, match=r"cannot write in .*choose a folder you can write to")


def test_compare_refuses_an_empty_or_foreign_report_path_before_it_runs(tiny_adapter, tmp_path):
    _refused("compare", "--peft-model-path", str(tiny_adapter), "--report", "", match=r"--report (\. )?is (empty|the current directory)")
    foreign = tmp_path / "budget.json"
    foreign.write_text('{"year": 2026}')
    _refused("compare", "--peft-model-path", str(tiny_adapter), "--report", str(foreign), match=r"budget.json exists and is a file")
    assert foreign.read_text() == '{"year": 2026}'
    _refused("compare", "--peft-model-path", str(tiny_adapter), "--max-new-tokens", "100000", match=r"exceeds Gemma's 32,768-token context")


# ------------------------------------------------------------------------------------- a write that fails anyway
def test_an_adapter_that_cannot_be_written_keeps_the_trained_run_for_resume(tiny_base, small_data, tmp_path, monkeypatch):
    import errno

    import banklora.train as train_module
    from banklora.errors import BankloraError

    real = train_module.save_adapter

    out = tmp_path / "adapter"

    def full_disk(model, tokenizer, output_dir, *args, **kwargs):  # the disk fills as the final adapter is written
        if Path(output_dir) == out:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(model, tokenizer, output_dir, *args, **kwargs)

    monkeypatch.setattr(train_module, "save_adapter", full_disk)
    with pytest.raises(BankloraError, match=r"could not write the adapter .*No space left on device.*kept as checkpoint .*step-000003.*--resume"):
        train(_quick(tiny_base, small_data, out, max_steps=3), show_progress=False)
    assert not out.exists() and checkpoint.latest(tmp_path / "adapter-checkpoints").name == "step-000003"
    monkeypatch.setattr(train_module, "save_adapter", real)
    result = train(_quick(tiny_base, small_data, out, max_steps=3), show_progress=False, resume=True)
    assert (out / "adapter_model.safetensors").is_file() and len(result.losses) == 3
    assert not (tmp_path / "adapter-checkpoints").exists()


def test_a_report_that_cannot_be_written_is_kept_elsewhere_and_said(tiny_adapter, tmp_path, monkeypatch):
    import errno

    import banklora.evaluation.report as report_module

    real, target = report_module.write_reports, tmp_path / "reports" / "r.json"

    def flaky(result, path):
        if Path(path) == target:
            raise OSError(errno.EIO, "Input/output error")
        return real(result, path)

    monkeypatch.setattr(report_module, "write_reports", flaky)
    result = cli("compare", "--peft-model-path", str(tiny_adapter), "--limit", "1", "--knowledge", "none", "--max-new-tokens", "4",
                 "--report", str(target))
    text = " ".join(result.stderr.split())
    assert result.returncode == 1 and "could not write the report to" in text, text
    kept = Path(re.search(r"it is saved at (\S+) instead", text).group(1))
    assert json.loads(kept.read_text())["format"].startswith("banklora-compare/") and kept.with_suffix(".html").is_file()
    shutil.rmtree(kept.parent)
