"""docs/config-keys.md lists every key of the plugin's yaml files, in its section: it is written from them."""
import importlib.util
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("build_config_keys", os.path.join(REPO, "docs", "build_config_keys.py"))
build_config_keys = importlib.util.module_from_spec(spec)
spec.loader.exec_module(build_config_keys)


def test_the_committed_doc_is_current():
    with open(build_config_keys.OUTPUT, encoding="utf-8") as f:
        assert f.read() == build_config_keys.build(), "docs/config-keys.md is stale: run `python docs/build_config_keys.py`"


def test_keys_land_in_their_section_and_a_key_above_every_section_is_named(tmp_path):
    path = tmp_path / "M.yaml"
    path.write_text("# M\n# ===== Model =====\nn_layers: 2   # (int)\n  nested: 1\n# ===== Loss =====\nloss_type: CE\n")
    assert build_config_keys.sections(str(path)) == {"Model": ["n_layers"], "Loss": ["loss_type"]}
    path.write_text("loss_type: CE\n")
    with pytest.raises(ValueError, match=r"M.yaml line 1: key 'loss_type' above any '# ===== Section =====' line"):
        build_config_keys.sections(str(path))
    assert build_config_keys.sections(str(path), "Dataset") == {"Dataset": ["loss_type"]}
