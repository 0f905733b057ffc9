"""What the plugin's staged models share with their trainers: objectives, the loss contract and feature checks.

The loss contract (every model a :class:`~recbole_ur4rec.trainer.staged_trainer.StagedTrainer` trains):
``loss_terms(interaction)`` returns the *unweighted* loss terms of the current objective ({name: scalar tensor});
``loss_weights`` maps every term name to its weight; the trainer weighs them (UR4Rec's trainer also ramps them in),
and RecBole's ``calculate_loss`` is their weighted sum. Numbers that are not losses (retrieval quality, a fusion
weight) go to ``loss_diagnostics`` ({name: float}, of the last batch), which the trainer logs apart from the losses.
"""


def weighted_loss(terms, weights):
    """The total to minimise: the loss terms ``{name: scalar tensor}`` weighed by ``weights`` ``{name: float}``.
    A term of weight 0 stays out of the graph (it is logged, not trained on, and costs no backward pass)."""
    trained = [weights[name] * value for name, value in terms.items() if weights[name] != 0]
    return sum(trained) if trained else sum(0 * value for value in terms.values())


class StagedModelMixin:
    """``OBJECTIVES``, ``set_objective`` (the trainer calls it as each stage begins) and the loss contract."""

    OBJECTIVES = ()

    def set_objective(self, objective):
        """What to train and predict with: one of ``OBJECTIVES``."""
        if objective not in self.OBJECTIVES:
            raise ValueError(f"objective must be one of {', '.join(self.OBJECTIVES)}, got {objective!r}")
        self.objective = objective

    def loss_terms(self, interaction):
        """Unweighted loss terms of the current objective: {name: scalar tensor} (names in ``loss_weights``)."""
        raise NotImplementedError

    @property
    def loss_diagnostics(self):
        """{name: float} of the last batch's ``loss_terms``: logged, never trained on."""
        return getattr(self, "_loss_diagnostics", {})

    def current_loss_weights(self):
        """``loss_weights`` at this step (a model whose weights follow a schedule overrides it)."""
        return self.loss_weights

    def calculate_loss(self, interaction):
        return weighted_loss(self.loss_terms(interaction), self.current_loss_weights())


class FeatureFingerprintMixin:
    """Models whose buffers are rebuilt from feature caches: a checkpoint records ``feature_fingerprint`` and
    refuses to load into a model built on other features. ``FEATURE_HINT`` says which settings to check."""

    FEATURE_HINT = "the feature settings"

    def check_feature_fingerprint(self, para):
        """Refuse the saved ``para`` of a checkpoint whose ``feature_fingerprint`` is not this model's."""
        if para is not None and para.get("feature_fingerprint") not in (None, self.feature_fingerprint):
            raise ValueError(
                f"this {type(self).__name__} checkpoint was trained on other features (fingerprint "
                f"{para['feature_fingerprint']}) than the ones built now ({self.feature_fingerprint}): check {self.FEATURE_HINT}"
            )

    def load_other_parameter(self, para):
        self.check_feature_fingerprint(para)
        super().load_other_parameter(para)
