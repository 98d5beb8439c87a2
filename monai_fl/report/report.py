"""The run report: ``report.md`` and ``report.html`` with the comparison table, the split, timings,
and PNG plots (per-round curves of the federated runs, training loss, pooled ROC curves)."""

from __future__ import annotations

import html
from pathlib import Path

from monai_fl.keys import POOLED, Method
from monai_fl.report.tables import format_table, headline_keys, method_rows


def write_report(results: dict, out_dir: Path) -> dict[str, Path]:
    """Write plots, Markdown and HTML for ``results`` into ``out_dir``; returns the paths written."""
    out_dir = Path(out_dir)
    plots = {}
    for name, fn in (("rounds", plot_rounds), ("loss", plot_loss), ("roc", plot_roc)):
        path = fn(results, out_dir / f"{name}.png")
        if path is not None:
            plots[name] = path
    md = markdown_report(results, plots)
    (out_dir / "report.md").write_text(md)
    (out_dir / "report.html").write_text(html_report(results, plots))
    return {"markdown": out_dir / "report.md", "html": out_dir / "report.html", **plots}


def _setup_lines(results: dict) -> list[str]:
    cfg = results["config"]
    ds = results["dataset"]
    split = results.get("split", {})
    lines = [
        f"- Dataset: **{ds['name']}** (md5 `{ds['md5']}`), task: {results.get('task', 'classification')}",
        f"- Split: {split.get('scheme')} over {len(split.get('sites', {}))} sites, seed {split.get('seed')}; "
        f"manifest `{results['manifest']}`",
        f"- Network: {cfg['network']['name']} (width {cfg['network']['width']}); epochs: centralized and local-only "
        f"{cfg['train']['epochs']}, federated {cfg['fl']['rounds']} rounds × {cfg['fl']['local_epochs']:g} local epoch "
        f"= {cfg['fl']['rounds'] * cfg['fl']['local_epochs']:g} per site; batch {cfg['train']['batch_size']}, "
        f"lr {cfg['train']['lr']} cosine",
    ]
    for site, e in split.get("sites", {}).items():
        lines.append(f"  - {site}: {e['n_train']} training cases {e.get('class_counts') or ''}, {e['n_test']} test cases")
    return lines


def _timing_lines(results: dict) -> list[str]:
    lines = []
    for method, seconds in results.get("timing_s", {}).items():
        extra = ""
        entry = results["methods"].get(method, {})
        if "peak_rss_gib" in entry:
            extra = f", simulator peak RSS {entry['peak_rss_gib']:.2f} GiB"
        lines.append(f"- {method}: {seconds:.0f} s{extra}")
    return lines


def markdown_report(results: dict, plots: dict[str, Path]) -> str:
    keys = headline_keys(results)
    parts = [
        f"# monai-fl report: {results['experiment']}",
        "",
        *_setup_lines(results),
        "",
        f"## {keys[0].upper()} / {keys[1].upper()} per method",
        "Pooled = the official test split; site columns = that site's test shard. Local = each site's own "
        "model (pooled: mean ± sd over the site models; site column: the site's model on its own shard).",
        "",
        format_table(method_rows(results), markdown=True),
        "",
        "## Time",
        *_timing_lines(results),
        "",
        "Federated metrics reach the server as numbers only (no images, labels or predictions). Under HE "
        "the server never holds the plaintext model; the pooled-test figures come from the final model a "
        "site decrypted, evaluated by the researcher running the simulator.",
    ]
    for name, path in plots.items():
        parts += ["", f"![{name}]({path.name})"]
    figures = results.get("figures") or {}
    if figures.get("paths"):
        parts += ["", f"## Contours on pooled-test volumes ({figures['model']} model)",
                  "Reference solid, prediction dashed."]
        parts += [f"![{Path(p).stem}]({p})" for p in figures["paths"]]
    return "\n".join(parts) + "\n"


def html_report(results: dict, plots: dict[str, Path]) -> str:
    rows = method_rows(results)
    cols = list(dict.fromkeys(k for r in rows for k in r if not k.endswith("_std")))
    head = "".join(f"<th>{html.escape(c.replace('_', ' '))}</th>" for c in cols)
    body = ""
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c)
            text = f"{v:.4f}" if isinstance(v, float) else ("n/a" if v is None else str(v))
            if f"{c}_std" in r and isinstance(r[f"{c}_std"], float):
                text += f" ± {r[c + '_std']:.4f}"
            cells.append(f"<td>{html.escape(text)}</td>")
        body += "<tr>" + "".join(cells) + "</tr>\n"
    setup = "".join(f"<li>{html.escape(line.lstrip('- ').replace('**', ''))}</li>" for line in _setup_lines(results))
    timing = "".join(f"<li>{html.escape(line.lstrip('- '))}</li>" for line in _timing_lines(results))
    imgs = "".join(f'<figure><img src="{p.name}" alt="{n}"><figcaption>{n}</figcaption></figure>' for n, p in plots.items())
    figures = results.get("figures") or {}
    imgs += "".join(f'<figure><img src="{html.escape(p)}" alt="{html.escape(Path(p).stem)}"><figcaption>'
                    f'{html.escape(Path(p).stem)}: reference solid, {html.escape(figures["model"])} prediction dashed'
                    f'</figcaption></figure>' for p in figures.get("paths", []))
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>monai-fl report: {html.escape(results['experiment'])}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}td:first-child{{text-align:left}}
img{{max-width:100%}}</style></head><body>
<h1>monai-fl report: {html.escape(results['experiment'])}</h1>
<ul>{setup}</ul>
<h2>Per method</h2>
<p>Pooled = the official test split; site columns = that site's test shard.</p>
<table><tr>{head}</tr>
{body}</table>
<h2>Time</h2><ul>{timing}</ul>
{imgs}
</body></html>
"""


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_rounds(results: dict, path: Path) -> Path | None:
    """Each site's figure for the global model it received, per round, for each federated method."""
    key = headline_keys(results)[0]
    fl = {m: results["methods"][m] for m in (Method.FL_HE.value, Method.FL_PLAIN.value) if m in results["methods"]}
    if not fl:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for (method, r), style in zip(fl.items(), ("-", "--")):
        for site in sorted({s for rec in r["rounds"] for s in rec["sites"]}):
            pts = [(rec["round"], rec["sites"][site]) for rec in r["rounds"] if site in rec["sites"]]
            # Round r's record is the model after r aggregations; the final evaluation is after all of them.
            xs = [p[0] for p in pts] + [len(r["rounds"])]
            ys = [p[1].get(key) for p in pts] + [r["sites"].get(site, {}).get(key)]
            axes[0].plot(xs, ys, style, marker="o", ms=3, label=f"{method} {site}")
            losses = [p[1].get("train_loss") for p in pts]
            axes[1].plot([p[0] + 1 for p in pts], losses, style, marker="o", ms=3, label=f"{method} {site}")
    axes[0].set(xlabel="aggregations", ylabel=f"{key} on site test shard", title="Global model per round")
    axes[1].set(xlabel="round", ylabel="local training loss", title="Site training loss")
    from matplotlib.ticker import MaxNLocator

    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_loss(results: dict, path: Path) -> Path | None:
    """Training loss per epoch of the centralized and local-only baselines."""
    methods = results["methods"]
    curves = {}
    if Method.CENTRALIZED.value in methods:
        curves["centralized"] = methods[Method.CENTRALIZED.value].get("history", [])
    for site, r in methods.get(Method.LOCAL.value, {}).get("per_site_model", {}).items():
        curves[f"local {site}"] = r.get("history", [])
    curves = {k: v for k, v in curves.items() if v}
    if not curves:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, hist in curves.items():
        ax.plot([h["epoch"] + 1 for h in hist], [h["loss"] for h in hist], marker="o", ms=3, label=label)
    ax.set(xlabel="epoch", ylabel="training loss", title="Baselines: training loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_roc(results: dict, path: Path) -> Path | None:
    """Pooled-test ROC curves of every method that has one."""
    curves = {}
    for method, r in results["methods"].items():
        if method == Method.CLASSICAL.value:
            for model, rr in r.items():
                curves[f"classical {model}"] = rr.get(POOLED, {}).get("roc")
        elif method == Method.LOCAL.value:
            for site, rr in r.get("per_site_model", {}).items():
                curves[f"local {site}"] = rr.get(POOLED, {}).get("roc")
        else:
            curves[method] = r.get(POOLED, {}).get("roc")
    curves = {k: v for k, v in curves.items() if v}
    if not curves:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for label, roc in curves.items():
        ax.plot(roc["fpr"], roc["tpr"], lw=2 if label.startswith("fl") else 1, label=label)
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC on the pooled test set")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
