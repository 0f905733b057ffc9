"""Model and trainer lookup: plugin first, RecBole second, clear errors."""
import pytest
from recbole.model.sequential_recommender import GRU4Rec, SASRec
from recbole.trainer import Trainer

import recbole_ur4rec.model as plugin_model_module
from recbole_ur4rec.registry import get_model, get_trainer, plugin_models
from recbole_ur4rec.trainer import SafeCheckpointMixin


def test_recbole_models_are_found():
    assert get_model("SASRec") is SASRec
    assert get_model("GRU4Rec") is GRU4Rec


def test_plugin_models_are_found_first(monkeypatch):
    class SASRecVariant(SASRec):
        pass

    SASRecVariant.__module__ = "recbole_ur4rec.model.sasrec_variant"
    SASRecVariant.__name__ = "SASRec"
    monkeypatch.setattr(plugin_model_module, "SASRec", SASRecVariant, raising=False)
    assert "SASRec" in plugin_models()
    assert get_model("SASRec") is SASRecVariant


def test_every_plugin_model_resolves_to_its_class():
    for name in plugin_models():
        assert get_model(name) is getattr(plugin_model_module, name)


def test_unknown_model_lists_plugin_models():
    with pytest.raises(ValueError, match=r"unknown model 'NoSuchRec'.*available: ") as err:
        get_model("NoSuchRec")
    for name in plugin_models():
        assert name in str(err.value)


def test_recbole_trainers_get_safe_checkpoints():
    from recbole.utils import ModelType

    trainer = get_trainer(ModelType.SEQUENTIAL, "SASRec")
    assert issubclass(trainer, SafeCheckpointMixin) and issubclass(trainer, Trainer)
    assert trainer.__mro__[1] is SafeCheckpointMixin, "the mixin's methods must take precedence"
