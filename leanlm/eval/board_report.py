"""The board's outputs: results.jsonl, board.md, Pareto plots (PNG) and one self-contained board.html.

Quality is perplexity on the packaged evaluation text (lower is better). A row is on a Pareto
frontier when no other row is at least as good on both axes and better on one.
"""
from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

from leanlm.io.atomic import atomic_write_bytes, atomic_write_text

COLUMNS = [  # (key, header)
    ("recipe", "recipe"), ("ppl_eval", "ppl eval"), ("ppl_tech", "ppl tech"), ("acc_mean", "task acc"),
    ("acc_mc", "mc"), ("acc_cloze", "cloze"), ("acc_capitals", "capitals"), ("size_mb", "size MB"),
    ("decode_tok_s", "decode tok/s"), ("prefill_tok_s", "prefill tok/s"), ("peak_rss_mb", "peak RSS MB"),
    ("time_s", "time s"),
]
PLOTS = {  # file -> (x key, x label, x lower is better)
    "pareto_size.png": ("size_mb", "size on disk (MB)", True),
    "pareto_decode.png": ("decode_tok_s", "batch-1 decode (tokens/s)", False),
}
QUALITY = ("ppl_eval", "perplexity, packaged evaluation text (lower is better)")


def pareto_front(points: list[tuple[str, float, float]], x_lower_better: bool = True,
                 y_lower_better: bool = True) -> list[str]:
    """Names of the non-dominated points of (name, x, y), ordered by x from best to worst."""
    sx = 1 if x_lower_better else -1
    sy = 1 if y_lower_better else -1
    pts = [(n, sx * x, sy * y) for n, x, y in points if x is not None and y is not None]
    front = [n for n, x, y in pts
             if not any((x2 <= x and y2 <= y) and (x2 < x or y2 < y) for _, x2, y2 in pts)]
    return [n for n, x, _ in sorted(pts, key=lambda p: (p[1], p[2])) if n in front]


def fronts(rows: list[dict]) -> dict[str, list[str]]:
    return {f: pareto_front([(r["recipe"], r.get(x), r.get(QUALITY[0])) for r in rows], x_lower)
            for f, (x, _, x_lower) in PLOTS.items()}


def _fmt(v) -> str:
    if v is None or v == "":
        return ""
    if isinstance(v, float):
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        return f"{v:.3g}" if abs(v) < 1 else f"{v:.2f}" if abs(v) < 100 else f"{v:.1f}"
    return str(v)


def table_rows(rows: list[dict]) -> list[dict]:
    return [{h: _fmt(r.get(k)) for k, h in COLUMNS} for r in rows]


def markdown(rows: list[dict], meta: dict, front: dict[str, list[str]]) -> str:
    heads = [h for _, h in COLUMNS]
    lines = ["| " + " | ".join(heads) + " |", "|" + "|".join(["---"] + ["---:"] * (len(heads) - 1)) + "|"]
    on = set(front.get("pareto_size.png", [])) | set(front.get("pareto_decode.png", []))
    for r, t in zip(rows, table_rows(rows)):
        cells = [t[h] for h in heads]
        if r["recipe"] in on:
            cells[0] = f"**{cells[0]}**"
        lines.append("| " + " | ".join(cells) + " |")
    s = meta.get("settings", {})
    notes = [
        f"Model: {meta.get('model')}; code version {meta.get('code_version')}.",
        f"Perplexity: first {s.get('eval_chars') or 'all'} characters of each packaged text, windows of "
        f"{s.get('ctx')} tokens. Tasks: first {s.get('task_records')} records of leanlm_mc, leanlm_cloze, "
        "leanlm_capitals (task acc = their mean).",
        f"Calibration: {s.get('samples')} x {s.get('seq_len')} tokens of the packaged calibration text. "
        "Size: the saved safetensors (base: its fp32 weights). Peak RSS and time: the compression process.",
        f"Speed: batch 1, {s.get('decode_tokens')} tokens after a {s.get('prompt_len')}-token prompt; prefill of "
        f"{s.get('prefill_len')} tokens; median of {s.get('rounds')} interleaved rounds over all rows; "
        f"threads: {s.get('threads') or 'torch default'}.",
        "Pareto frontier, quality vs size: " + ", ".join(front.get("pareto_size.png", [])) + ".",
        "Pareto frontier, quality vs decode speed: " + ", ".join(front.get("pareto_decode.png", [])) + ".",
    ]
    return "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"


def plot_png(rows: list[dict], x: str, xlabel: str, x_lower_better: bool, front: list[str], title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [(r["recipe"], r.get(x), r.get(QUALITY[0])) for r in rows]
    pts = [p for p in pts if p[1] is not None and p[2] is not None]
    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=110)
    off = [p for p in pts if p[0] not in front]
    ax.scatter([p[1] for p in off], [p[2] for p in off], s=22, color="#9aa4ad", zorder=2, label="recipe")
    for n, px, py in off:
        ax.annotate(n, (px, py), fontsize=6.5, color="#6b747c", xytext=(3, 2), textcoords="offset points")
    on = sorted((p for p in pts if p[0] in front), key=lambda p: p[1])
    if on:
        ax.plot([p[1] for p in on], [p[2] for p in on], "-", drawstyle="steps-post" if x_lower_better else "steps-pre",
                color="#d1495b", lw=1.4, zorder=3)
        ax.scatter([p[1] for p in on], [p[2] for p in on], s=46, color="#d1495b", zorder=4, label="Pareto frontier")
        # frontier points are often close together: number them and name them in a box, so labels never overlap
        for k, (n, px, py) in enumerate(on, 1):
            ax.annotate(str(k), (px, py), fontsize=8.5, fontweight="bold", color="#8c1c2c", xytext=(0, 6),
                        textcoords="offset points", ha="center")
        key = "\n".join(f"{k}  {n}" for k, (n, _, _) in enumerate(on, 1))
        ax.text(0.01, 0.99, "Pareto frontier\n" + key, transform=ax.transAxes, va="top", ha="left", fontsize=8,
                color="#8c1c2c", bbox={"boxstyle": "round", "fc": "white", "ec": "#d1495b", "alpha": 0.9}, zorder=5)
    ys = [p[2] for p in pts]
    if ys and max(ys) / max(min(ys), 1e-9) > 20:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel + (" — lower is better" if x_lower_better else " — higher is better"))
    ax.set_ylabel(QUALITY[1])
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def page(rows: list[dict], meta: dict, front: dict, pngs: dict[str, bytes]) -> str:
    heads = [h for _, h in COLUMNS]
    on = set().union(*front.values()) if front else set()
    trs = []
    for r, t in zip(rows, table_rows(rows)):
        cls = ' class="front"' if r["recipe"] in on else ""
        trs.append(f"<tr{cls}>" + "".join(f"<td>{html.escape(t[h])}</td>" for h in heads) + "</tr>")
    imgs = "".join(f'<figure><img alt="{html.escape(f)}" src="data:image/png;base64,{base64.b64encode(b).decode()}">'
                   f"<figcaption>frontier: {html.escape(', '.join(front.get(f, [])))}</figcaption></figure>"
                   for f, b in pngs.items())
    notes = html.escape(markdown(rows, meta, front).split("\n\n", 1)[1]).replace("\n", "<br>")
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>leanlm board</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;color:#222}}table{{border-collapse:collapse;font-size:13px}}
td,th{{border:1px solid #ccc;padding:3px 7px;text-align:right}}td:first-child,th:first-child{{text-align:left}}
tr.front td{{background:#fde8ea;font-weight:600}}figure{{display:inline-block;margin:1em}}img{{max-width:760px}}</style>
</head><body><h1>leanlm board</h1>
<table><tr>{''.join(f'<th>{html.escape(h)}</th>' for h in heads)}</tr>{''.join(trs)}</table>
<p>{notes}</p>{imgs}</body></html>
"""


def write_outputs(out: Path, rows: list[dict], meta: dict) -> dict[str, list[str]]:
    out.mkdir(parents=True, exist_ok=True)
    front = fronts(rows)
    atomic_write_text(out / "results.jsonl", "".join(json.dumps(r, default=str) + "\n" for r in rows))
    atomic_write_text(out / "board.md", markdown(rows, meta, front))
    pngs = {}
    for f, (x, label, lower) in PLOTS.items():
        pngs[f] = plot_png(rows, x, label, lower, front[f], f"{meta.get('model')}: quality vs {label.split(' (')[0]}")
        atomic_write_bytes(out / f, pngs[f])
    atomic_write_text(out / "board.html", page(rows, meta, front, pngs))
    atomic_write_text(out / "meta.json", json.dumps({**meta, "frontier": front}, indent=1, default=str))
    return front
