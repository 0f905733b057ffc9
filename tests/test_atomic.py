"""Malformed atomic files fail before RecBole loads them, naming the file, line and field."""
import pytest

from recbole_ur4rec.data.atomic import AtomicFileError, check_atomic_file
from recbole_ur4rec.quick_start import run_recbole_ur4rec

HEADER = "user_id:token\titem_id:token\ttimestamp:float\n"


def write(tmp_path, text, name="bad.inter"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_wrong_column_count_names_the_line(tmp_path):
    path = write(tmp_path, HEADER + "u1\ti1\t1\nu1\ti2\n")
    with pytest.raises(AtomicFileError, match=r"bad.inter: 1 line\(s\) do not have the header's 3 fields, e.g. line 3 has 2"):
        check_atomic_file(path)


def test_non_number_in_float_field(tmp_path):
    path = write(tmp_path, HEADER + "u1\ti1\t1\nu1\ti2\tyesterday\n")
    with pytest.raises(AtomicFileError, match=r"field 'timestamp' is float .* line 3: 'yesterday'"):
        check_atomic_file(path)


def test_header_without_types(tmp_path):
    path = write(tmp_path, "user_id\titem_id\nu1\ti1\n")
    with pytest.raises(AtomicFileError, match=r"header field 'user_id' must be written name:type"):
        check_atomic_file(path)


def test_missing_required_field(tmp_path):
    path = write(tmp_path, "user_id:token\titem_id:token\nu1\ti1\n")
    with pytest.raises(AtomicFileError, match=r"missing field\(s\) \['timestamp'\]"):
        check_atomic_file(path, required_fields=["user_id", "item_id", "timestamp"])


def test_empty_file(tmp_path):
    with pytest.raises(AtomicFileError, match="empty file"):
        check_atomic_file(write(tmp_path, ""))


def test_quick_start_refuses_a_malformed_dataset(tmp_path, quick_config):
    folder = tmp_path / "broken"
    folder.mkdir()
    write(folder, HEADER + "u1\ti1\t1\nu1\ti2\t2\tsurplus\n", name="broken.inter")
    with pytest.raises(AtomicFileError, match=r"broken.inter: .* line 3 has 4"):
        run_recbole_ur4rec("SASRec", "broken", config_dict={**quick_config, "data_path": str(tmp_path)})


def test_time_ordered_split_needs_the_time_field_loaded(quick_config):
    with pytest.raises(AtomicFileError, match=r"load_col\['inter'\] = \['user_id', 'item_id'\] omits TIME_FIELD 'timestamp'"):
        run_recbole_ur4rec("SASRec", "tiny", config_dict={**quick_config, "load_col": {"inter": ["user_id", "item_id"]}})
