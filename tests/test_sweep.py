"""`banklora sweep` on the tiny Gemma3: every setting trained, ranked by validation loss, best marked."""

import json

from conftest import cli


def test_sweep_trains_each_setting_and_marks_the_lowest_validation_loss(tiny_base, tmp_path):
    records = [{"instruction": f"问题{i}：如何办理业务{i}？", "output": f"回答{i}：请携带身份证到网点办理。", "split": "train"} for i in range(4)]
    records += [{"instruction": f"验证问题{i}", "output": f"验证回答{i}", "split": "validation"} for i in range(2)]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    root = tmp_path / "sweep"
    args = ("sweep", "--base-model", str(tiny_base), "--data", str(data), "--lora-r", "2,4", "--lora-alpha", "8",
            "--lr", "1e-2,1e-4", "--max-steps", "2", "--batch-size", "2", "--output-dir", str(root))
    result = cli(*args)
    assert result.returncode == 0, result.stderr
    rows = json.loads((root / "sweep.json").read_text())
    assert sorted(r["name"] for r in rows) == ["r2-a8-lr0.0001", "r2-a8-lr0.01", "r4-a8-lr0.0001", "r4-a8-lr0.01"]
    losses = [r["validation_loss"] for r in rows]
    assert losses == sorted(losses) and [r.get("best", False) for r in rows] == [True, False, False, False]
    assert rows[0]["lr"] == 0.01  # 2 steps at 1e-4 barely move the adapter; 1e-2 lowers the validation loss
    for row in rows:
        meta = json.loads((root / row["name"] / "banklora_meta.json").read_text())
        assert (meta["lora"]["r"], meta["lora"]["alpha"], meta["training"]["lr"]) == (row["r"], row["alpha"], row["lr"])
        assert meta["validation_loss"][-1]["loss"] == row["validation_loss"]
    assert "★ best" in result.stdout and rows[0]["name"] in (root / "sweep.md").read_text().splitlines()[2]

    # a second run reuses the trained settings instead of training them again
    stamps = {r["name"]: (root / r["name"] / "adapter_model.safetensors").stat().st_mtime_ns for r in rows}
    again = cli(*args)
    assert again.returncode == 0, again.stderr
    assert stamps == {r["name"]: (root / r["name"] / "adapter_model.safetensors").stat().st_mtime_ns for r in rows}


def test_sweep_value_mistakes_name_the_flag():
    result = cli("sweep", "--lora-r", "4,x")
    assert result.returncode == 2 and "--lora-r takes comma-separated int values" in result.stderr
