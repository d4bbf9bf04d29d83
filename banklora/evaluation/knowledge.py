"""Knowledge tests: multiple-choice banking questions scored by likelihood, with no generation.

Each question's four options are scored as the model's answer to the question (the one
formatter: the same prompt the model answers from, the option as the assistant's turn): the
option whose tokens have the lowest mean negative log-likelihood is the model's choice, as in
lm-evaluation-harness's likelihood tasks, FinEval and C-Eval's likelihood mode. Deterministic and
cheap: one teacher-forced pass per option, batched, the same for every model.

That choice also rewards an option for being fluent whatever was asked: the embedded base picks
the option it would also pick with no question at all on 61 of the 72 taught questions, and
scores below chance. So each part is scored *calibrated* as well: the option whose likelihood
the question raises most over a neutral prompt (NEUTRAL_QUESTION), summed over its tokens
(domain-conditional PMI, Holtzman et al. 2021, "Surface Form Competition").

Accuracy per model and part: `taught` asks, in other words, facts stated in train-split answers;
`held-out` asks facts found only in validation/test answers. Per pair of models and part:
McNemar's exact test on the questions one model gets right and the other wrong, and a bootstrap
interval of the accuracy delta (both must agree for "significant", as for the other metrics).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

from banklora.data.dataset import Example
from banklora.errors import UsageError
from banklora.evaluation import statistics

BUILTIN = {"banking-mcq": "banking_mcq.jsonl"}  # 120 questions, 12 categories, zh + en, taught / held-out
PARTS = ("taught", "held-out")
OPTIONS = 4
# What the calibrated score asks instead of the question: nothing but that an answer follows ("the answer is:");
# Chinese questions (language zh, zh-CN, ...) get the Chinese prompt, every other language the English one
NEUTRAL_QUESTION = {"zh": "答案：", "en": "Answer:"}
CALIBRATED = " (calibrated)"  # the calibrated score's parts: "taught (calibrated)"
SCORING = ("the option with the lowest mean NLL per token as the answer to the question; calibrated: the option whose total NLL "
           f"falls most from after a neutral prompt ({' / '.join(NEUTRAL_QUESTION.values())}) to after the question, i.e. that the question "
           "makes most likely (domain-conditional PMI), not the option's own fluency; McNemar's exact test per pair")


@dataclass(frozen=True)
class Choice:
    id: str
    question: str
    options: tuple[str, ...]
    answer: int  # index of the correct option
    part: str
    category: str = "general"
    language: str = "zh"
    source: str = ""  # id of the curated record the fact comes from


def load_choices(specs: list[str]) -> list[Choice]:
    """Built-in names or JSONL files of {id, question, options[4], answer (0-3), part, ...}."""
    items: list[Choice] = []
    for spec in specs:
        path = Path(str(files("banklora.data").joinpath(BUILTIN[spec]))) if spec in BUILTIN else Path(spec)
        if not path.is_file():
            raise UsageError(f"--knowledge {spec}: no such file or built-in test ({', '.join(BUILTIN)}); pass a JSONL file or 'none'")
        for line, text in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if text.strip():
                items.append(_choice(text, f"{spec}:{line}"))
    ids = [c.id for c in items]
    if len(set(ids)) != len(ids):
        raise UsageError(f"--knowledge {', '.join(specs)}: question id {next(i for i in ids if ids.count(i) > 1)!r} appears twice; ids must be unique")
    return items


def _choice(text: str, where: str) -> Choice:
    try:
        r = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{where}: not valid JSON ({exc.msg}, column {exc.colno})") from exc
    if not isinstance(r, dict):
        raise UsageError(f"{where}: expected an object with question, options, answer and part")
    for name in ("id", "question", "part"):
        if not isinstance(r.get(name), str) or not r[name].strip():
            raise UsageError(f"{where}: field '{name}' must be a non-empty string")
    options = r.get("options")
    if not isinstance(options, list) or len(options) != OPTIONS or not all(isinstance(o, str) and o.strip() for o in options):
        raise UsageError(f"{where}: field 'options' must be a list of {OPTIONS} non-empty strings")
    if len(set(options)) != OPTIONS:
        raise UsageError(f"{where}: field 'options' holds the same option twice")
    if not isinstance(r.get("answer"), int) or isinstance(r["answer"], bool) or not 0 <= r["answer"] < OPTIONS:
        raise UsageError(f"{where}: field 'answer' must be the correct option's index, 0 to {OPTIONS - 1}")
    if r["part"] not in PARTS:
        raise UsageError(f"{where}: field 'part' must be one of {', '.join(PARTS)} (got {r['part']!r})")
    return Choice(r["id"], r["question"].strip(), tuple(o.strip() for o in options), r["answer"], r["part"],
                  r.get("category") or "general", r.get("language") or "zh", r.get("source") or "")


def option_examples(items: list[Choice]) -> list[Example]:
    """One example per (question, option), in order, the option as the reference answer, so the
    compare's teacher-forced reference NLL scores it: first as the answer to the question, then, in
    the same order, as the answer to the neutral prompt of the question's language (its likelihood
    with nothing asked, which the calibrated score subtracts)."""
    def examples(question, suffix: str) -> list[Example]:
        return [Example(instruction=question(c), output=o, category=c.category, language=c.language, id=f"{c.id}/{i}{suffix}")
                for c in items for i, o in enumerate(c.options)]

    return examples(lambda c: c.question, "") + examples(
        lambda c: NEUTRAL_QUESTION["zh" if c.language.lower().startswith("zh") else "en"], "/neutral")


def knowledge_report(items: list[Choice], option_scores: dict[str, list[tuple[float, int]]], models: list[str], pairs: list[tuple[str, str]],
                     sources: list[str]) -> dict:
    """Choices, accuracy per model and part (likelihood and calibrated), paired statistics per pair
    of models. `option_scores[model]`: (total NLL, tokens) of each of option_examples."""
    questions, n = [], len(items) * OPTIONS
    for k, c in enumerate(items):
        row = {"id": c.id, "part": c.part, "category": c.category, "language": c.language, "question": c.question,
               "options": list(c.options), "answer": c.answer, "source": c.source, "models": {}}
        for m in models:
            asked, neutral = option_scores[m][k * OPTIONS : (k + 1) * OPTIONS], option_scores[m][n + k * OPTIONS : n + (k + 1) * OPTIONS]
            nll = [total / tokens for total, tokens in asked]
            gain = [a - u for (a, _), (u, _) in zip(asked, neutral)]  # -log of how much the question raises the option
            choice, calibrated = min(range(OPTIONS), key=nll.__getitem__), min(range(OPTIONS), key=gain.__getitem__)
            row["models"][m] = {"choice": choice, "correct": choice == c.answer, "option_nll": [round(x, 5) for x in nll],
                                "calibrated_choice": calibrated, "calibrated_correct": calibrated == c.answer,
                                "option_nll_neutral": [round(total / tokens, 5) for total, tokens in neutral]}
        row["option_tokens"] = [tokens for _, tokens in option_scores[models[0]][k * OPTIONS : (k + 1) * OPTIONS]]
        questions.append(row)
    groups = {"all": questions} | {p: [q for q in questions if q["part"] == p] for p in PARTS}
    groups |= {f"language {lang}": [q for q in questions if q["language"] == lang] for lang in dict.fromkeys(q["language"] for q in questions)}
    groups = {(name, "correct"): rows for name, rows in groups.items() if rows} | {
        (name + CALIBRATED, "calibrated_correct"): rows for name, rows in groups.items() if rows and not name.startswith("language ")}
    accuracy = {m: {name: {"correct": sum(q["models"][m][field] for q in rows), "n": len(rows),
                           "accuracy": round(sum(q["models"][m][field] for q in rows) / len(rows), 4)}
                    for (name, field), rows in groups.items()} for m in models}
    comparisons = [{"a": a, "b": b, "parts": {name: statistics.mcnemar([q["models"][a][field] for q in rows], [q["models"][b][field] for q in rows], name)
                                              for (name, field), rows in groups.items()}} for a, b in pairs]
    return {"sources": sources, "chance": 1 / OPTIONS, "accuracy": accuracy, "comparisons": comparisons, "questions": questions, "scoring": SCORING}


def print_knowledge(report: dict, console, name: dict[str, str] | None = None) -> None:
    """The knowledge test's tables; `name`: what compact tables call each model (terminal.labels)."""
    from banklora.evaluation import terminal

    k = report.get("knowledge")
    if not k:
        return
    narrow = terminal.is_narrow(console)
    models = report["models"]
    name = name or terminal.labels(models, narrow)
    table = terminal.table(f"knowledge test ({', '.join(k['sources'])}): accuracy, chance {k['chance']:.2f}", narrow)
    table.add_column("part", no_wrap=True)
    terminal.number_column(table, "n")
    for m in models:
        terminal.number_column(table, name[m])
    for part, cell in k["accuracy"][models[0]].items():
        table.add_row(part, str(cell["n"]), *[f"{k['accuracy'][m][part]['accuracy']:.3f}" for m in models])
    console.print(table)
    for c in k["comparisons"]:
        stats = terminal.table(f"{c['b']} vs {c['a']} on the knowledge test"
                               + (f"; only: the questions only {name[c['b']]} / only {name[c['a']]} got right; p by McNemar" if narrow else ""), narrow)
        stats.add_column("part", no_wrap=True)
        for col in ("Δ" if narrow else "accuracy Δ", "95% CI", "p" if narrow else "p (McNemar)",
                    "only" if narrow else f"only {c['b']} right / only {c['a']} right"):
            terminal.number_column(stats, col)
        stats.add_column("significant" if narrow else "finding", no_wrap=True)
        for part, s in c["parts"].items():
            stats.add_row(part, f"{s['mean_delta']:+.3f}", f"[{s['ci_low']:+.3f}, {s['ci_high']:+.3f}]", f"{s['p_value']:.3g}",
                          f"{s['b_only']} / {s['a_only']}", terminal.significance(s["significant"], narrow))
        console.print(stats)


def knowledge_markdown(report: dict) -> list[str]:
    k = report.get("knowledge")
    if not k:
        return []
    models = report["models"]
    lines = ["", f"## Knowledge test ({', '.join(k['sources'])})", "",
             f"Accuracy, chance {k['chance']:.2f}: {k['scoring']}.", "",
             "| part | n | " + " | ".join(models) + " |", "|---|---:|" + "---:|" * len(models)]
    for name, cell in k["accuracy"][models[0]].items():
        lines.append(f"| {name} | {cell['n']} | " + " | ".join(f"{k['accuracy'][m][name]['accuracy']:.3f}" for m in models) + " |")
    for c in k["comparisons"]:
        lines += ["", f"{c['b']} vs {c['a']}:", ""] + [f"- {s['verdict']}" for s in c["parts"].values()]  # a verdict names its part
    return lines
