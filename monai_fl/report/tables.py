"""Turn a results dict into rows and a printable/Markdown table (AUC/ACC per method, pooled and per site)."""

from __future__ import annotations

import math

from monai_fl.keys import POOLED, Method, MetricKey

AUC, ACC = MetricKey.AUC.value, MetricKey.ACC.value


def method_rows(results: dict) -> list[dict]:
    """One row per trained method (classical models one row each), in a fixed order."""
    methods = results.get("methods", {})
    rows = []
    order = [m.value for m in Method]
    for name in sorted(methods, key=lambda m: order.index(m) if m in order else len(order)):
        entry = methods[name]
        if name == Method.CLASSICAL.value:
            rows += [_row(f"classical: {model}", r) for model, r in entry.items()]
        else:
            rows.append(_row(name, entry))
    return rows


def _row(label: str, r: dict) -> dict:
    pooled = r.get(POOLED, {})
    row = {"method": label, "pooled_auc": pooled.get(AUC), "pooled_acc": pooled.get(ACC)}
    if "auc_std" in pooled:
        row["pooled_auc_std"] = pooled["auc_std"]
    for site, m in r.get("sites", {}).items():
        row[f"{site}_auc"] = m.get(AUC)
        row[f"{site}_acc"] = m.get(ACC)
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
            if c == "pooled_auc" and "pooled_auc_std" in r:
                cell += f" ± {_fmt(r['pooled_auc_std'])}"
            cells.append(cell)
        body.append(cells)
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in cols) + "|"]
        lines += ["| " + " | ".join(b) + " |" for b in body]
        return "\n".join(lines)
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*head), fmt.format(*("-" * w for w in widths))] + [fmt.format(*b) for b in body])
