"""Report helpers of tuning and comparisons: markdown tables, CSV and text files written atomically, plain values."""
import csv
import json
import math
import os


def markdown_table(headers, rows):
    """A markdown table of ``rows`` (dicts) under ``headers``; floats with 4 decimals, missing values empty."""
    def cell(value):
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return ""
        if isinstance(value, float):
            return f"{value:.4f}" if value == 0 or 1e-3 <= abs(value) < 1e4 else f"{value:.3g}"
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---" for _ in headers) + " |"]
    lines += ["| " + " | ".join(cell(row.get(h)) for h in headers) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def describe(value):
    """``{'valid': 'full', 'test': 'full'}`` as ``valid full, test full`` (for table headers)."""
    if isinstance(value, dict):
        return ", ".join(f"{k} {describe(v)}" for k, v in value.items())
    return str(value)


def write_csv(path, headers, rows):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=headers, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({h: plain(row.get(h)) for h in headers})
    os.replace(tmp, path)


def write_text(path, text):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def read_json(path):
    """The JSON in ``path``; None when it is missing or unreadable."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def write_json(path, data, indent=1):
    """Write ``data`` (made plain) as JSON, atomically; ``indent=None``: one line (large lists, e.g. a catalog)."""
    write_text(path, json.dumps(plain(data), indent=indent, sort_keys=False) + "\n")


def plain(value):
    """``value`` with numpy scalars and tuples made plain Python (for yaml, json and csv)."""
    if hasattr(value, "item") and not isinstance(value, (list, dict, str)):
        return value.item()
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value
