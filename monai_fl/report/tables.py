"""Turn a results dict into rows and a printable/Markdown table: the task's headline metrics
(AUC/ACC, or mean Dice/HD95) per method, pooled and per site."""

from __future__ import annotations

import math

from monai_fl.keys import POOLED, Method, MetricKey

HEADLINE = {
    "classification": (MetricKey.AUC.value, MetricKey.ACC.value),
    "segmentation": (MetricKey.MEAN_DICE.value, MetricKey.MEAN_HD95.value),
}


def headline_keys(results: dict) -> tuple[str, str]:
    """The two metrics a report leads with for this task."""
    return HEADLINE.get(results.get("task", "classification"), HEADLINE["classification"])


def method_rows(results: dict) -> list[dict]:
    """One row per trained method (classical models one row each), in a fixed order."""
    methods = results.get("methods", {})
    keys = headline_keys(results)
    rows = []
    order = [m.value for m in Method]
    for name in sorted(methods, key=lambda m: order.index(m) if m in order else len(order)):
        entry = methods[name]
        if name == Method.CLASSICAL.value:
            rows += [_row(f"classical: {model}", r, keys) for model, r in entry.items()]
        else:
            rows.append(_row(name, entry, keys))
    return rows


def _row(label: str, r: dict, keys: tuple[str, ...]) -> dict:
    pooled = r.get(POOLED, {})
    row = {"method": label}
    for key in keys:
        row[f"pooled_{key}"] = pooled.get(key)
        if f"{key}_std" in pooled:
            row[f"pooled_{key}_std"] = pooled[f"{key}_std"]
    for site, m in r.get("sites", {}).items():
        for key in keys:
            row[f"{site}_{key}"] = m.get(key)
    return row


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def format_table(rows: list[dict], markdown: bool = False) -> str:
    """Aligned text table (or Markdown) with method, pooled AUC/ACC and per-site AUC/ACC."""
    if not rows:
        return "(no results)"
    cols = list(dict.fromkeys(k for r in rows for k in r if not k.endswith("_std")))
    head = [c.replace("_", " ") for c in cols]
    body = []
    for r in rows:
        cells = []
        for c in cols:
            cell = _fmt(r.get(c))
            if f"{c}_std" in r:
                cell += f" ± {_fmt(r[c + '_std'])}"
            cells.append(cell)
        body.append(cells)
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in cols) + "|"]
        lines += ["| " + " | ".join(b) + " |" for b in body]
        return "\n".join(lines)
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*head), fmt.format(*("-" * w for w in widths))] + [fmt.format(*b) for b in body])
