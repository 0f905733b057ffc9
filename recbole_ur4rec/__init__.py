"""recbole_ur4rec: a RecBole 1.2.1 plugin with UR4Rec, FTRagRec and FedDMMR sequential recommenders."""
from recbole_ur4rec.quick_start import (
    evaluate_checkpoint,
    load_data_and_model,
    objective_function,
    run_recbole_ur4rec,
)
from recbole_ur4rec.registry import get_model, get_trainer

__version__ = "0.1.0"

