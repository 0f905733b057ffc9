"""Config for recbole_ur4rec: RecBole's Config with plugin model lookup and plugin yaml layers.

Layering keeps RecBole's order, lowest first: RecBole overall < plugin overall < model yaml
(RecBole's, then the plugin's) < RecBole sample.yaml < dataset yaml (RecBole's, then the plugin's)
< RecBole's quick-start yaml for the model type < config files < config_dict < command line.
"""
import os

import torch
from recbole.config import Config as RecBoleConfig
from recbole.utils import ModelType

from recbole_ur4rec.common import distributed
from recbole_ur4rec.common.checks import check_config_value
from recbole_ur4rec.common.paths import PLUGIN_PROPERTIES, RECBOLE_EXAMPLE_DATA, RECBOLE_PROPERTIES
from recbole_ur4rec.registry import get_model, plugin_models


class Config(RecBoleConfig):
    def _get_model_and_dataset(self, model, dataset):
        if model is None:
            model = self.external_config_dict.get("model")
            if model is None:
                raise KeyError("model must be given: as an argument, in a config file, in config_dict or as --model")
        if isinstance(model, str):
            model_class = get_model(model)
        else:
            model_class, model = model, model.__name__
        if dataset is None:
            dataset = self.external_config_dict.get("dataset")
            if dataset is None:
                raise KeyError("dataset must be given: as an argument, in a config file, in config_dict or as --dataset")
        return model, model_class, dataset

    def _update_internal_config_dict(self, file):
        self._loaded_internal_files.append(os.path.realpath(file))
        return super()._update_internal_config_dict(file)

    def _load_internal_config_dict(self, model, model_class, dataset):
        # Let RecBole pick its files (the quick-start yaml depends on the model type), then reload
        # everything with the plugin's yaml files right after their RecBole counterparts.
        self._loaded_internal_files = []
        super()._load_internal_config_dict(model, model_class, dataset)
        model_type = self.internal_config_dict["MODEL_TYPE"]
        base_files = [
            os.path.join(RECBOLE_PROPERTIES, "overall.yaml"),
            os.path.join(PLUGIN_PROPERTIES, "overall.yaml"),
            os.path.join(RECBOLE_PROPERTIES, "model", model + ".yaml"),
            os.path.join(PLUGIN_PROPERTIES, "model", model + ".yaml"),
            os.path.join(RECBOLE_PROPERTIES, "dataset", "sample.yaml"),
            os.path.join(RECBOLE_PROPERTIES, "dataset", dataset + ".yaml"),
            os.path.join(PLUGIN_PROPERTIES, "dataset", dataset + ".yaml"),
        ]
        base_files = [os.path.realpath(file) for file in base_files]
        quick_start_files = [file for file in self._loaded_internal_files if file not in base_files]
        dataset_files = set(base_files[-2:])

        self.internal_config_dict = dict()
        self.internal_files = []
        for file in base_files + quick_start_files:
            if not os.path.isfile(file):
                continue
            self.internal_files.append(file)
            config_dict = super()._update_internal_config_dict(file)
            if config_dict and file in dataset_files:
                self.parameters["Dataset"] += [key for key in config_dict if key not in self.parameters["Dataset"]]
        self.internal_config_dict["MODEL_TYPE"] = model_type

    def _init_device(self):
        """RecBole's device choice; a rank of a distributed run (``local_rank`` set by the launcher) joins its process
        group with gloo on CPU or NCCL on GPU (RecBole's hard-codes NCCL and one GPU per process)."""
        config = self.final_config_dict
        if "local_rank" not in config:
            return super()._init_device()
        if config["MODEL_TYPE"] == ModelType.KNOWLEDGE:
            raise ValueError(
                f"{config['model']} is a knowledge-based model, whose two-part loaders RecBole shards differently; "
                f"distributed runs support general, sequential and context models: run it in one process"
            )
        gpu_id = ",".join(map(str, config["gpu_id"])) if isinstance(config["gpu_id"], (list, tuple)) else str(config["gpu_id"])
        config["gpu_id"] = gpu_id
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu_id
        local_rank = config["local_rank"]
        if config["use_gpu"] and gpu_id and torch.cuda.is_available():
            if local_rank >= torch.cuda.device_count():
                raise ValueError(
                    f"local rank {local_rank} has no GPU: gpu_id {gpu_id!r} makes {torch.cuda.device_count()} visible for "
                    f"--nproc {config['nproc']} (one GPU per process; name them with gpu_id, e.g. --gpu_id=0,1)"
                )
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        else:
            device = torch.device("cpu")
        timeout = check_config_value(self, "dist_timeout", int, low=1)
        rank = local_rank + config["offset"]
        distributed.init_process_group(rank, config["world_size"], config["ip"], config["port"], device, timeout)
        config["device"], config["single_spec"] = device, False
        if rank != 0:  # RecBole's: one rank logs and shows progress
            config["state"], config["show_progress"], config["verbose"] = "error", False, False

    def _set_default_parameters(self):
        data_root = self.final_config_dict["data_path"]
        # RecBole's sequential models default to CE while overall.yaml asks for negative sampling, so
        # `-m SASRec` fails out of the box; drop the sampling unless the user asked for it.
        if (
            self.final_config_dict["MODEL_TYPE"] == ModelType.SEQUENTIAL
            and self.final_config_dict.get("loss_type") == "CE"
            and "train_neg_sample_args" not in self.external_config_dict
        ):
            self.final_config_dict["train_neg_sample_args"] = None
        super()._set_default_parameters()
        items = self.final_config_dict.get("item_info_dir")
        if not items and self.final_config_dict.get("federation_dir"):
            items = os.path.join(self.final_config_dict["federation_dir"], "items")
        if items:  # a federated server or node: item side information here, the interactions in a partition
            items = os.path.join(os.path.abspath(items), self.dataset)
            self.final_config_dict["data_path"] = self.final_config_dict["feature_cache_dir"] = items
        else:
            self.final_config_dict["data_path"] = resolve_data_path(os.path.join(data_root, self.dataset), self.dataset)
        self._load_split_fields()

    def _load_split_fields(self):
        """Load the time field a time-ordered split needs (RecBole's default load_col has only the two ids), and
        ratings for the plugin's models (user text reads them); a load_col the user set is left as it is."""
        config = self.final_config_dict
        load_col = config.get("load_col")
        if "load_col" in self.external_config_dict or not isinstance(load_col, dict) or "inter" not in load_col:
            return
        wanted = [config["TIME_FIELD"]] if config["eval_args"]["order"] == "TO" else []
        if self.model in plugin_models():
            wanted.append(config["RATING_FIELD"])
        missing = [field for field in wanted if field and field not in load_col["inter"]]
        if missing:
            config["load_col"] = {**load_col, "inter": list(load_col["inter"]) + missing}


def resolve_data_path(data_path, dataset):
    """Absolute folder of ``dataset``'s atomic files.

    ``data_path`` is RecBole's ``<data_path>/<dataset>``; when it holds no ``.inter`` file and RecBole's
    wheel ships the dataset (ml-100k), the shipped copy is used, so the quick start runs offline.
    """
    candidates = [os.path.abspath(data_path)]
    candidates.append(os.path.join(RECBOLE_EXAMPLE_DATA, dataset))
    for folder in candidates:
        if os.path.isdir(folder) and any(name.endswith(".inter") for name in os.listdir(folder)):
            return folder
    raise FileNotFoundError(
        f"dataset {dataset!r} not found: {candidates[0]} holds no atomic interaction file "
        f"(expected {dataset}.inter, or {dataset}.train.inter etc. with benchmark_filename); "
        f"put RecBole atomic files there or set data_path to their parent folder "
        f"(recbole_ur4rec never downloads datasets)"
    )
