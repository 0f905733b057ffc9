"""Amazon Beauty (dataset/amazon-beauty/): the converter on a tiny derived folder and on bad inputs; the shipped
atomic files (counts, the first users' Beauty.txt sequences, the time encoding); RecBole's time-ordered
leave-one-out split of them through the plugin, and user texts written from the training split only."""
import importlib.util
import os
import re
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA_ROOT = os.path.join(ROOT, "dataset")
BEAUTY = os.path.join(DATA_ROOT, "amazon-beauty")
CONVERT = os.path.join(BEAUTY, "convert.py")
DAY = 86400
D1, D2, D3 = 1_300_000_000 // DAY * DAY, 1_300_000_000 // DAY * DAY + DAY, 1_300_000_000 // DAY * DAY + 5 * DAY


@pytest.fixture(scope="module")
def convert():
    """convert.py as a module (its folder name is not an importable package name)."""
    spec = importlib.util.spec_from_file_location("amazon_beauty_convert", CONVERT)
    module = importlib.util.module_from_spec(spec)
    dont_write = sys.dont_write_bytecode
    sys.dont_write_bytecode = True  # no __pycache__ in dataset/amazon-beauty/
    try:
        spec.loader.exec_module(module)
    finally:
        sys.dont_write_bytecode = dont_write
    return module


# ---------------------------------------------------------------------------------------------------------------
# the converter on a tiny derived folder

ITEM_HEADER = "item_id\titem_idx\ttitle\tattributes\tidgenrec_text"
ITEMS = [  # ASINs are not in item_idx order, so neither ASIN nor id order is the benchmark order of a tie
    "B009\t1\tNail Lacquer &amp; Top Coat\tOPI | Makeup | Nails | Nail Polish\tnail lacquer",
    "B001\t2\tShampoo  for dry hair \tHair Care | Hair Care Products | Shampoos\tshampoo",
    "B005\t3\t\tSkin Care | Face\t",
    "B003\t4\tKabuki Brush\tL&#39;Oreal Paris | Tools & Accessories | Brushes\tkabuki brush",
    "B007\t5\tCr&egrave;me\tUnknown | Skin Care | Body\tcreme",
]
INTER_HEADER = "user_id\titem_id\ttimestamp\tuser_idx\titem_idx\tseq_pos"
# (reviewer, user_idx, [(item_idx, day), ...] in benchmark order): same-day runs in an order that no other key gives
USERS = [
    ("RZ", 1, [(3, D1), (1, D1), (2, D1), (5, D3)]),
    ("RA", 2, [(4, D2), (2, D2), (5, D2), (1, D3), (3, D3)]),
    ("RM", 3, [(2, D1), (1, D3), (4, D3)]),
]
ASIN = {1: "B009", 2: "B001", 3: "B005", 4: "B003", 5: "B007"}


def interaction_lines():
    lines = []
    for reviewer, user, sequence in USERS:
        for pos, (item, day) in enumerate(sequence):
            lines.append(f"{reviewer}\t{ASIN[item]}\t{day}\t{user}\t{item}\t{pos}")
    return lines[::-1]  # file order reversed: the converter orders by user, then seq_pos


def write_derived(folder, items=None, interactions=None, item_header=ITEM_HEADER, inter_header=INTER_HEADER):
    """A derived folder; ``items`` / ``interactions`` are the data lines (default: the ones above)."""
    os.makedirs(folder, exist_ok=True)
    items = ITEMS if items is None else items
    interactions = interaction_lines() if interactions is None else interactions
    with open(os.path.join(folder, "amazon_beauty.items.tsv"), "w", encoding="utf-8") as f:
        f.write("\n".join([item_header] + items) + "\n")
    with open(os.path.join(folder, "amazon_beauty.interactions.tsv"), "w", encoding="utf-8") as f:
        f.write("\n".join([inter_header] + interactions) + "\n")
    return str(folder)


def test_the_converter_writes_the_expected_atomic_files(convert, tmp_path):
    derived = write_derived(tmp_path / "derived")
    counts = convert.convert(derived, str(tmp_path / "out"))
    inter = (tmp_path / "out" / "amazon-beauty.inter").read_text(encoding="utf-8")
    item = (tmp_path / "out" / "amazon-beauty.item").read_text(encoding="utf-8")
    expected_inter = ["user_id:token\titem_id:token\ttimestamp:float"]
    for _, user, sequence in USERS:
        expected_inter += [f"{user}\t{item}\t{day + 128 * pos}" for pos, (item, day) in enumerate(sequence)]
    assert inter == "\n".join(expected_inter) + "\n"
    assert item == (
        "item_id:token\tasin:token\ttitle:token\tbrand:token\tcategories:token_seq\n"
        "1\tB009\tNail Lacquer & Top Coat\tOPI\tMakeup|Nails|Nail Polish\n"
        "2\tB001\tShampoo for dry hair\t\tHair Care|Hair Care Products|Shampoos\n"
        "3\tB005\t\t\tSkin Care|Face\n"
        "4\tB003\tKabuki Brush\tL'Oreal Paris\tTools & Accessories|Brushes\n"
        "5\tB007\tCrème\tUnknown\tSkin Care|Body\n"
    )
    assert {k: counts[k] for k in ("users", "items", "interactions", "items with a title", "items with a brand")} == {
        "users": 3, "items": 5, "interactions": 12, "items with a title": 4, "items with a brand": 3,
    }
    # the time sorts every user's items in benchmark (seq_pos) order; the day and the item id would not
    rows = [line.split("\t") for line in expected_inter[1:]]
    for _, user, sequence in USERS:
        mine = [(float(t), int(i)) for u, i, t in rows if int(u) == user]
        assert [i for _, i in sorted(mine)] == [item for item, _ in sequence]
    assert [item for item, _ in sorted(USERS[0][2], key=lambda x: (x[1], x[0]))] != [item for item, _ in USERS[0][2]]


def test_the_converter_command_line(tmp_path):
    derived = write_derived(tmp_path / "derived")
    done = subprocess.run(
        [sys.executable, "-B", CONVERT, derived, "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "users: 3" in done.stdout and "interactions: 12" in done.stdout
    assert sorted(os.listdir(tmp_path / "out")) == ["amazon-beauty.inter", "amazon-beauty.item"]

    os.remove(os.path.join(derived, "amazon_beauty.items.tsv"))
    done = subprocess.run(
        [sys.executable, "-B", CONVERT, derived, "--out", str(tmp_path / "out2")], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert re.search(r"convert\.py: error: .*amazon_beauty\.items\.tsv: file not found", done.stderr)
    assert not os.path.exists(tmp_path / "out2")


def _replace(lines, index, line):
    lines = list(lines)
    lines[index] = line
    return lines


INTER = "amazon_beauty.interactions.tsv"
ITEMS_FILE = "amazon_beauty.items.tsv"
LAST = len(interaction_lines()) + 1  # line number of the last interaction (header = line 1): user 1, seq_pos 0
BAD_INPUTS = {  # name: (write_derived arguments, file, message pattern)
    "wrong interaction header": (
        dict(inter_header=INTER_HEADER.replace("timestamp", "time")), INTER, r"line 1: wrong header .*'time'.* expected the columns"
    ),
    "wrong item header": (dict(item_header="item_id\titem_idx\ttitle\tattributes"), ITEMS_FILE, r"line 1: wrong header"),
    "a row with too few columns": (
        dict(interactions=interaction_lines()[:-1] + ["RM\tB001\t0\t3\t2"]), INTER, rf"line {LAST}: 5 field\(s\), expected 6"
    ),
    "a blank line": (dict(items=ITEMS[:2] + [""] + ITEMS[2:]), ITEMS_FILE, r"line 4: 1 field\(s\), expected 5"),
    "an item not in the items file": (
        dict(interactions=_replace(interaction_lines(), -1, f"RM\tB099\t{D1}\t3\t9\t0")), INTER,
        rf"line {LAST}: field 'item_idx': item 9 is not in the items file .*amazon_beauty\.items\.tsv",
    ),
    "an ASIN that is not the item's": (
        dict(interactions=_replace(interaction_lines(), -1, f"RM\tB003\t{D1}\t3\t2\t0")), INTER,
        rf"line {LAST}: field 'item_id': 'B003', but item 2 is 'B001' in .*items\.tsv line 3",
    ),
    "a duplicate (user, item)": (
        dict(interactions=interaction_lines() + [f"RZ\tB005\t{D3}\t1\t3\t4"]), INTER,
        rf"line {LAST + 1}: field 'item_idx': duplicate interaction \(user 1, item 3\), first on line {LAST}",
    ),
    "a reviewer with two user ids": (
        dict(interactions=interaction_lines() + [f"RZ\tB003\t{D3}\t4\t4\t0"]), INTER,
        rf"line {LAST + 1}: field 'user_idx': 4, but 'RZ' is user 1 on line",
    ),
    "a user id with two reviewers": (
        dict(interactions=interaction_lines() + [f"RB\tB003\t{D3}\t2\t4\t5"]), INTER,
        rf"line {LAST + 1}: field 'user_id': 'RB', but user 2 is 'RA' on line",
    ),
    "a seq_pos that is not a number": (
        dict(interactions=_replace(interaction_lines(), -1, f"RM\tB001\t{D1}\t3\t2\tfirst")), INTER,
        rf"line {LAST}: field 'seq_pos': 'first' is not an integer >= 0",
    ),
    "a missing seq_pos": (
        dict(interactions=_replace(interaction_lines(), -1, f"RZ\tB005\t{D1}\t1\t3\t7")), INTER,
        r"field 'seq_pos': user 1: seq_pos 0 is missing \(expected 0..3\)",
    ),
    "a timestamp that is not a day": (
        dict(interactions=_replace(interaction_lines(), -1, f"RM\tB001\t{D1 + 5}\t3\t2\t0")), INTER,
        rf"line {LAST}: field 'timestamp': {D1 + 5} is not a day",
    ),
    "days that go backwards": (
        dict(interactions=_replace(interaction_lines(), -1, f"RZ\tB005\t{D3 + DAY}\t1\t3\t0")), INTER,
        rf"line {LAST - 1}: field 'timestamp': user 1: {D1} at seq_pos 1 is before {D3 + DAY} at seq_pos 0 \(line {LAST}\)",
    ),
    "a repeated item_idx": (
        dict(items=ITEMS + ["B010\t3\tDuplicate\tMakeup | Face\t"]), ITEMS_FILE, r"line 7: field 'item_idx': item 3 repeats line 4"
    ),
    "attributes without a category path": (
        dict(items=_replace(ITEMS, 2, "B005\t3\t\tOPI | Lips\t")), ITEMS_FILE,
        r"line 4: field 'attributes': 'OPI \| Lips' is not '\[brand \| \]category",
    ),
    "an items file without rows": (dict(items=[]), ITEMS_FILE, r"holds a header but no rows"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_inputs_name_the_file_line_and_field(convert, tmp_path, case):
    arguments, file, pattern = BAD_INPUTS[case]
    derived = write_derived(tmp_path / "derived", **arguments)
    with pytest.raises(convert.ConvertError, match=re.escape(os.path.join(derived, file)) + r": .*" + pattern):
        convert.convert(derived, str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")  # nothing written


def test_a_missing_file_is_named(convert, tmp_path):
    derived = write_derived(tmp_path / "derived")
    os.remove(os.path.join(derived, INTER))
    with pytest.raises(convert.ConvertError, match=re.escape(os.path.join(derived, INTER)) + ": file not found"):
        convert.convert(derived, str(tmp_path / "out"))


# ---------------------------------------------------------------------------------------------------------------
# the shipped atomic files

def read_atomic(path):
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    assert lines[-1] == "", f"{path} must end with a newline"
    return lines[0], [line.split("\t") for line in lines[1:-1]]


@pytest.fixture(scope="module")
def shipped():
    """``(inter rows, item rows, {user: [items in time order]})`` of the shipped files."""
    inter_header, inter = read_atomic(os.path.join(BEAUTY, "amazon-beauty.inter"))
    item_header, items = read_atomic(os.path.join(BEAUTY, "amazon-beauty.item"))
    assert inter_header == "user_id:token\titem_id:token\ttimestamp:float"
    assert item_header == "item_id:token\tasin:token\ttitle:token\tbrand:token\tcategories:token_seq"
    rows = {}
    for user, item, time in inter:
        rows.setdefault(user, []).append((int(time), item))
    sequences = {user: [item for _, item in sorted(times)] for user, times in rows.items()}
    return inter, items, sequences, rows


def test_the_shipped_files_have_the_benchmark_counts(shipped):
    inter, items, sequences, _ = shipped
    assert len(sequences) == 22_363 and len(items) == 12_101 and len(inter) == 198_502
    assert all(len(row) == 3 for row in inter) and all(len(row) == 5 for row in items)
    assert len({(u, i) for u, i, _ in inter}) == 198_502  # no duplicate (user, item)
    item_ids = {row[0] for row in items}
    assert len(item_ids) == 12_101 and {i for _, i, _ in inter} == item_ids
    assert len({row[1] for row in items}) == 12_101  # ASINs
    assert sum(1 for row in items if row[2]) == 12_094  # titles
    assert all(row[4] for row in items)  # every item has a category path
    assert min(len(s) for s in sequences.values()) == 5
    assert round(len(inter) / len(sequences), 2) == 8.88


def test_the_first_users_are_beauty_txt_in_benchmark_order(shipped):
    _, _, sequences, _ = shipped
    assert sequences["1"] == "1 2 3 4 5".split()
    assert sequences["2"] == "6 7 8 9 10 4 11".split()
    assert sequences["3"] == "4 12 13 14 15 16 17 18 19".split()
    assert [int(u) for u in sequences] == list(range(1, 22_364))  # ids 1..22363, in file order


def test_the_time_is_the_day_plus_128_seconds_per_position_and_exact_in_float32(shipped):
    inter, _, _, rows = shipped
    # file order is the benchmark order, and each time is its day + 128 s * position
    assert all(times == sorted(times) for times in rows.values())
    for times in rows.values():
        assert [t % DAY for t, _ in times] == [128 * pos for pos in range(len(times))]
    users = np.array([int(u) for u, _, _ in inter])
    times = np.array([float(t) for _, _, t in inter])
    same_user = users[1:] == users[:-1]
    assert (np.diff(times.astype(np.float32))[same_user] > 0).all()  # RecBole's float32: no ties
    scaled = ((times - times.min()) / (times.max() - times.min())).astype(np.float32)
    assert (np.diff(scaled)[same_user] > 0).all()  # also with normalize_field: [timestamp]
    # 39% of the interactions share their day with the previous one: the days alone would tie them
    days = times // DAY
    assert 0.38 < ((days[1:] == days[:-1]) & same_user).sum() / len(inter) < 0.40


# ---------------------------------------------------------------------------------------------------------------
# RecBole's split through the plugin

@pytest.fixture(scope="module")
def beauty_splits(tmp_path_factory):
    """FastSASRec's config, dataset and (train, valid, test) data of amazon-beauty on its defaults."""
    from recbole_ur4rec.config import Config
    from recbole_ur4rec.data import create_dataset, data_preparation

    here = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("run"))  # RecBole may write ./log
    try:
        config = Config(
            model="FastSASRec", dataset="amazon-beauty",
            config_dict={"data_path": DATA_ROOT, "state": "WARNING", "show_progress": False,
                         "feature_cache_dir": str(tmp_path_factory.mktemp("cache"))},
        )
        dataset = create_dataset(config)
        train_data, valid_data, test_data = data_preparation(config, dataset)
    finally:
        os.chdir(here)
    return config, dataset, train_data, valid_data, test_data


def test_recbole_loads_the_dataset_on_its_defaults(beauty_splits):
    config, dataset, _, _, _ = beauty_splits
    assert config["data_path"] == BEAUTY
    assert (dataset.user_num - 1, dataset.item_num - 1, dataset.inter_num) == (22_363, 12_101, 198_502)
    assert config["seq_separator"] == "|" and config["normalize_all"] is False
    assert set(dataset.inter_feat.columns) == {"user_id", "item_id", "timestamp"}  # no ratings, none faked
    assert set(dataset.item_feat.columns) == {"item_id", "title", "brand", "categories"}
    categories = dataset.item_feat["categories"][dataset.token2id("item_id", "1")]
    assert [dataset.id2token("categories", c) for c in categories.tolist() if c] == ["Makeup", "Nails", "Nail Polish"]


def _tokens(dataset, field, ids):
    return dataset.id2token(field, np.asarray(ids)).tolist()


def test_leave_one_out_by_time_holds_out_each_users_last_two_items(beauty_splits, shipped):
    config, dataset, train_data, valid_data, test_data = beauty_splits
    sequences = shipped[2]
    max_len = config["MAX_ITEM_LIST_LENGTH"]
    for data, back in ((test_data, 1), (valid_data, 2)):
        feat = data._dataset.inter_feat
        users = _tokens(dataset, "user_id", feat["user_id"].numpy())
        targets = _tokens(dataset, "item_id", feat["item_id"].numpy())
        lists, lengths = feat["item_id_list"].numpy(), feat["item_length"].numpy()
        assert len(users) == len(set(users)) == 22_363
        for row, (user, target) in enumerate(zip(users, targets)):
            sequence = sequences[user]
            assert target == sequence[-back], f"user {user}: target {target}, expected {sequence[-back]}"
            history = _tokens(dataset, "item_id", lists[row, : lengths[row]])
            assert history == sequence[:-back][-max_len:], f"user {user}: history out of benchmark order"
    # the training split: every user's other items, in benchmark order, and its float32 times strictly increase
    train = train_data._dataset.training_split.inter_feat
    users = _tokens(dataset, "user_id", train["user_id"].numpy())
    items = _tokens(dataset, "item_id", train["item_id"].numpy())
    trained = {}
    for user, item in zip(users, items):
        trained.setdefault(user, []).append(item)
    assert trained == {user: sequence[:-2] for user, sequence in sequences.items()}
    times, uid = train["timestamp"].numpy(), train["user_id"].numpy()
    assert times.dtype == np.float32 and (np.diff(times)[uid[1:] == uid[:-1]] > 0).all()


def _held_out_targets(data_root, run_dir):
    """``{user: (validation target, test target)}`` of FastSASRec's split of ``<data_root>/amazon-beauty``."""
    from recbole_ur4rec.config import Config
    from recbole_ur4rec.data import create_dataset, data_preparation

    here = os.getcwd()
    os.chdir(run_dir)
    try:
        config = Config(model="FastSASRec", dataset="amazon-beauty", config_dict={"data_path": str(data_root), "state": "WARNING"})
        dataset = create_dataset(config)
        _, valid_data, test_data = data_preparation(config, dataset)
    finally:
        os.chdir(here)
    targets = []
    for data in (valid_data, test_data):
        feat = data._dataset.inter_feat
        targets.append(dict(zip(_tokens(dataset, "user_id", feat["user_id"]), _tokens(dataset, "item_id", feat["item_id"]))))
    return {user: (targets[0][user], targets[1][user]) for user in targets[1]}


def test_the_split_rests_on_the_time_not_on_the_file_order(shipped, tmp_path):
    """The rows shuffled give the same split; with day + seq_pos / 1000 (lost in RecBole's float32) they do not."""
    inter, _, sequences, _ = shipped
    expected = {user: (sequence[-2], sequence[-1]) for user, sequence in sequences.items()}
    order = np.random.default_rng(3).permutation(len(inter))
    for name, encode in (("exact", lambda t: t), ("fraction", lambda t: f"{t - t % DAY + t % DAY // 128 / 1000:.3f}")):
        folder = tmp_path / name / "amazon-beauty"
        folder.mkdir(parents=True)
        with open(folder / "amazon-beauty.inter", "w", encoding="utf-8") as f:
            f.write("user_id:token\titem_id:token\ttimestamp:float\n")
            f.writelines(f"{inter[i][0]}\t{inter[i][1]}\t{encode(int(inter[i][2]))}\n" for i in order)
        with open(os.path.join(BEAUTY, "amazon-beauty.item"), "rb") as source:
            (folder / "amazon-beauty.item").write_bytes(source.read())
        held_out = _held_out_targets(tmp_path / name, tmp_path)
        wrong = sum(held_out[user] != targets for user, targets in expected.items())
        if name == "exact":
            assert len(held_out) == 22_363 and wrong == 0
        else:
            assert wrong > 5000  # same-day ties broken by the shuffled file order


def test_user_text_is_written_from_the_training_split_only(beauty_splits, shipped):
    from recbole_ur4rec.features.item_text import item_titles_and_genres
    from recbole_ur4rec.features.user_text import user_texts

    config, dataset, train_data, _, _ = beauty_splits
    sequences = shipped[2]
    train_split = train_data._dataset.training_split
    # every item named by a marker of its own: the text lists exactly the user's training items, newest first
    markers = {str(token): f"<item {token}>" for token in dataset.field2id_token["item_id"][1:]}
    _, genres = item_titles_and_genres(config)
    tokens, texts = user_texts(train_split, markers, genres, top_genres=3, recent_items=1000)
    assert len(tokens) == 22_363
    for user, text in zip(tokens, texts):
        sequence = sequences[user]
        named = re.findall(r"<item (\d+)>", text)
        assert named == sequence[:-2][::-1], f"user {user}'s text names {named}, its training items are {sequence[:-2]}"
        assert sequence[-1] not in named and sequence[-2] not in named  # the test and validation targets
        assert text.endswith(f" {len(sequence) - 2} interactions, no ratings.") and "Rating habits" not in text


def test_the_text_settings_of_the_dataset(beauty_splits):
    from recbole_ur4rec.features.item_text import item_texts
    from recbole_ur4rec.features.pipeline import user_texts_of

    config, _, train_data, _, _ = beauty_splits
    _, tokens, texts, _ = item_texts(config)
    text_of = dict(zip(tokens, texts))
    assert len(text_of) == 12_101
    assert text_of["1"] == "OPI Nail Lacquer, Simmer and Shimmer, 0.5-Fluid Ounce. Brand: OPI. Categories: Makeup, Nails, Nail Polish."
    _, tokens, texts, _ = user_texts_of(config, train_data._dataset.training_split)
    user_1 = dict(zip(tokens, texts))["1"]  # items 1 2 3 | valid 4 | test 5
    assert user_1 == (
        "Favourite genres: Makeup (67%), Nails (67%), Nail Polish (67%). Recent items: SKIN79 The Prestige Beblesh "
        "Balm BB Cream Diamond Collection; OPI Red Shatter Crackle Nail Polish E55 New; OPI Nail Lacquer, Simmer and "
        "Shimmer, 0.5-Fluid Ounce. 3 interactions, no ratings."
    )
    assert "WAWO" not in user_1  # item 4's title, user 1's validation target
