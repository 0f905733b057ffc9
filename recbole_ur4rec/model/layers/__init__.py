"""Building blocks shared by the plugin's models."""
from recbole_ur4rec.model.layers.backbone import LOSS_TYPES, SequenceBackbone, position_loss
