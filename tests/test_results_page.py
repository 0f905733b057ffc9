"""results/build_page.py: the results page is generated from the committed cells, paired files and fragments."""
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "results"))

import build_page  # noqa: E402


def write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def cell(seed, test, valid, code=True, clean=True, epochs=10, best=5, seconds=100.0):
    data = {
        "status": "ok", "seed": seed, "model": "M", "protocol": {"split": "LS valid_and_test"},
        "valid_result": {"ndcg@10": valid, "ndcg@10/tail": valid / 2},
        "test_result": {"ndcg@10": test, "hit@10": 2 * test, "ndcg@10/tail": test / 2},
        "epochs_trained": epochs, "best_epoch": best, "wall_time_s": seconds, "peak_rss_mb": 500.0,
    }
    if code:
        data["code"] = {"source": "0123456789abcdef", "commit": f"abcdef{seed}0123456789", "clean": clean}
    elif code is None:
        data["code"] = None
    return json.dumps(data)


@pytest.fixture
def tiny_repo(tmp_path):
    """A repository with one study of two models: A with code versions, B without (one seed with ``code: null``)."""
    root = str(tmp_path)
    cells = f"{root}/results/study/cells"
    write(f"{cells}/A-seed2020.json", cell(2020, 0.05, 0.06))
    write(f"{cells}/A-seed2021.json", cell(2021, 0.07, 0.08, clean=False))
    write(f"{cells}/A-seed2021.users.json", "{}")  # per-user values: not a cell
    write(f"{cells}/B-seed2020.json", cell(2020, 0.04, 0.05, code=False))
    write(f"{cells}/B-seed2021.json", cell(2021, 0.04, 0.05, code=None))
    write(f"{cells}/C-seed2020.json", json.dumps({"status": "failed"}))  # not finished: left out
    write(f"{root}/results/study/paired_A_B_test.json", json.dumps({
        "cells": "results/study/cells", "models": ["A", "B"], "split": "test", "metric": "ndcg@10", "seeds": [2020, 2021], "users": 10,
        "mean": {"A": 0.06, "B": 0.04}, "difference": 0.02, "interval_95": [0.005, 0.035],
        "other_side_share": 0.001, "users_a_better": 6, "users_b_better": 1}))
    return root


def test_cells_table_gives_mean_and_sample_std_code_versions_and_the_files(tiny_repo):
    lines = build_page.table_cells(tiny_repo, [
        "cols: test.ndcg@10, seeds:test.ndcg@10, valid.ndcg@10/tail, epochs, seconds",
        "study/A = Model A", "study/B"], {})
    header, rows, files = lines[0], lines[2:4], lines[-1]
    assert header == ("| model | seeds | test NDCG@10 | test NDCG@10 per seed | valid NDCG@10 tail | epochs (best) "
                      "| s per run | code version |")
    # mean 0.06, sample std of (0.05, 0.07) = 0.0141 (the population std would be 0.0100)
    assert rows[0].startswith("| Model A | 2 (2020, 2021) | 0.0600 ± 0.0141 | 0.0500 / 0.0700 | 0.0350 ± 0.0071 | 10 (5) | 100 ± 0 |")
    assert rows[0].endswith("| abcdef2, abcdef2* |")  # short commits in seed order, * = uncommitted changes
    assert "code version not recorded" not in rows[0]
    assert rows[1].startswith("| B | 2 (2020, 2021) | 0.0400 ± 0.0000 |")
    assert rows[1].endswith(f"| **{build_page.NOT_RECORDED}** (seeds 2020, 2021) |")  # missing and null code alike
    assert files.startswith("Files: `results/study/cells/{A,B}-seed{2020,2021}.json`.")
    assert "uncommitted changes" in files


def test_one_seed_has_no_std_and_a_row_mixing_recorded_and_unrecorded_cells_names_the_seed(tiny_repo):
    write(f"{tiny_repo}/results/other/cells/D-seed2020.json", cell(2020, 0.03, 0.04, code=False))
    write(f"{tiny_repo}/results/other/cells/D-seed2022.json", cell(2022, 0.05, 0.06))
    write(f"{tiny_repo}/results/other/cells/E-seed2021.json", cell(2021, 0.0123, 0.02))
    lines = build_page.table_cells(tiny_repo, ["cols: test.ndcg@10", "other/D", "other/E"], {})
    assert lines[2] == f"| D | 2 (2020, 2022) | 0.0400 ± 0.0141 | abcdef2; **{build_page.NOT_RECORDED}** (seed 2020) |"
    assert lines[3] == "| E | 1 (2021) | 0.0123 | abcdef2 |"
    assert lines[-1] == ("Files: `results/other/cells/D-seed{2020,2022}.json`; `results/other/cells/E-seed2021.json`.")


def test_compare_table_calls_a_difference_a_gain_only_with_a_paired_interval(tiny_repo):
    lines = build_page.table_compare(tiny_repo, [
        "A = study/A ; B = study/B ; paired = study/paired_A_B",
        "B = study/B ; A = study/A"], {})
    with_paired, without = lines[2], lines[3]
    assert "| +0.0200 [+0.0050, +0.0350] (seeds 2020, 2021) |" in with_paired
    assert "A above the baseline (interval excludes 0)" in with_paired
    assert "| -0.0200, no paired interval |" in without and "| no paired interval |" in without
    assert "`results/study/paired_A_B_test.json`" in lines[-1]
    assert "`results/study/cells/{A,B}-seed{2020,2021}.json`" in lines[-1]
    with pytest.raises(build_page.PageError, match="pairs .* not the row's study/B and study/A"):
        build_page.table_compare(tiny_repo, ["B = study/B ; A = study/A ; paired = study/paired_A_B"], {})


def test_inline_values_and_the_page_built_from_fragments(tiny_repo):
    write(f"{tiny_repo}/results/page/00-intro.md", "# Results\n\n@contents\n\n## Study (`results/study/`)\n\n"
          "A is {{mean study/A test.ndcg@10}}, {{pct study/A study/B test.ndcg@10}} over B, "
          "{{paired study/paired_A_B_test}}; {{cells}} cells, {{cells_without_code}} without code.\n\n"
          "@table cells\n  cols: test.ndcg@10\n  study/A\nAfter the table.\n")
    text = build_page.build(tiny_repo)
    assert text.startswith(build_page.HEADER)
    assert "- [Study (results/study/)](#study-resultsstudy)" in text
    assert ("A is 0.0600 ± 0.0141, +50% over B, +0.0200 [+0.0050, +0.0350] (`results/study/paired_A_B_test.json`, "
            "seeds 2020, 2021); 4 cells, 2 without code.") in text
    assert "Files: `results/study/cells/A-seed{2020,2021}.json`." in text and "changes on top of it.\n\nAfter the table." in text
    assert build_page.missing_studies(tiny_repo, text) == []
    write(f"{tiny_repo}/results/page/01-bad.md", "{{mean study/Z test.ndcg@10}}\n")
    with pytest.raises(build_page.PageError, match="01-bad.md, line 1: .*Z-seed<N>.json: no finished cell"):
        build_page.build(tiny_repo)


def test_check_fails_when_a_cell_changes_and_passes_once_the_page_is_rebuilt(tiny_repo):
    write(f"{tiny_repo}/results/page/00-intro.md", "# Results (`results/study/`)\n\n{{mean study/A test.ndcg@10}}\n")
    assert build_page.main(["--root", tiny_repo]) == 0
    assert build_page.main(["--root", tiny_repo, "--check"]) == 0
    write(f"{tiny_repo}/results/study/cells/A-seed2020.json", cell(2020, 0.06, 0.06))
    assert build_page.main(["--root", tiny_repo, "--check"]) == 1
    assert build_page.main(["--root", tiny_repo]) == 0
    assert build_page.main(["--root", tiny_repo, "--check"]) == 0


def test_committed_page_is_what_build_page_writes():
    """results/README.md equals the page generated from the committed files: a changed cell, paired file or fragment
    needs `python results/build_page.py`."""
    with open(os.path.join(REPO, build_page.OUTPUT), encoding="utf-8") as f:
        committed = f.read()
    assert committed == build_page.build(REPO), "results/README.md is stale: run `python results/build_page.py`"


def test_check_command_line_passes_on_the_committed_page():
    done = subprocess.run([sys.executable, os.path.join(REPO, "results", "build_page.py"), "--check"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_study_folder_with_cells_has_a_section():
    with open(os.path.join(REPO, build_page.OUTPUT), encoding="utf-8") as f:
        page = f.read()
    studies = build_page.study_folders(REPO)
    assert "results/ml-100k-tuned" in studies and "results/ml-100k-feddmmr-tuning/central" in studies
    headings = "\n".join(line for line in page.splitlines() if line.startswith("#"))
    # every study is named in the page, and its top-level folder in a section heading
    assert [s for s in studies if f"{s}/" not in page] == []
    assert [s for s in studies if "/".join(s.split("/")[:2]) + "/" not in headings] == []


def test_page_counts_every_cell_every_cell_without_a_code_version_and_those_with_a_machine():
    total, without, machines = build_page.all_cells(REPO)
    with open(os.path.join(REPO, build_page.OUTPUT), encoding="utf-8") as f:
        page = f.read()
    assert f"Of the {total} cells under `results/`, {without} record no code" in page
    assert 1 <= machines < total and f"{machines} of the {total} cells do" in " ".join(page.split())
    assert page.count(build_page.NOT_RECORDED) > 1
