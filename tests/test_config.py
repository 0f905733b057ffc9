"""Config layering: RecBole overall < plugin overall < model yaml < dataset yaml < files < dict < command line."""
import sys

import pytest
import yaml

from recbole_ur4rec import config as config_module
from recbole_ur4rec.config import Config


def write_yaml(path, values):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(values))
    return str(path)


LAYERS = ["overall", "model", "dataset", "file", "dict", "cmd"]


def test_layering_order(tmp_path, tiny_data_root, monkeypatch):
    # key k_<layer> is set by that layer and every layer below it: the top one must win.
    def keys_up_to(layer):
        return {f"k_{name}": layer for name in LAYERS[LAYERS.index(layer):]}

    properties = tmp_path / "properties"
    write_yaml(properties / "overall.yaml", {**keys_up_to("overall"), "hidden_size": 999, "n_layers": 999})
    write_yaml(properties / "model" / "SASRec.yaml", {**keys_up_to("model"), "n_layers": 5})
    write_yaml(properties / "dataset" / "tiny.yaml", keys_up_to("dataset"))
    config_file = write_yaml(tmp_path / "run.yaml", keys_up_to("file"))
    monkeypatch.setattr(config_module, "PLUGIN_PROPERTIES", str(properties))
    monkeypatch.setattr(sys, "argv", ["prog", "--k_cmd=cmd"])

    config = Config(
        model="SASRec",
        dataset="tiny",
        config_file_list=[config_file],
        config_dict={**keys_up_to("dict"), "data_path": tiny_data_root},
    )
    for layer in LAYERS:
        assert config[f"k_{layer}"] == layer, f"k_{layer} should come from the {layer} layer"
    assert config["hidden_size"] == 64, "RecBole's SASRec.yaml sits above the plugin's overall.yaml"
    assert config["n_layers"] == 5, "the plugin's model yaml sits above RecBole's model yaml"
    assert config["k_dataset"] == "dataset" and "k_dataset" in config.parameters["Dataset"]
    # RecBole's quick-start yaml for sequential models still applies (leave-one-out, time order).
    assert config["eval_args"]["split"] == {"LS": "valid_and_test"} and config["eval_args"]["order"] == "TO"


def test_protocol_defaults_apply_to_recbole_models(tiny_data_root):
    config = Config("GRU4Rec", "tiny", config_dict={"data_path": tiny_data_root})
    assert config["valid_metric"] == "NDCG@10"
    assert config["topk"] == [5, 10, 20]
    assert [m.lower() for m in config["metrics"]] == ["hit", "ndcg", "mrr"]
    assert config["train_neg_sample_args"]["distribution"] == "none", "CE models train without negative sampling"


def test_ml100k_resolves_to_the_copy_inside_recbole(tmp_path):
    config = Config("SASRec", "ml-100k", config_dict={"data_path": str(tmp_path)})
    assert config["data_path"].endswith("dataset_example/ml-100k")


def test_unknown_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"dataset 'no-such-data' not found: .*no-such-data holds no atomic"):
        Config("SASRec", "no-such-data", config_dict={"data_path": str(tmp_path)})
