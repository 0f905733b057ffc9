r"""
DuoRec
################################################
Reference:
    Ruihong Qiu, Zi Huang, Hongzhi Yin and Zijian Wang. "Contrastive Learning for Representation Degeneration
    Problem in Sequential Recommendation." In WSDM 2022.

Reference code:
    https://github.com/RuihongQiu/DuoRec

SASRec (on :class:`~recbole_ur4rec.model.layers.SequenceBackbone`) trained with the next-item loss plus a
contrastive regulariser on sequence representations: the unsupervised positive of a sequence is a second forward
pass of it under another dropout mask, the supervised positive is another training sequence with the same target
item, and the other representations of the batch are the negatives (InfoNCE with temperature ``tau``).
"""
import torch
from torch.nn import functional as F

from recbole_ur4rec.common import distributed
from recbole_ur4rec.common.checks import check_config_value as _check
from recbole_ur4rec.data.sequence_dataset import PREFIX_START, gather_lists
from recbole_ur4rec.model.fastsasrec import FastSASRec
from recbole_ur4rec.model.layers import position_loss, supervised_positions

CONTRASTS = ("us_x", "us", "un", "su", "none")
SIMILARITIES = ("dot", "cos")


def simclr_info_nce(anchor, positive, tau, sim="dot", targets=None, across_ranks=False):
    r"""InfoNCE over ``2N`` views: each of ``anchor`` [N H] and ``positive`` [N H] has its pair as positive and
    the other ``2N - 2`` views of the batch as negatives (the authors' ``info_nce``, as in SimCLR).

    Args:
        tau (float): temperature.
        sim (str): ``dot`` product or ``cos`` ine similarity.
        targets (torch.Tensor, optional): [N] target item of each pair; views whose target equals the anchor's
            are removed from its negatives (they are positives by DuoRec's own definition).
        across_ranks (bool): the negatives are the views of every rank's pairs (the whole batch of a distributed
            run, as in one process); every rank must then call this.
    """
    n = anchor.size(0)
    local = torch.cat([anchor, positive], dim=0)  # [2n H] this rank's views
    start, views, across_ranks = 0, local, across_ranks and distributed.is_distributed()
    if across_ranks:
        every_anchor, start = distributed.gather_rows(anchor)
        views = torch.cat([every_anchor, distributed.gather_rows(positive)[0]], dim=0)  # [2N H]
        targets = distributed.gather_rows(targets)[0] if targets is not None else None
    total = views.size(0) // 2
    if sim == "cos":
        local = F.normalize(local, dim=-1)
        views = F.normalize(views, dim=-1) if across_ranks else local
    logits = local @ views.t() / tau  # [2n 2N]
    own = torch.arange(n, device=local.device) + start
    index = torch.cat([own, own + total])  # [2n] each local view's place among all views
    pair = (index + total) % (2 * total)  # [2n]
    columns = torch.arange(2 * total, device=local.device)
    excluded = index.unsqueeze(1) == columns.unsqueeze(0)  # [2n 2N], each view against itself
    if targets is not None:
        both = torch.cat([targets, targets])  # [2N]
        excluded = excluded | (both[index].unsqueeze(1) == both.unsqueeze(0))
        excluded[torch.arange(2 * n, device=local.device), pair] = False
    logits = logits.masked_fill(excluded, float("-inf"))
    if not across_ranks:
        return F.cross_entropy(logits, pair)
    # the whole batch's mean; the gathered views stay in the graph on a rank without pairs (its backward is collective)
    return distributed.batch_mean(F.cross_entropy(logits, pair, reduction="none")) + views.sum() * 0


def sample_in_batch_partners(targets):
    """For each entry of ``targets`` [N], the index of a uniformly drawn *other* entry with the same value, or its
    own index when the value occurs once. Returns [N] int64."""
    n = targets.size(0)
    noise = torch.rand(n, device=targets.device)
    order = torch.argsort(targets.double() + 0.5 * noise)  # grouped by target, random order inside a group
    _, counts = torch.unique_consecutive(targets[order], return_counts=True)
    starts = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)  # [N] group start, sorted order
    sizes = torch.repeat_interleave(counts, counts)  # [N]
    rank = torch.arange(n, device=targets.device) - starts
    shift = torch.where(sizes > 1, 1 + (torch.rand(n, device=targets.device) * (sizes - 1)).long(), 0)
    shift = torch.minimum(shift, (sizes - 1).clamp(min=0))  # rand() * (g - 1) < g - 1 except by rounding
    partner = torch.empty_like(order)
    partner[order] = order[starts + (rank + shift) % sizes]
    return partner


class DuoRec(FastSASRec):
    r"""DuoRec: SASRec with dropout (unsupervised) and same-target (supervised) contrastive regularisation.

    ``contrast`` follows the authors' code: ``us_x`` (DuoRec as published) contrasts a dropout view of each
    sequence with a same-target sequence, weight ``lmd_sem``; ``un`` contrasts two dropout views, weight ``lmd``;
    ``su`` contrasts the recommendation view with a same-target sequence, weight ``lmd_sem``; ``us`` adds ``un``
    and ``su``; ``none`` trains plain SASRec (FastSASRec's loss).

    NOTE:
        Deviations from the paper and the authors' code:

        - The encoder is the plugin's :class:`~recbole_ur4rec.model.layers.SequenceBackbone` (attribute
          ``backbone``, the same parameter names as FastSASRec), and ``loss_type`` / ``loss_position`` /
          ``neg_sample_num`` work as in FastSASRec.
        - ``loss_position: last`` (RecBole's prefix rows) is the paper's formulation: the supervised positive of a
          row is a row drawn uniformly among the training rows with the same target, from an index built once
          from the training dataset. A row is identified by (user, target), so the row itself (and, for a user
          who consumed the target twice, its own other rows) is never drawn; a target no other row has falls back
          to the row itself under a new dropout mask, as in the authors' code.
        - ``loss_position: all`` (whole-sequence rows) applies the regulariser at every supervised position (at
          most ``contrast_max_anchors`` random ones per batch): the unsupervised positive is the same position
          in a second forward pass of the batch; the supervised positive is another position *of the batch* with
          the same target, read from the other dropout view (so one extra forward pass serves both), falling back
          to the position's own other view when its target occurs once in the batch. The paper draws supervised
          positives from the whole training set; drawing them in the batch keeps the cost at two forward passes.
        - With ``mask_same_target: True`` (default) representations whose target equals the anchor's are removed
          from its negatives: they are positives by DuoRec's definition, and with in-batch positives the same
          representation can be the positive of several anchors. The authors' code keeps them (``False``).
    """

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self.contrast = config["contrast"]
        self.lmd = config["lmd"]
        self.lmd_sem = config["lmd_sem"]
        self.tau = config["tau"]
        self.sim = config["sim"]
        self.mask_same_target = config["mask_same_target"]
        self.contrast_max_anchors = config["contrast_max_anchors"]
        self._check_contrast_config(config)
        if self.loss_position == "last" and self.contrast in ("us_x", "us", "su"):
            self._build_same_target_index(dataset)

    def _check_contrast_config(self, config):
        _check(config, "contrast", None, choices=CONTRASTS)
        _check(config, "sim", None, choices=SIMILARITIES)
        _check(config, "lmd", (int, float), low=0)
        _check(config, "lmd_sem", (int, float), low=0)
        _check(config, "tau", (int, float), low=0, low_open=True)
        _check(config, "mask_same_target", None, choices=(True, False))
        _check(config, "contrast_max_anchors", int, low=2)

    def _build_same_target_index(self, dataset):
        """Training prefix rows sorted by (target, user), for drawing same-target rows (``loss_position: last``).

        ``dataset`` holds the rows of :func:`~recbole_ur4rec.data.sequence_dataset.build_prefix_train_dataset`;
        a drawn row's item list is gathered from the flat training history when it is used."""
        feat = dataset.inter_feat
        target = feat[self.POS_ITEM_ID].long()
        user = feat[dataset.uid_field].long()
        key = target * dataset.user_num + user  # [R], one value per (target, user)
        key, order = torch.sort(key)
        counts = torch.bincount(target, minlength=self.n_items)  # [n_items]
        self.n_users = dataset.user_num
        # non-persistent buffers: they follow the model's device, and stay out of state_dict and checkpoints
        self.register_buffer("sem_key", key, persistent=False)  # [R]
        self.register_buffer("sem_start", torch.cumsum(counts, 0) - counts, persistent=False)  # [n_items]
        self.register_buffer("sem_count", counts, persistent=False)  # [n_items]
        self.register_buffer("sem_prefix_start", feat[PREFIX_START][order], persistent=False)  # [R]
        self.register_buffer("sem_item_seq_len", feat[self.ITEM_SEQ_LEN][order], persistent=False)  # [R]
        self.register_buffer("history_items", dataset.history_items, persistent=False)  # [N] training interactions

    def sample_same_target_rows(self, users, targets):
        """For prefix rows ``(users [B], targets [B])``, indices into the sorted index of a uniformly drawn other
        training row with the same target, or -1 where there is none."""
        key = targets * self.n_users + users  # [B]
        self_lo = torch.searchsorted(self.sem_key, key)
        self_n = torch.searchsorted(self.sem_key, key, right=True) - self_lo
        start, count = self.sem_start[targets], self.sem_count[targets]  # [B]
        n_others = count - self_n
        pick = (torch.rand(key.size(0), device=key.device) * n_others).long().clamp(max=(n_others - 1).clamp(min=0))
        index = start + pick
        index = torch.where(index >= self_lo, index + self_n, index)  # skip the row's own (target, user) block
        return torch.where(n_others > 0, index, torch.full_like(index, -1))

    def calculate_loss(self, interaction):
        item_seq = interaction[self.ITEM_SEQ]  # [B L]
        item_seq_len = interaction[self.ITEM_SEQ_LEN]  # [B]
        hidden = self.forward(item_seq, item_seq_len)  # [B L H]
        rec, targets, _ = supervised_positions(self, interaction, hidden)  # [N H], [N]
        loss = position_loss(rec, targets, self.backbone.output_items(), self.loss_type, self.neg_sample_num)

        use_un = self.contrast in ("un", "us") and self.lmd > 0
        use_su = self.contrast in ("su", "us", "us_x") and self.lmd_sem > 0
        if not (use_un or use_su):
            return loss
        across_ranks = self.training and distributed.is_distributed()  # negatives from the whole batch
        view = self.forward(item_seq, item_seq_len)  # [B L H], another dropout mask
        view, _, _ = supervised_positions(self, interaction, view)  # [N H]
        if self.loss_position == "last":
            anchors = torch.arange(rec.size(0), device=rec.device)
            if use_su:
                semantic = self._same_target_view(interaction)  # [N H]
        else:
            # a distributed run's ranks share the cap: their anchors together are one process's
            cap = max(self.contrast_max_anchors // (distributed.world_size() if across_ranks else 1), 1)
            anchors = torch.randperm(rec.size(0), device=rec.device)[:cap]  # [M]
            rec, view, targets = rec[anchors], view[anchors], targets[anchors]
            if use_su:
                # the partner is read from the view the anchor is not taken from (below), among every rank's anchors
                source = view if self.contrast != "us_x" else rec
                every_source, start = distributed.gather_rows(source) if across_ranks else (source, 0)  # [M' H]
                every_target = distributed.gather_rows(targets)[0] if across_ranks else targets  # [M']
                partner = sample_in_batch_partners(every_target)[start : start + targets.size(0)]  # [M]
                semantic = every_source[partner]  # [M H]
        negative_targets = targets if self.mask_same_target else None
        if use_un:
            loss = loss + self.lmd * simclr_info_nce(rec, view, self.tau, self.sim, negative_targets, across_ranks)
        if use_su:
            anchor = view if self.contrast == "us_x" else rec
            loss = loss + self.lmd_sem * simclr_info_nce(anchor, semantic, self.tau, self.sim, negative_targets, across_ranks)
        return loss

    def same_target_item_seq(self, index, max_len):
        """Item lists [B, max_len] of the rows ``index`` [B] of the same-target index."""
        return gather_lists(self.history_items, self.sem_prefix_start[index], self.sem_item_seq_len[index], max_len)

    def _same_target_view(self, interaction):
        """Last hidden state of a same-target training row for each prefix row (the row itself where none)."""
        item_seq = interaction[self.ITEM_SEQ]
        item_seq_len = interaction[self.ITEM_SEQ_LEN]
        index = self.sample_same_target_rows(interaction[self.USER_ID].long(), interaction[self.POS_ITEM_ID].long())
        found = (index >= 0).unsqueeze(1)  # [B 1]
        safe = index.clamp(min=0)
        sem_seq = torch.where(found, self.same_target_item_seq(safe, item_seq.size(1)), item_seq)  # [B L]
        sem_len = torch.where(found.squeeze(1), self.sem_item_seq_len[safe], item_seq_len)  # [B]
        return self.backbone.gather_last(self.forward(sem_seq, sem_len), sem_len)  # [B H]
