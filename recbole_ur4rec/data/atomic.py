"""Checks of RecBole atomic files before RecBole loads them, with errors that name the file, line and field."""
import csv
import os

import numpy as np
import pandas as pd

FEATURE_TYPES = ("token", "token_seq", "float", "float_seq")


class AtomicFileError(ValueError):
    """An atomic file does not follow RecBole's format."""


def check_atomic_file(path, field_separator="\t", seq_separator=" ", required_fields=()):
    """Check one atomic file: a ``name:type`` header, the same number of columns on every line,
    numbers in float fields, and the ``required_fields`` present (a dict maps each to a hint for its error).

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
        hints = [required_fields[name] for name in missing if isinstance(required_fields, dict) and required_fields[name]]
        raise AtomicFileError(f"{path}: missing field(s) {missing}; the header has {list(fields)}" + "".join(f"; {h}" for h in hints))

    _check_column_counts(path, field_separator, len(header))
    float_fields = {i: (name, ftype) for i, (name, ftype) in enumerate(fields.items()) if ftype in ("float", "float_seq")}
    if float_fields:
        _check_numbers(path, field_separator, seq_separator, float_fields)


CHUNK_BYTES = 1 << 26  # 64 MiB: files are scanned in chunks, so memory does not grow with the file
CHUNK_ROWS = 1 << 21


def _check_column_counts(path, field_separator, n_columns):
    """Every non-blank data line has the header's number of fields (counted on raw bytes, chunk by chunk)."""
    separator = field_separator.encode("utf-8")
    if len(separator) != 1:
        raise AtomicFileError(f"{path}: field_separator must be one character, got {field_separator!r}")
    bad_lines, n_bad, line_offset = [], 0, 0  # line_offset: 0-based number of the chunk's first line
    with open(path, "rb") as f:
        tail = b""
        while True:
            block = f.read(CHUNK_BYTES)
            data = tail + block
            if not block:
                if not data:
                    break
                data += b"\n"
            cut = data.rfind(b"\n") + 1
            data, tail = data[:cut], data[cut:]
            if not data:
                continue
            arr = np.frombuffer(data, dtype=np.uint8)
            ends = np.flatnonzero(arr == 10)  # [lines]
            line_of_sep = np.searchsorted(ends, np.flatnonzero(arr == separator[0]))
            counts = np.bincount(line_of_sep, minlength=len(ends)) + 1  # fields per line
            starts = np.r_[0, ends[:-1] + 1]
            length = ends - starts - (arr[np.maximum(ends - 1, 0)] == 13)  # without \r
            bad = np.flatnonzero((counts != n_columns) & (length > 0))
            if line_offset == 0:
                bad = bad[bad > 0]  # the header
            n_bad += len(bad)
            bad_lines += [(line_offset + int(i) + 1, int(counts[i])) for i in bad[: 10 - len(bad_lines)]]
            line_offset += len(ends)
            if not block:
                break
    if n_bad:
        line_number, count = bad_lines[0]
        raise AtomicFileError(
            f"{path}: {n_bad} line(s) do not have the header's {n_columns} fields, "
            f"e.g. line {line_number} has {count} (lines {[n for n, _ in bad_lines]})"
        )


def _check_numbers(path, field_separator, seq_separator, float_fields):
    """Float fields hold numbers (an empty value is allowed): parsed as floats chunk by chunk; on a failure, the
    fields are read again as text to name the line."""
    floats = [column for column, (_, ftype) in float_fields.items() if ftype == "float"]
    if len(floats) < len(float_fields):
        _name_non_numbers(path, field_separator, seq_separator, float_fields)
        return
    try:
        for _ in _read_chunks(path, field_separator, floats, dtype=float):
            pass
    except ValueError as err:
        _name_non_numbers(path, field_separator, seq_separator, float_fields)
        raise AtomicFileError(f"{path}: a float field holds a non-number: {err}") from None


def _read_chunks(path, field_separator, columns, dtype):
    """Data lines of ``path`` (header skipped), ``columns`` only, in chunks; row i is line i + 2."""
    text = dict(keep_default_na=False, na_filter=False) if dtype is str else {}
    return pd.read_csv(
        path, sep=field_separator, header=None, skiprows=1, usecols=columns, dtype=dtype, skip_blank_lines=False,
        quoting=csv.QUOTE_NONE, engine="c", chunksize=CHUNK_ROWS, **text,
    )


def _name_non_numbers(path, field_separator, seq_separator, float_fields):
    """Raise naming the first lines whose float fields hold non-numbers."""
    for chunk in _read_chunks(path, field_separator, list(float_fields), dtype=str):
        for column, (name, ftype) in float_fields.items():
            values = chunk[column]
            if ftype == "float_seq":
                values = values.str.split(seq_separator).explode()
            values = values[values.notna() & (values != "")]
            bad = values[pd.to_numeric(values, errors="coerce").isna()]
            if len(bad):
                lines = sorted(set(int(i) + 2 for i in bad.index))
                raise AtomicFileError(
                    f"{path}: field {name!r} is {ftype} but line(s) hold non-numbers, "
                    f"e.g. line {lines[0]}: {bad.iloc[0]!r} (lines {lines[:10]})"
                )


def check_dataset_files(config):
    """Check the atomic files RecBole will load for ``config`` (inter, user, item)."""
    folder, name = config["data_path"], config["dataset"]
    separators = dict(field_separator=config["field_separator"], seq_separator=config["seq_separator"])
    inter_files = [n for n in sorted(os.listdir(folder)) if n.startswith(name + ".") and n.endswith(".inter")]
    required = {config["USER_ID_FIELD"]: None, config["ITEM_ID_FIELD"]: None}
    if config["eval_args"].get("order") == "TO":
        time_field = config["TIME_FIELD"]
        required[time_field] = (
            f"the time-ordered split (eval_args.order: TO, used by every sequential model) needs TIME_FIELD "
            f"{time_field!r}: add a column {time_field}:float (any number that increases with time, e.g. a Unix "
            f"time or each interaction's position in its user's history), or set TIME_FIELD to the name of your "
            f"time column"
        )
        load_col = (config["load_col"] or {}).get("inter")
        if load_col is not None and time_field not in load_col:
            raise AtomicFileError(
                f"eval_args.order is TO (time-ordered split) but load_col['inter'] = {load_col} omits "
                f"TIME_FIELD {time_field!r}; add it to load_col (or set load_col: ~ to load every column)"
            )
    for file in inter_files:
        check_atomic_file(os.path.join(folder, file), required_fields={f: hint for f, hint in required.items() if f}, **separators)
    for suffix, id_field in (("user", config["USER_ID_FIELD"]), ("item", config["ITEM_ID_FIELD"])):
        path = os.path.join(folder, f"{name}.{suffix}")
        if os.path.isfile(path):
            check_atomic_file(path, required_fields=[id_field], **separators)
