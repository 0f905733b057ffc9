"""The plugin's trainers. ``get_trainer`` finds ``<Model>Trainer`` classes imported here by name."""
from recbole_ur4rec.trainer.feddmmr_trainer import FedDMMRTrainer
from recbole_ur4rec.trainer.ftragrec_trainer import FTRagRecTrainer
from recbole_ur4rec.trainer.safe_checkpoint import SafeCheckpointMixin
from recbole_ur4rec.trainer.ur4rec_trainer import UR4RecTrainer
