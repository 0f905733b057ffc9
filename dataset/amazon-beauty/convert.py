#!/usr/bin/env python3
"""Convert the Amazon Beauty benchmark (derived TSVs) into RecBole atomic files (standard library only).

    python dataset/amazon-beauty/convert.py DERIVED_DIR [--out DIR]

DERIVED_DIR holds ``amazon_beauty.interactions.tsv`` and ``amazon_beauty.items.tsv`` (see README.md: how to build
them from the public files). Written to DIR (default: this script's folder):

- ``amazon-beauty.inter``: ``user_id:token  item_id:token  timestamp:float``. The ids are the benchmark's integer
  ids (S3Rec/ICLRec/P5 ``Beauty.txt``), rows user by user in benchmark order. ``timestamp`` is the review day
  (Unix seconds, UTC midnight) plus ``TIME_STEP * seq_pos`` seconds, so sorting by it gives each user's sequence in
  ``seq_pos`` order even within a day, also after RecBole turns it into float32 (see README.md).
- ``amazon-beauty.item``: ``item_id:token  asin:token  title:token  brand:token  categories:token_seq``, the
  categories separated by ``|`` (the dataset's ``seq_separator``: category names contain spaces).

Every malformed input stops the conversion with an error naming the file, the line and the field; no row is
skipped.
"""
import argparse
import html
import os
import sys

INTERACTIONS_FILE = "amazon_beauty.interactions.tsv"
ITEMS_FILE = "amazon_beauty.items.tsv"
INTERACTION_COLUMNS = ["user_id", "item_id", "timestamp", "user_idx", "item_idx", "seq_pos"]
ITEM_COLUMNS = ["item_id", "item_idx", "title", "attributes", "idgenrec_text"]
DATASET = "amazon-beauty"

DAY = 86400
# float32 (RecBole's float fields) holds every multiple of 128 below 2**31 exactly, and Unix times of 1970-2038 are
# below 2**31: day + 128 * seq_pos is exact in float32 and stays within its day for seq_pos < 675.
TIME_STEP = 128
MAX_SEQ_POS = (DAY - 1) // TIME_STEP  # 674
SEQ_SEPARATOR = "|"
ATTRIBUTE_SEPARATOR = " | "
# The sub-categories of Amazon's "Beauty" (2014 metadata): every item's category path starts with one of them;
# an attribute list that starts with anything else starts with the brand (S3Rec's attributes: brand, then path).
TOP_CATEGORIES = ("Bath & Body", "Fragrance", "Hair Care", "Makeup", "Skin Care", "Tools & Accessories")


class ConvertError(ValueError):
    """An input file is missing or malformed; the message names the file, the line and the field."""


def read_table(path, columns):
    """Rows of a tab-separated file with exactly the header ``columns``, as ``(line number, {column: value})``."""
    if not os.path.isfile(path):
        raise ConvertError(f"{path}: file not found (expected the derived file {os.path.basename(path)})")
    rows = []
    with open(path, "r", encoding="utf-8", newline="") as f:
        try:
            lines = f.read().split("\n")
        except UnicodeDecodeError as err:
            raise ConvertError(f"{path}: not a UTF-8 text file ({err})") from None
    if lines and lines[-1] == "":
        lines.pop()  # the newline that ends the last line
    if not lines:
        raise ConvertError(f"{path}: empty file, expected the header {chr(9).join(columns)!r}")
    header = lines[0].rstrip("\r").split("\t")
    if header != columns:
        raise ConvertError(f"{path}: line 1: wrong header {header}, expected the columns {columns} (tab-separated)")
    for number, line in enumerate(lines[1:], start=2):
        values = line.rstrip("\r").split("\t")
        if len(values) != len(columns):
            raise ConvertError(
                f"{path}: line {number}: {len(values)} field(s), expected {len(columns)} ({', '.join(columns)})"
            )
        rows.append((number, dict(zip(columns, values))))
    if not rows:
        raise ConvertError(f"{path}: holds a header but no rows")
    return rows


def _where(path, number, field):
    return f"{path}: line {number}: field {field!r}"


def _integer(path, number, row, field, lowest):
    value = row[field]
    if not (value.isascii() and value.isdigit()) or int(value) < lowest:
        raise ConvertError(f"{_where(path, number, field)}: {value!r} is not an integer >= {lowest}")
    return int(value)


def _token(path, number, row, field):
    value = row[field]
    if not value or value != value.strip() or " " in value:
        raise ConvertError(f"{_where(path, number, field)}: {value!r} is not an id (non-empty, without spaces)")
    return value


def _text(value):
    """HTML character references decoded (``L&#39;Oreal`` -> ``L'Oreal``), whitespace runs made one space."""
    return " ".join(html.unescape(value).split())


def split_attributes(path, number, attributes):
    """``(brand, categories)`` of an attribute list ``[brand | ]top category | sub-category | ...``."""
    names = [_text(name) for name in attributes.split(ATTRIBUTE_SEPARATOR)] if attributes else []
    if any(not name for name in names):
        raise ConvertError(f"{_where(path, number, 'attributes')}: {attributes!r} has an empty name")
    if any(SEQ_SEPARATOR in name for name in names):
        raise ConvertError(f"{_where(path, number, 'attributes')}: {attributes!r} has a name holding {SEQ_SEPARATOR!r}")
    brand = names[0] if names and names[0] not in TOP_CATEGORIES else ""
    categories = names[1:] if brand else names
    if not categories or categories[0] not in TOP_CATEGORIES:
        raise ConvertError(
            f"{_where(path, number, 'attributes')}: {attributes!r} is not '[brand | ]category | ...' with a "
            f"category path that starts with one of {list(TOP_CATEGORIES)}"
        )
    return brand, categories


def read_items(path):
    """Items by benchmark id: ``{item_idx: {'asin', 'title', 'brand', 'categories', 'line'}}``."""
    items, line_of_asin = {}, {}
    for number, row in read_table(path, ITEM_COLUMNS):
        asin = _token(path, number, row, "item_id")
        idx = _integer(path, number, row, "item_idx", 1)
        if idx in items:
            raise ConvertError(f"{_where(path, number, 'item_idx')}: item {idx} repeats line {items[idx]['line']}")
        if asin in line_of_asin:
            raise ConvertError(f"{_where(path, number, 'item_id')}: item {asin!r} repeats line {line_of_asin[asin]}")
        brand, categories = split_attributes(path, number, row["attributes"])
        items[idx] = {"asin": asin, "title": _text(row["title"]), "brand": brand, "categories": categories, "line": number}
        line_of_asin[asin] = number
    return items


def read_interactions(path, items, items_path):
    """Each user's interactions in benchmark order: ``{user_idx: [(seq_pos, item_idx, timestamp, line), ...]}``."""
    users, reviewer_of, user_of_reviewer, seen = {}, {}, {}, {}
    for number, row in read_table(path, INTERACTION_COLUMNS):
        reviewer = _token(path, number, row, "user_id")
        asin = _token(path, number, row, "item_id")
        timestamp = _integer(path, number, row, "timestamp", 0)
        user = _integer(path, number, row, "user_idx", 1)
        item = _integer(path, number, row, "item_idx", 1)
        pos = _integer(path, number, row, "seq_pos", 0)
        if timestamp % DAY:
            raise ConvertError(f"{_where(path, number, 'timestamp')}: {timestamp} is not a day (a multiple of {DAY})")
        if pos > MAX_SEQ_POS:
            raise ConvertError(
                f"{_where(path, number, 'seq_pos')}: {pos} > {MAX_SEQ_POS}: the time encoding day + "
                f"{TIME_STEP} * seq_pos would leave the day"
            )
        if item not in items:
            raise ConvertError(f"{_where(path, number, 'item_idx')}: item {item} is not in the items file {items_path}")
        if items[item]["asin"] != asin:
            raise ConvertError(
                f"{_where(path, number, 'item_id')}: {asin!r}, but item {item} is {items[item]['asin']!r} in "
                f"{items_path} line {items[item]['line']}"
            )
        if reviewer_of.setdefault(user, (reviewer, number))[0] != reviewer:
            first = reviewer_of[user]
            raise ConvertError(f"{_where(path, number, 'user_id')}: {reviewer!r}, but user {user} is {first[0]!r} on line {first[1]}")
        if user_of_reviewer.setdefault(reviewer, (user, number))[0] != user:
            first = user_of_reviewer[reviewer]
            raise ConvertError(f"{_where(path, number, 'user_idx')}: {user}, but {reviewer!r} is user {first[0]} on line {first[1]}")
        if (user, item) in seen:
            raise ConvertError(
                f"{_where(path, number, 'item_idx')}: duplicate interaction (user {user}, item {item}), first on "
                f"line {seen[user, item]}"
            )
        seen[user, item] = number
        users.setdefault(user, []).append((pos, item, timestamp, number))
    for user, rows in users.items():
        rows.sort()
        for expected, (pos, _, timestamp, number) in enumerate(rows):
            if pos != expected:
                problem = f"seq_pos {pos} repeats line {rows[expected - 1][3]}" if pos < expected else f"seq_pos {expected} is missing"
                raise ConvertError(f"{_where(path, number, 'seq_pos')}: user {user}: {problem} (expected 0..{len(rows) - 1})")
            if expected and timestamp < rows[expected - 1][2]:
                raise ConvertError(
                    f"{_where(path, number, 'timestamp')}: user {user}: {timestamp} at seq_pos {pos} is before "
                    f"{rows[expected - 1][2]} at seq_pos {pos - 1} (line {rows[expected - 1][3]}): the benchmark "
                    f"order must follow the time"
                )
    return users


def encoded_time(timestamp, seq_pos):
    """The .inter time: the day plus ``TIME_STEP`` seconds per position, so it sorts a user's items by seq_pos."""
    return timestamp + TIME_STEP * seq_pos


def convert(derived_dir, out_dir):
    """Read the derived files of ``derived_dir`` and write the atomic files to ``out_dir``; returns the counts."""
    items_path = os.path.join(derived_dir, ITEMS_FILE)
    items = read_items(items_path)
    users = read_interactions(os.path.join(derived_dir, INTERACTIONS_FILE), items, items_path)
    os.makedirs(out_dir, exist_ok=True)
    inter_path, item_path = (os.path.join(out_dir, f"{DATASET}.{suffix}") for suffix in ("inter", "item"))
    with open(inter_path + ".tmp", "w", encoding="utf-8", newline="\n") as f:
        f.write("user_id:token\titem_id:token\ttimestamp:float\n")
        for user in sorted(users):
            for pos, item, timestamp, _ in users[user]:
                f.write(f"{user}\t{item}\t{encoded_time(timestamp, pos)}\n")
    with open(item_path + ".tmp", "w", encoding="utf-8", newline="\n") as f:
        f.write("item_id:token\tasin:token\ttitle:token\tbrand:token\tcategories:token_seq\n")
        for idx in sorted(items):
            item = items[idx]
            f.write(f"{idx}\t{item['asin']}\t{item['title']}\t{item['brand']}\t{SEQ_SEPARATOR.join(item['categories'])}\n")
    os.replace(inter_path + ".tmp", inter_path)
    os.replace(item_path + ".tmp", item_path)
    n_inter = sum(len(rows) for rows in users.values())
    used = {item for rows in users.values() for _, item, _, _ in rows}
    return {
        "users": len(users),
        "items": len(items),
        "interactions": n_inter,
        "average length": round(n_inter / len(users), 2),
        "items with a title": sum(1 for item in items.values() if item["title"]),
        "items with a brand": sum(1 for item in items.values() if item["brand"]),
        "items without interactions": len(items) - len(used),
        "inter": inter_path,
        "item": item_path,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("derived_dir", help=f"folder holding {INTERACTIONS_FILE} and {ITEMS_FILE}")
    parser.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)), help="output folder (default: this script's folder)")
    args = parser.parse_args(argv)
    try:
        counts = convert(args.derived_dir, args.out)
    except ConvertError as err:
        sys.exit(f"convert.py: error: {err}")
    for key, value in counts.items():
        print(f"{key}: {value}")


if __name__ == "__main__":
    main()
