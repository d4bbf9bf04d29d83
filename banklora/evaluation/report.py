"""Compare reports: JSON (every answer and number), Markdown summary, self-contained HTML.

The HTML file embeds its charts as PNG data (matplotlib) and its styles inline: it opens in a
browser with no network. Charts: mean overall score per category and model, the distribution of
per-question deltas against the base model, and each adapter's training loss curve.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

from banklora.data.stats import CATEGORY_EN
from banklora.evaluation.compare import BINARY, BREAKDOWN_SHOWN, LOWER_IS_BETTER, binary_finding, breakdown_rows, fmt, precision, share, summary_keys
from banklora.evaluation.knowledge import knowledge_markdown
from banklora.io import atomic_write_text, read_head, to_json

COLORS = ("#7f8c8d", "#2e86de", "#27ae60", "#e67e22", "#8e44ad")


def report_paths(json_path: Path) -> dict[str, Path]:
    json_path = Path(json_path)
    return {"json": json_path, "markdown": json_path.with_suffix(".md"), "html": json_path.with_suffix(".html")}


def check_report_path(json_path: Path | None, reads=()) -> None:
    """--report, checked before a compare runs (banklora.destination): a path that can be written,
    and no file there but an earlier banklora report."""
    from banklora import destination

    # the JSON path first: an empty --report (".") has no name to put the .md and .html suffixes on
    destination.check(json_path, "--report", directory=False, reads=reads, ours=_is_report, example="reports/compare.json")
    paths = report_paths(json_path)
    for path in (paths["markdown"], paths["html"]):
        destination.check(path, "--report", directory=False, reads=reads, ours=_is_report, example="reports/compare.json")


def _is_report(path: Path) -> bool:
    head = read_head(path, 400)
    return b"banklora-compare/" in head or head.startswith(b"# banklora compare") or b"<title>banklora compare</title>" in head


def write_reports(report: dict, json_path: Path) -> dict[str, Path]:
    """Write the JSON, Markdown and HTML reports side by side; return their paths."""
    paths = report_paths(json_path)
    atomic_write_text(paths["json"], to_json(report, indent=2))
    atomic_write_text(paths["markdown"], markdown(report))
    atomic_write_text(paths["html"], html(report))
    return paths


def markdown(report: dict) -> str:
    models = report["models"]
    lines = [f"# banklora compare: {', '.join(models[1:])} vs base", "",
             f"{len(report['questions'])} questions ({', '.join(report['questions_source'])}"
             + (f", split {report['split']}" if report["split"] else "") + f"); {report['generation'].get('decoding', 'greedy')}, {report['generation']['max_new_tokens']} new tokens; base model {report['base_model']['name']}"
             + (f"; {precision(report)} on {report['device']}" if report.get("dtype") else "") + ".", "",
             "## Means per model", "", "| metric | " + " | ".join(models) + " |", "|---|" + "---:|" * len(models)]
    for key in summary_keys():
        lines.append(f"| {key} | " + " | ".join(fmt(report["summary"][m][key], ".3f") for m in models) + " |")
    for key in BINARY:
        lines.append(f"| {key} | " + " | ".join(share(report, m, key) for m in models) + " |")
    lines.append("| compliance flags | " + " | ".join(str(sum(report["summary"][m]["compliance_flags"].values())) for m in models) + " |")
    lines += ["", "## Means per language and category", "", f"Each cell: {' → '.join(models)}.", "",
              "| group | n | " + " | ".join(BREAKDOWN_SHOWN) + " |", "|---|---:|" + "---:|" * len(BREAKDOWN_SHOWN)]
    for field, value, n, cells in breakdown_rows(report):
        lines.append(f"| {field} {value} | {n} | " + " | ".join(cells) + " |")
    for c in report["comparisons"]:
        lines += ["", f"## {c['b']} vs {c['a']}", "", "| metric | mean Δ | 95% CI | p | win/tie/loss |", "|---|---:|---:|---:|---:|"]
        for key, s in c["metrics"].items():
            lines.append(f"| {key} | {s['mean_delta']:+.3f} | [{s['ci_low']:+.3f}, {s['ci_high']:+.3f}] | {s['p_value']:.3g} | {s['wins']}/{s['ties']}/{s['losses']} |")
        lines += ["", f"| outcome | {c['a']} | {c['b']} | 95% CI of Δ | p (McNemar) | only {c['b']} / only {c['a']} |", "|---|---:|---:|---:|---:|---:|"]
        for key, s in c["binary"].items():
            lines.append(f"| {key} | {s['a_rate']:.3f} | {s['b_rate']:.3f} | [{s['ci_low']:+.3f}, {s['ci_high']:+.3f}] | {s['p_value']:.3g} | {s['b_only']} / {s['a_only']} |")
        lines += [""] + [f"- {s['verdict']}" for s in [*c["metrics"].values(), *c["binary"].values()]]
    lines += knowledge_markdown(report)
    return "\n".join(lines) + "\n"


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=96, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def charts(report: dict) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    models, questions = report["models"], report["questions"]
    out = {}
    categories = list(dict.fromkeys(q["category"] for q in questions))
    fig, ax = plt.subplots(figsize=(9, 3.6))
    width = 0.8 / len(models)
    for i, m in enumerate(models):
        means = [np.mean([q["answers"][m]["overall"] for q in questions if q["category"] == c]) for c in categories]
        ax.bar(np.arange(len(categories)) + i * width, means, width, label=m, color=COLORS[i % len(COLORS)])
    ax.set_xticks(np.arange(len(categories)) + width * (len(models) - 1) / 2, [CATEGORY_EN.get(c, c) for c in categories], rotation=30, ha="right")
    ax.set(ylabel="overall score", ylim=(0, 1), title="mean overall score per category")
    ax.legend()
    out["categories"] = _png(fig)

    fig, ax = plt.subplots(figsize=(9, 3.2))
    for i, m in enumerate(models[1:], 1):
        deltas = [q["answers"][m]["overall"] - q["answers"]["base"]["overall"] for q in questions]
        ax.hist(deltas, bins=20, range=(-1, 1), alpha=0.7, label=f"{m} - base", color=COLORS[i % len(COLORS)])
    ax.axvline(0, color="black", linewidth=1)
    ax.set(xlabel="overall score delta per question", ylabel="questions", title="distribution of deltas against the base model")
    ax.legend()
    out["deltas"] = _png(fig)

    fig, ax = plt.subplots(figsize=(9, 3.2))
    for i, (name, info) in enumerate(report["adapters"].items(), 1):
        losses = info["meta"].get("loss_per_step") or []
        ax.plot(range(1, len(losses) + 1), losses, label=f"{name} train", color=COLORS[i % len(COLORS)])
        val = info["meta"].get("validation_loss") or []
        if val:
            ax.plot([v["step"] for v in val], [v["loss"] for v in val], "o--", label=f"{name} validation", color=COLORS[i % len(COLORS)])
    ax.set(xlabel="step", ylabel="loss", title="training loss (from the adapters' metadata)")
    ax.legend()
    out["loss"] = _png(fig)
    return out


_TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>banklora compare</title>
<style>
body{font-family:system-ui,"Noto Sans CJK SC","PingFang SC",sans-serif;margin:24px;color:#222;max-width:1200px}
table{border-collapse:collapse;margin:12px 0;font-size:14px}
th,td{border:1px solid #ccc;padding:4px 8px;text-align:right;vertical-align:top}
th{background:#eef2f7} td.text{text-align:left;max-width:420px}
.good{color:#1e8449;font-weight:600}.bad{color:#c0392b;font-weight:600}
img{max-width:100%;display:block;margin:8px 0}
</style></head><body>
<h1>banklora compare: {{ models[1:]|join(", ") }} vs base</h1>
<p>{{ questions|length }} questions ({{ report.questions_source|join(", ") }}{% if report.split %}, split {{ report.split }}{% endif %}),
{{ report.generation.decoding or "greedy" }}, {{ report.generation.max_new_tokens }} new tokens, base model {{ report.base_model.name }}{% if report.dtype %}; {{ precision }} on {{ report.device }}{% endif %}, {{ report.created_at }}.</p>
<h2>Means per model</h2>
<table id="means"><tr><th>metric</th>{% for m in models %}<th>{{ m }}</th>{% endfor %}</tr>
{% for key in quality %}<tr><td class="text">{{ key }}</td>{% for m in models %}<td>{{ fmt(report.summary[m][key], ".3f") }}</td>{% endfor %}</tr>{% endfor %}
{% for key in binary %}<tr><td class="text">{{ key }}</td>{% for m in models %}<td>{{ share(report, m, key) }}</td>{% endfor %}</tr>{% endfor %}
<tr><td class="text">compliance flags</td>{% for m in models %}<td>{{ report.summary[m].compliance_flags.values()|sum }}</td>{% endfor %}</tr></table>
<h2>Means per language and category</h2>
<p>Each cell: {{ models|join(" → ") }}.</p>
<table id="breakdowns"><tr><th>group</th><th>n</th>{% for key in breakdown_shown %}<th>{{ key }}</th>{% endfor %}</tr>
{% for field, value, n, cells in breakdown_rows %}<tr><td class="text">{{ field }} {{ value }}</td><td>{{ n }}</td>{% for c in cells %}<td>{{ c }}</td>{% endfor %}</tr>{% endfor %}</table>
{% for c in report.comparisons %}<h2>{{ c.b }} vs {{ c.a }}</h2>
<table class="stats"><tr><th>metric</th><th>mean Δ</th><th>95% CI</th><th>p (Wilcoxon)</th><th>win/tie/loss</th><th>finding</th></tr>
{% for key, s in c.metrics.items() %}<tr><td class="text">{{ key }}</td><td>{{ "%+.3f"|format(s.mean_delta) }}</td>
<td>[{{ "%+.3f"|format(s.ci_low) }}, {{ "%+.3f"|format(s.ci_high) }}]</td><td>{{ "%.3g"|format(s.p_value) }}</td>
<td>{{ s.wins }}/{{ s.ties }}/{{ s.losses }}</td><td class="text {{ 'good' if s.significant and ((s.mean_delta > 0) != (key in lower_is_better)) else ('bad' if s.significant else '') }}">{{ s.verdict }}</td></tr>{% endfor %}</table>
<table class="outcomes"><tr><th>outcome</th><th>{{ c.a }}</th><th>{{ c.b }}</th><th>95% CI of Δ</th><th>p (McNemar)</th><th>only {{ c.b }} / only {{ c.a }}</th><th>finding</th></tr>
{% for key, s in c.binary.items() %}{% set finding = binary_finding(s, key) %}<tr><td class="text">{{ key }}</td><td>{{ "%.3f"|format(s.a_rate) }}</td><td>{{ "%.3f"|format(s.b_rate) }}</td>
<td>[{{ "%+.3f"|format(s.ci_low) }}, {{ "%+.3f"|format(s.ci_high) }}]</td><td>{{ "%.3g"|format(s.p_value) }}</td><td>{{ s.b_only }} / {{ s.a_only }}</td>
<td class="text {{ 'good' if finding.endswith('better') else ('bad' if finding.endswith('worse') else '') }}">{{ s.verdict }}</td></tr>{% endfor %}</table>{% endfor %}
{% set k = report.knowledge %}{% if k %}<h2>Knowledge test ({{ k.sources|join(", ") }})</h2>
<p>Accuracy, chance {{ "%.2f"|format(k.chance) }}: {{ k.scoring }}.</p>
<table id="knowledge"><tr><th>part</th><th>n</th>{% for m in models %}<th>{{ m }}</th>{% endfor %}</tr>
{% for name, cell in k.accuracy[models[0]].items() %}<tr><td class="text">{{ name }}</td><td>{{ cell.n }}</td>{% for m in models %}<td>{{ "%.3f"|format(k.accuracy[m][name].accuracy) }}</td>{% endfor %}</tr>{% endfor %}</table>
{% for c in k.comparisons %}<p>{{ c.b }} vs {{ c.a }}:</p><ul>{% for s in c.parts.values() %}<li class="{{ ('good' if s.mean_delta > 0 else 'bad') if s.significant else '' }}">{{ s.verdict }}</li>{% endfor %}</ul>{% endfor %}{% endif %}
<h2>Charts</h2>
<img id="chart-categories" alt="mean overall score per category" src="{{ charts.categories }}">
<img id="chart-deltas" alt="distribution of deltas" src="{{ charts.deltas }}">
<img id="chart-loss" alt="training loss" src="{{ charts.loss }}">
<h2>Every question</h2>
<table id="questions"><tr><th>#</th><th>category</th><th>question</th>{% for m in models %}<th>{{ m }} answer</th><th>overall</th><th>ROUGE-L</th>{% endfor %}</tr>
{% for q in questions %}<tr><td>{{ loop.index }}</td><td class="text">{{ q.category }}</td><td class="text">{{ q.question }}</td>
{% for m in models %}{% set a = q.answers[m] %}<td class="text">{{ a.answer[:300] }}{% if a.compliance_flags %} <span class="bad">[{{ a.compliance_flags|join(", ") }}]</span>{% endif %}</td>
<td>{{ "%.2f"|format(a.overall) }}</td><td>{{ fmt(a.rouge_l, ".2f") }}</td>{% endfor %}</tr>{% endfor %}</table>
</body></html>
"""


def html(report: dict) -> str:
    from jinja2 import Environment

    template = Environment(autoescape=True).from_string(_TEMPLATE)
    return template.render(report=report, models=report["models"], questions=report["questions"],
                           quality=summary_keys(), binary=BINARY, share=share, binary_finding=binary_finding, lower_is_better=LOWER_IS_BETTER, charts=charts(report), fmt=fmt,
                           breakdown_shown=BREAKDOWN_SHOWN, breakdown_rows=breakdown_rows(report),
                           precision=precision(report) if report.get("dtype") else "")
