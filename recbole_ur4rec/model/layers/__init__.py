"""Building blocks shared by the plugin's models."""
from recbole_ur4rec.model.layers.sequence_backbone import (
    ITEM_TEXT_MODES,
    LOSS_POSITIONS,
    LOSS_TYPES,
    WARM_START_MATCH,
    SequenceBackbone,
    check_sequence_config,
    position_loss,
    supervised_count,
    supervised_positions,
)
from recbole_ur4rec.model.layers.fusion import (
    FUSION_TYPES,
    RANKING_LOSSES,
    RetrievalFusion,
    SampledCandidates,
    ScoreFusion,
    bidirectional_distillation,
    ranking_loss,
)
from recbole_ur4rec.model.layers.moe import (
    ModalityExperts,
    ProxyAttention,
    Router,
    expert_diversity_loss,
    load_balance_loss,
)
from recbole_ur4rec.model.layers.retriever import MemoryBank, PreferenceRetriever, UserMemory, view_info_nce
