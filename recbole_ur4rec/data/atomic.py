"""Checks of RecBole atomic files before RecBole loads them, with errors that name the file, line and field."""
import os

import pandas as pd

FEATURE_TYPES = ("token", "token_seq", "float", "float_seq")


class AtomicFileError(ValueError):
    """An atomic file does not follow RecBole's format."""


def check_atomic_file(path, field_separator="\t", seq_separator=" ", required_fields=()):
    """Check one atomic file: a ``name:type`` header, the same number of columns on every line,
    numbers in float fields, and the ``required_fields`` present.

    Raises:
        AtomicFileError: naming ``path``, the line numbers (1-based, header = line 1) and the field.
    """
    with open(path, "r", encoding="utf-8") as f:
        header_line = f.readline().rstrip("\r\n")
    if not header_line:
        raise AtomicFileError(f"{path}: empty file, expected a header line of name:type fields")
    header = header_line.split(field_separator)
    fields = {}
    for column in header:
        name, _, ftype = column.partition(":")
        if not name or ftype not in FEATURE_TYPES:
            raise AtomicFileError(
                f"{path}: header field {column!r} must be written name:type with type one of {', '.join(FEATURE_TYPES)} "
                f"(fields are separated by {field_separator!r})"
            )
        fields[name] = ftype
    missing = [name for name in required_fields if name not in fields]
    if missing:
        raise AtomicFileError(f"{path}: missing field(s) {missing}; the header has {list(fields)}")

    rows = _read_rows(path, field_separator, len(header))
    for column, (name, ftype) in zip(rows.columns, fields.items()):
        if ftype not in ("float", "float_seq"):
            continue
        values = rows[column]
        if ftype == "float_seq":
            values = values.str.split(seq_separator).explode()
        values = values[values != ""]
        bad = values[pd.to_numeric(values, errors="coerce").isna()]
        if len(bad):
            lines = sorted(set(int(i) + 2 for i in bad.index))
            raise AtomicFileError(
                f"{path}: field {name!r} is {ftype} but {len(lines)} line(s) hold non-numbers, "
                f"e.g. line {lines[0]}: {bad.iloc[0]!r} (lines {lines[:10]})"
            )


def _read_rows(path, field_separator, n_columns):
    """All data lines as strings; a line whose column count differs from the header is an error."""
    bad_lines = []
    rows = []
    with open(path, "r", encoding="utf-8") as f:
        next(f)
        for line_number, line in enumerate(f, start=2):
            line = line.rstrip("\r\n")
            if not line:
                continue
            values = line.split(field_separator)
            if len(values) != n_columns:
                bad_lines.append((line_number, len(values)))
                continue
            rows.append(values)
    if bad_lines:
        line_number, count = bad_lines[0]
        raise AtomicFileError(
            f"{path}: {len(bad_lines)} line(s) do not have the header's {n_columns} fields, "
            f"e.g. line {line_number} has {count} (lines {[n for n, _ in bad_lines[:10]]})"
        )
    return pd.DataFrame(rows, index=range(len(rows)))


def check_dataset_files(config):
    """Check the atomic files RecBole will load for ``config`` (inter, user, item)."""
    folder, name = config["data_path"], config["dataset"]
    separators = dict(field_separator=config["field_separator"], seq_separator=config["seq_separator"])
    inter_files = [n for n in sorted(os.listdir(folder)) if n.startswith(name + ".") and n.endswith(".inter")]
    required = [config["USER_ID_FIELD"], config["ITEM_ID_FIELD"]]
    if config["eval_args"].get("order") == "TO":
        required.append(config["TIME_FIELD"])
        load_col = (config["load_col"] or {}).get("inter")
        if load_col is not None and config["TIME_FIELD"] not in load_col:
            raise AtomicFileError(
                f"eval_args.order is TO (time-ordered split) but load_col['inter'] = {load_col} omits "
                f"TIME_FIELD {config['TIME_FIELD']!r}; add it to load_col (or set load_col: ~ to load every column)"
            )
    for file in inter_files:
        check_atomic_file(os.path.join(folder, file), required_fields=[f for f in required if f], **separators)
    for suffix, id_field in (("user", config["USER_ID_FIELD"]), ("item", config["ITEM_ID_FIELD"])):
        path = os.path.join(folder, f"{name}.{suffix}")
        if os.path.isfile(path):
            check_atomic_file(path, required_fields=[id_field], **separators)
