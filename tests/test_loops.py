"""Sequence-level unlikelihood: the model's own loops found, marked and trained on (banklora/loops.py)."""

import json
import os
import signal

import pytest
import torch
from safetensors.torch import load_file

from banklora import loops
from banklora.config import TrainSettings
from banklora.data.dataset import load_examples
from banklora.data.format import IGNORE_INDEX
from banklora.errors import UsageError
from banklora.evaluation.metrics import loops as is_loop
from banklora.train import OWN_LOOPS_FILE, TrainingInterrupted, train

# an answer the quickstart adapter gave on the test split (greedy), and a legitimate list that reuses words
LOOPING = ("您好，卡片正面印的有效期一般不代表您在有效期内：\n1. 银行卡背面通常有有效期，但卡片背面通常没有有效期。\n"
           "2. 银行卡背面通常有有效期，但卡片背面通常没有有效期。\n3. 银行卡背面通常有有效期，但卡片背面通常没有有效期。")
LIST = ("您好，可以按以下方式办理：\n1. 登录手机银行，在“账户”中查询明细。\n2. 登录网上银行，下载电子对账单。\n"
        "3. 携带身份证到网点柜台打印流水。\n提醒：请通过银行官方渠道办理。")


def _question():
    return load_examples(["banking-seed"])[0]


def test_a_loops_repeated_content_is_marked_and_its_list_markers_and_punctuation_are_not(tokenizer):
    assert is_loop(LOOPING) and not is_loop(LIST)
    answer = loops.marked_answer(tokenizer, _question(), LOOPING, loops.content_tokens(tokenizer))
    assert answer is not None and set(answer.labels) == {IGNORE_INDEX}  # no cross-entropy on the model's own answer
    marked = [tokenizer.decode([t]) for t in answer.negatives if t != IGNORE_INDEX]
    text = "".join(marked)
    assert "背面通常有有效期" in text and "没有有效期" in text  # the copies' content
    assert not any(ch in text for ch in "123.\n，。")  # list markers, punctuation and line breaks stay free
    first_copy = LOOPING.index("1. ") + 3
    prefix = tokenizer.encode(LOOPING[:first_copy + 12], add_special_tokens=False)
    assert len(marked) < len(tokenizer.encode(LOOPING, add_special_tokens=False)) - len(prefix)  # the first copy is not pushed down
    assert loops.marked_answer(tokenizer, _question(), LIST, loops.content_tokens(tokenizer)) is None


def test_repeated_tokens_marks_spans_said_before_and_only_content():
    content = lambda t: t != 0  # noqa: E731  (0 plays punctuation)
    answer = [5, 6, 7, 8, 9, 0, 5, 6, 7, 8, 9, 0, 4]
    marks = loops.repeated_tokens(answer, content, n=3)
    assert marks == [False] * 6 + [True] * 5 + [False, False]  # the second copy, without its "punctuation"
    assert loops.repeated_tokens([1, 2, 3, 1, 2, 4], content, n=3) == [False] * 6  # a repeated pair is vocabulary, not a loop


def test_sequence_unlikelihood_trains_on_the_models_own_loops_and_resumes_exactly(tiny_base, small_data, tmp_path):
    """The random tiny model's greedy answers loop (one token over and over): the last steps train on
    them, the reported loss stays the references' cross-entropy, the weights move, and a run
    interrupted inside those steps resumes on the same answers and the same losses."""
    def settings(out, **kw):
        values = dict(base_model=str(tiny_base), data=(str(small_data),), output_dir=str(out), epochs=1, batch_size=2, lr=1e-2,
                      save_every=1, augment=0, unlikelihood=0.0, sequence_unlikelihood=4.0, sequence_unlikelihood_steps=2,
                      sequence_unlikelihood_prompts=4, turn_end_budget=0, dtype="fp32", lora={"dropout": 0.0})
        return TrainSettings(**(values | kw))

    plain = train(settings(tmp_path / "plain", sequence_unlikelihood=0.0), show_progress=False)
    whole = train(settings(tmp_path / "whole"), show_progress=False)
    assert whole.losses[0] == plain.losses[0]  # the first of 3 steps has no loops: the same step
    assert whole.losses[1] == pytest.approx(plain.losses[1], rel=1e-4)  # the references' cross-entropy, the loops' rows beside it
    assert whole.losses[2] != plain.losses[2]  # after a step that pushed the loops down
    found = whole.meta["own_loops"]
    assert found["prompts"] == 4 and found["looped"] >= 1 and found["tokens"] > 0
    records = [json.loads(line) for line in (whole.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["own_loops"]) for r in records if "own_loops" in r] == [(1, found)]  # found once, when its steps begin
    a, b = load_file(str(plain.output_dir / "adapter_model.safetensors")), load_file(str(whole.output_dir / "adapter_model.safetensors"))
    assert any(not torch.equal(a[k], b[k]) for k in a)

    parts = settings(tmp_path / "parts")
    def interrupt(state):
        if state.step == 2:
            os.kill(os.getpid(), signal.SIGINT)
    with pytest.raises(TrainingInterrupted):
        train(parts, show_progress=False, on_step=interrupt)
    assert (parts.checkpoints / OWN_LOOPS_FILE).is_file()
    resumed = train(parts, show_progress=False, resume=True)
    assert resumed.losses == whole.losses and resumed.meta["own_loops"] == found
    c = load_file(str(resumed.output_dir / "adapter_model.safetensors"))
    # to float rounding: two uninterrupted runs of this path differ by ~1e-8 too (the plain path's are bit-identical)
    assert all(torch.allclose(b[k], c[k], rtol=0, atol=1e-6) for k in b)
    assert not parts.checkpoints.exists()


@pytest.mark.parametrize("flag, value", [("sequence_unlikelihood", -1.0), ("sequence_unlikelihood_steps", 0), ("sequence_unlikelihood_prompts", 0)])
def test_sequence_unlikelihood_mistakes_are_sentences(flag, value):
    with pytest.raises(UsageError, match="--" + flag.replace("_", "-")):
        TrainSettings(**{flag: value})
