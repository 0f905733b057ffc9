"""recbole_ur4rec: a RecBole 1.2.1 plugin with UR4Rec, FTRagRec and FedDMMR sequential recommenders.

The names below are imported on first use (PEP 562), so that a light submodule (the Flower ClientApp that only
forwards requests to a node worker) does not pay for torch and RecBole.
"""
from recbole_ur4rec.common.lazy import lazy_exports

_EXPORTS = {
    "evaluate_checkpoint": "recbole_ur4rec.quick_start",
    "load_data_and_model": "recbole_ur4rec.quick_start",
    "objective_function": "recbole_ur4rec.quick_start",
    "run_recbole_ur4rec": "recbole_ur4rec.quick_start",
    "get_model": "recbole_ur4rec.registry",
    "get_trainer": "recbole_ur4rec.registry",
}
__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
