"""bench/synthetic_data.py: seeded synthetic atomic datasets that RecBole loads."""
import os
import sys

import numpy as np
import pandas as pd
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))

import synthetic_data  # noqa: E402

USERS, ITEMS, INTERACTIONS = 100, 150, 2000


def make(root, name="synth", seed=0, item_text=True, **kwargs):
    return synthetic_data.generate(
        root, name, INTERACTIONS, USERS, ITEMS, seed=seed, item_text=item_text, **kwargs
    )


def read_inter(folder, name="synth"):
    return pd.read_csv(
        os.path.join(folder, f"{name}.inter"), sep="\t", dtype={"user_id:token": str, "item_id:token": str}
    )


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    return str(root), make(root)


def test_inter_file_shape_and_ids(synth):
    _, folder = synth
    assert folder.endswith(os.path.join("", "synth"))
    with open(os.path.join(folder, "synth.inter")) as f:
        assert f.readline() == "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
    frame = read_inter(folder)
    assert len(frame) == INTERACTIONS
    users, items = frame["user_id:token"], frame["item_id:token"]
    assert users.nunique() == USERS and items.nunique() == ITEMS
    for column in (users, items):
        assert all(isinstance(token, str) and not token.isdigit() for token in column.unique())
    numbers = np.sort(items.str[1:].astype(int).unique())
    assert (np.diff(numbers) > 1).any(), "item numbers should not be contiguous"
    assert set(frame["rating:float"].unique()) <= {1, 2, 3, 4, 5}


def test_users_activity_and_time_order(synth):
    frame = read_inter(synth[1])
    per_user = frame.groupby("user_id:token", sort=False)
    assert per_user.size().min() >= 5
    assert (per_user["timestamp:float"].diff().dropna() > 0).all()
    # Rows are grouped by user: each user's rows form one block.
    runs = (frame["user_id:token"] != frame["user_id:token"].shift()).sum()
    assert runs == USERS


def test_item_popularity_is_skewed(synth):
    counts = read_inter(synth[1])["item_id:token"].value_counts()
    assert counts.iloc[0] >= 10 * counts.median()


def test_item_text_file(synth):
    item = pd.read_csv(os.path.join(synth[1], "synth.item"), sep="\t", dtype=str)
    assert list(item.columns) == ["item_id:token", "title:token_seq", "genre:token_seq"]
    assert len(item) == ITEMS
    assert set(item["item_id:token"]) == set(read_inter(synth[1])["item_id:token"])
    for title, genre in zip(item["title:token_seq"], item["genre:token_seq"]):
        assert all(word.isalnum() for word in title.split(" "))
        genres = genre.split(" ")
        assert 1 <= len(genres) <= 3 and len(set(genres)) == len(genres)
        assert set(genres) <= set(synthetic_data.GENRES)


def files_bytes(folder):
    return {name: open(os.path.join(folder, name), "rb").read() for name in sorted(os.listdir(folder))}


def test_seeded(synth, tmp_path):
    again = files_bytes(make(tmp_path / "again"))
    assert again == files_bytes(synth[1])
    other = files_bytes(make(tmp_path / "other", seed=1))
    assert other["synth.inter"] != again["synth.inter"]
    assert other["synth.item"] != again["synth.item"]
    # The interactions do not depend on whether the item text is written.
    plain = files_bytes(make(tmp_path / "plain", item_text=False))
    assert list(plain) == ["synth.inter"] and plain["synth.inter"] == again["synth.inter"]


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match=r"interactions=400 is fewer than users \* min_user_interactions = 100 \* 5 = 500"):
        synthetic_data.generate(tmp_path, "bad", 400, 100, 50)
    with pytest.raises(ValueError, match=r"items=600 is more than interactions=500"):
        synthetic_data.generate(tmp_path, "bad", 500, 10, 600)
    assert not os.path.exists(tmp_path / "bad")


def test_cli(tmp_path, capsys):
    assert synthetic_data.main(["--name", "cli", "--interactions", "600", "--users", "20", "--items", "30", "--out", str(tmp_path)]) == 0
    assert "cli: 20 users, 30 items, 600 interactions" in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path / "cli")) == ["cli.inter"]
    with pytest.raises(SystemExit):
        synthetic_data.main(["--name", "cli", "--interactions", "10", "--users", "20", "--items", "5", "--out", str(tmp_path)])
    assert "fewer than users * min_user_interactions" in capsys.readouterr().err


def test_recbole_loads_it(synth):
    from recbole_ur4rec.config import Config
    from recbole_ur4rec.data import create_dataset

    root, _ = synth
    config = Config(
        model="FastSASRec",
        dataset="synth",
        config_dict={
            "data_path": root,
            "load_col": {"inter": ["user_id", "item_id", "rating", "timestamp"]},
            "show_progress": False,
        },
    )
    dataset = create_dataset(config)
    assert dataset.user_num - 1 == USERS
    assert dataset.item_num - 1 == ITEMS
    assert dataset.inter_num == INTERACTIONS
