"""FTRagRec and its trainer: warm start, leakage-free FAISS memory, refresh, saved index, fusion and alignment losses,
frozen stages, dual evaluation, learning a tiny dataset."""
import glob
import math
import os
import shutil

import numpy as np
import pytest
import torch
from conftest import TINY_MODEL, write_sequential_dataset
from model_fixtures import (
    assert_user_values_are_the_results,
    build_model,
    changed_groups,
    snapshot,
    untrained_test_ndcg10,
)

from recbole_ur4rec.common.checkpoint_io import CheckpointError, load_checkpoint, save_checkpoint
from recbole_ur4rec.data.sequence_dataset import training_histories
from recbole_ur4rec.evaluation.slices import row_metrics
from recbole_ur4rec.index.retrieval_memory import RetrievalMemory
from recbole_ur4rec.model import FTRagRec
from recbole_ur4rec.model.ftragrec import ALIGNMENTS, FUSIONS, alignment_loss
from recbole_ur4rec.model.layers import position_loss, supervised_positions
from recbole_ur4rec.quick_start import run_recbole_ur4rec
from recbole_ur4rec.registry import get_model, get_trainer
from recbole_ur4rec.trainer import FTRagRecTrainer
from recbole_ur4rec.trainer.ftragrec_trainer import refresh_interval
from recbole_ur4rec.trainer.safe_checkpoint import plain_data

SMALL = {
    "train_batch_size": 16,
    "eval_batch_size": 256,
    **TINY_MODEL,
    "threads": 1,
    "hidden_dropout_prob": 0.1,
    "attn_dropout_prob": 0.1,
}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    # histories up to 30 items with MAX_ITEM_LIST_LENGTH 20: some users have two training windows
    return write_sequential_dataset(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def duorec_file(data_root, tmp_path_factory):
    """A trained DuoRec checkpoint (the warm start)."""
    saved = tmp_path_factory.mktemp("duorec")
    result = run_recbole_ur4rec(
        "DuoRec", "tiny", config_dict={**SMALL, "data_path": data_root, "checkpoint_dir": str(saved), "epochs": 2, "learning_rate": 0.01}
    )
    return result["model_file"]


@pytest.fixture
def settings(data_root, tmp_path):
    return {**SMALL, "data_path": data_root, "checkpoint_dir": str(tmp_path / "saved")}


def build(settings, **overrides):
    return build_model("FTRagRec", "tiny", {**settings, **overrides})


def trainer_for(settings, **overrides):
    config, model, train_data, valid_data, test_data = build(settings, **overrides)
    trainer = FTRagRecTrainer(config, model)
    trainer.steps_per_epoch = len(train_data)
    return trainer, model, train_data, valid_data, test_data


def test_registered_with_its_trainer():
    assert get_model("FTRagRec") is FTRagRec
    assert get_trainer(FTRagRec.type, "FTRagRec") is FTRagRecTrainer


# ---- warm start ------------------------------------------------------------------------------------------------
def test_warm_start_loads_duorec_backbone_exactly_and_skips_pretraining(settings, duorec_file):
    duorec = load_checkpoint(duorec_file)["state_dict"]
    config, model, *_ = build(settings, duorec_checkpoint=duorec_file)
    own = model.state_dict()
    backbone = [name for name in duorec if name.startswith("backbone.")]
    assert backbone and all(torch.equal(own[name], duorec[name]) for name in backbone)
    trainer = FTRagRecTrainer(config, model)
    assert [(s.name, s.epochs) for s in trainer.stages][0] == ("pretrain_backbone", 0)


def test_warm_start_refuses_a_mismatched_or_missing_checkpoint(settings, duorec_file, tmp_path):
    state = load_checkpoint(duorec_file)
    weights = dict(state["state_dict"])
    del weights["backbone.layers.0.attention.qkv.bias"]
    weights["backbone.item_embedding.weight"] = torch.zeros(3, 16)
    bad = str(tmp_path / "bad.pth")
    save_checkpoint(dict(state, state_dict=weights), bad)
    with pytest.raises(CheckpointError) as error:
        build(settings, duorec_checkpoint=bad)
    message = str(error.value)
    assert bad in message and "missing backbone.layers.0.attention.qkv.bias" in message
    assert "backbone.item_embedding.weight (3, 16) in the file" in message
    with pytest.raises(CheckpointError, match="does not exist"):
        build(settings, duorec_checkpoint=str(tmp_path / "none.pth"))
    with pytest.raises(CheckpointError, match=r"shape mismatch"):
        build(settings, duorec_checkpoint=duorec_file, hidden_size=8, inner_size=16)


def test_warm_start_from_a_per_seed_folder(settings, duorec_file, tmp_path):
    seed = settings.get("seed", 2020)
    folder = tmp_path / f"DuoRec-seed{seed}"
    folder.mkdir()
    shutil.copy(duorec_file, folder / "DuoRec-best.pth")
    shutil.copy(duorec_file, folder / "DuoRec-best-last.pth")  # the resume file is not a candidate
    _, model, *_ = build(settings, seed=seed, duorec_checkpoint=str(tmp_path / "DuoRec-seed{seed}"))
    assert model.warm_started == str(folder / "DuoRec-best.pth")
    shutil.copy(duorec_file, folder / "DuoRec-other.pth")
    with pytest.raises(CheckpointError, match=r"exactly one best checkpoint .* found 2: DuoRec-best.pth, DuoRec-other.pth"):
        build(settings, seed=seed, duorec_checkpoint=str(folder))


# ---- memory ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("own_history", [False, True])
def test_full_sort_retrieves_no_entry_of_the_ranked_user_unless_asked(settings, duorec_file, own_history):
    """Through the model's evaluation path: the neighbours of a ranked user's sequence are other users' entries
    (``retrieve_own_history: False``), or also the user's own training entries (all in its past) when asked."""
    _, model, _, _, test_data = build(settings, duorec_checkpoint=duorec_file, retrieve_own_history=own_history, index_type="flat")
    model.set_objective("retrieval")
    model.eval()
    model.refresh_memory(force=True)
    seen = []
    search = model.memory.search

    def spy(queries, users, positions, k, threshold=None):
        found = search(queries, users, positions, k, threshold)
        seen.append((users.cpu(), positions.cpu(), found[0].cpu(), found[2].cpu()))
        return found

    model.memory.search = spy
    with torch.no_grad():
        for batch in test_data:
            model.full_sort_predict(batch[0])
    assert seen, "full ranking must go through the memory"
    assert all(mask.any(1).all() for *_, mask in seen), "every ranked sequence gets neighbours"
    if own_history:  # every training entry of the user lies before its evaluation position: all are allowed
        assert all((positions > model.memory.positions.max()).all() for _, positions, _, _ in seen)
    else:  # position 0: every entry of the user is excluded
        assert all((positions == 0).all() for _, positions, _, _ in seen)
        own = torch.cat([(model.memory.users[index].long() == users[:, None]) & mask for users, _, index, mask in seen])
        assert not own.any()
        # the memory does hold the ranked users' entries: they were excluded, not absent
        ranked = torch.unique(torch.cat([users for users, *_ in seen]))
        assert torch.isin(model.memory.users.long(), ranked).any()


def clustered_memory(index_type="flat", **kwargs):
    """Entries whose nearest neighbours are the same user's other entries (the hardest case for exclusion)."""
    rng = np.random.default_rng(0)
    n_users, per_user, dim = 30, 40, 8
    centres = rng.normal(size=(n_users, dim)) * 3
    keys = torch.tensor(np.repeat(centres, per_user, 0) + rng.normal(size=(n_users * per_user, dim)) * 0.1, dtype=torch.float32)
    users = torch.arange(n_users).repeat_interleave(per_user)
    positions = torch.arange(per_user).repeat(n_users)
    memory = RetrievalMemory(index_type=index_type, **kwargs)
    memory.build(keys, torch.randint(1, 50, (len(keys),)), users, positions, "fp")
    return memory, keys, users, positions


@pytest.mark.parametrize("index_type", ["flat", "ivfsq8"])
def test_memory_never_returns_the_query_nor_its_users_target_or_future(index_type):
    memory, keys, users, positions = clustered_memory(index_type)
    assert memory.built_type == index_type
    index, similarity, mask = memory.search(keys, users, positions, k=5)
    got_user, got_pos = memory.users[index], memory.positions[index]
    leaked = mask & (got_user == users[:, None]) & (got_pos >= positions[:, None])
    assert not leaked.any()
    assert mask.all(), "excluded entries never take a neighbour's place"
    # the same user's earlier entries (its past) are allowed, and are the nearest when there are enough of them
    late = positions >= 10
    assert (got_user[late] == users[late, None]).all()
    # position 0 excludes the user entirely
    index, _, mask = memory.search(keys, users, torch.zeros_like(users), k=5)
    assert mask.all() and (memory.users[index] != users[:, None]).all()


def test_flat_and_ivf_agree_when_every_list_is_probed():
    flat, keys, users, positions = clustered_memory("flat")
    ivf, *_ = clustered_memory("ivf", nlist=8, nprobe=8, kmeans_iterations=3)
    assert flat.built_type == "flat" and ivf.built_type == "ivf" and ivf.index.cp.niter == 3
    a = flat.search(keys, users, positions, k=4)
    b = ivf.search(keys, users, positions, k=4)
    assert torch.equal(a[0], b[0]) and torch.allclose(a[1], b[1], atol=1e-5)
    auto, *_ = clustered_memory("auto", ivf_min_size=1000)
    assert auto.built_type == "ivf"
    auto, *_ = clustered_memory("auto", ivf_min_size=1000, compressed_min_size=1200)
    assert auto.built_type == "ivfsq8"


def spread_keys(n, dim=16, seed=0):
    """Keys of a Gaussian mixture whose clusters overlap, so that the order of the neighbours is not a tie."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(30, dim))
    return torch.tensor(centres[rng.integers(0, 30, n)] + rng.normal(size=(n, dim)) * 0.5, dtype=torch.float32) * 4


def test_compressed_memory_agrees_with_exact_search_and_keeps_no_float_keys(tmp_path):
    keys, queries = spread_keys(3000), spread_keys(200, seed=1)
    targets, users, positions = torch.randint(1, 50, (3000,)), torch.arange(3000), torch.zeros(3000, dtype=torch.long)
    exact, compressed = RetrievalMemory("flat"), RetrievalMemory("ivfsq8")
    exact.build(keys, targets, users, positions, "fp")
    # streamed in uneven chunks: the float keys are never gathered
    chunks = [tuple(t[lo : lo + 700] for t in (keys, targets, users, positions)) for lo in range(0, 3000, 700)]
    compressed.build_stream(iter(chunks), 3000, "fp")
    assert compressed.keys is None and compressed.users.dtype == torch.int32 and compressed.index.ntotal == 3000
    query_users, query_positions = torch.full((200,), -1), torch.zeros(200, dtype=torch.long)
    truth = exact.search(queries, query_users, query_positions, k=10)[0]
    found = compressed.search(queries, query_users, query_positions, k=10)[0]
    recall = np.mean([len(set(a.tolist()) & set(b.tolist())) / 10 for a, b in zip(found, truth)])
    assert recall >= 0.9
    # decoded keys: close to the originals, at their scale (the norms are kept)
    decoded = compressed.neighbour_keys(torch.arange(3000).view(100, 30))  # [100 30 H]
    assert decoded.shape == (100, 30, 16)
    error = (decoded.reshape(3000, -1) - keys).norm(dim=1) / keys.norm(dim=1)
    assert error.max() < 0.02
    # saved as tensors and plain data without a float key matrix; restored without re-encoding, searches identically
    state = compressed.state_dict()
    assert "keys" not in state and not any(torch.is_tensor(v) and v.is_floating_point() and v.dim() > 1 for v in state.values())
    save_checkpoint({"memory": state}, str(tmp_path / "memory.pth"))
    restored = RetrievalMemory("flat")  # the saved type comes back whatever index_type says now
    restored.load_state_dict(load_checkpoint(str(tmp_path / "memory.pth"))["memory"], 16)
    assert restored.built_type == "ivfsq8" and restored.keys is None
    expected = compressed.search(queries, query_users, query_positions, k=10)
    assert all(torch.equal(a, b) for a, b in zip(expected, restored.search(queries, query_users, query_positions, k=10)))
    assert torch.equal(restored.neighbour_keys(found), compressed.neighbour_keys(found))


@pytest.mark.parametrize("index_type", ["ivf", "ivfsq8"])
def test_saved_index_bytes_are_checked_before_faiss_reads_them(index_type, tmp_path):
    """A corrupted, truncated, foreign or mismatched index in a checkpoint is a CheckpointError naming what differs;
    FAISS never parses bytes that fail the checks."""
    keys, n = spread_keys(3000), 3000
    targets, users, positions = torch.randint(1, 50, (n,)), torch.arange(n), torch.zeros(n, dtype=torch.long)
    memory = RetrievalMemory(index_type, nlist=8)
    memory.build(keys, targets, users, positions, "fp")
    state = memory.state_dict()
    good = state["index_bytes"]

    def load(index_bytes, dim=16, **changes):
        RetrievalMemory(index_type).load_state_dict({**state, "index_bytes": index_bytes, **changes}, dim)

    load(good)  # the saved index itself loads
    other = RetrievalMemory("ivfsq8" if index_type == "ivf" else "ivf", nlist=8)
    other.build(keys, targets, users, positions, "fp")
    cases = {
        "a 1-d uint8 tensor": good.float(),
        "shorter than an index header": good[:20],
        "header": torch.cat([torch.tensor(list(b"XXXX"), dtype=torch.uint8), good[4:]]),  # foreign bytes
        "got header": other.state_dict()["index_bytes"],  # the other saved type
        "bytes, where": good[: len(good) // 2],  # truncated
    }
    for message, index_bytes in cases.items():
        with pytest.raises(CheckpointError, match=message):
            load(index_bytes)
    with pytest.raises(CheckpointError, match="dimension 32"):  # a memory saved by a model of another hidden size
        load(good, dim=32)
    flipped = good.clone()
    flipped[8] ^= 1  # ntotal
    with pytest.raises(CheckpointError, match="expected a trained inner-product index of 3000 entries"):
        load(flipped)


def crowded_keys(n, dim=32, seed=0, spread=0.2):
    """Keys of a trained encoder's kind: tight clusters whose members differ near SQ8's resolution, which a
    ``spread`` fraction of far-off keys sets (its per-dimension ranges); queries come from the clusters."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(0).normal(size=(4, dim))
    scale = np.where(rng.random(n) < spread, 1.0, 0.2)[:, None]
    return torch.tensor(centres[rng.integers(0, 4, n)] + rng.normal(size=(n, dim)) * scale, dtype=torch.float32)


def test_compressed_memory_reranks_a_shortlist_with_exact_keys_on_disk(tmp_path):
    n = 6000
    keys, queries = crowded_keys(n), crowded_keys(300, seed=1, spread=0.0)
    targets, users, positions = torch.randint(1, 50, (n,)), torch.arange(n), torch.zeros(n, dtype=torch.long)
    chunks = [tuple(t[lo : lo + 1000] for t in (keys, targets, users, positions)) for lo in range(0, n, 1000)]
    exact = RetrievalMemory("flat")
    exact.build(keys, targets, users, positions, "fp")
    plain = RetrievalMemory("ivfsq8", nlist=4, compressed_nprobe=4)  # every list probed: SQ8's codes are the limit
    reranked = RetrievalMemory("ivfsq8", nlist=4, compressed_nprobe=4, rerank=50, exact_keys_dir=str(tmp_path))
    plain.build_stream(iter(chunks), n, "fp")
    reranked.build_stream(iter(chunks), n, "fp")
    query_users, query_positions = torch.full((300,), -1), torch.zeros(300, dtype=torch.long)
    truth, truth_sim, _ = exact.search(queries, query_users, query_positions, k=10)

    def recall(memory):
        found = memory.search(queries, query_users, query_positions, k=10)[0]
        return np.mean([len(set(a.tolist()) & set(b.tolist())) / 10 for a, b in zip(found, truth)])

    assert recall(plain) < 0.85 and recall(reranked) > 0.98 and plain.exact is None
    index, sim, mask = reranked.search(queries, query_users, query_positions, k=10)
    assert mask.all() and torch.allclose(sim, truth_sim, atol=1e-4)  # exact similarities, in order
    assert (sim[:, :-1] >= sim[:, 1:]).all()
    # the keys are on disk (float32), not in memory; the neighbours' keys are read from there
    files = list(tmp_path.glob("ftragrec-keys-*.npy"))
    assert files == [tmp_path / reranked.exact.path.split("/")[-1]] and reranked.keys is None
    assert np.load(files[0], mmap_mode="r").shape == (n, 32) and files[0].stat().st_size < n * 32 * 4 + 200
    read = reranked.neighbour_keys(index)  # [Q k H]: the keys the search's re-ranking read, not read again
    assert torch.allclose(read, keys[index], atol=1e-5)
    reranked.search(queries[:5], query_users[:5], query_positions[:5], k=10)  # another search: read from the file
    assert torch.equal(reranked.neighbour_keys(index), read)
    # a rebuild deletes the file nobody saved; a saved one stays and comes back with the checkpoint
    reranked.build_stream(iter(chunks), n, "fp")
    assert not files[0].exists() and len(list(tmp_path.glob("ftragrec-keys-*.npy"))) == 1
    state = reranked.state_dict()
    save_checkpoint({"memory": state}, str(tmp_path / "memory.pth"))
    reranked.build_stream(iter(chunks), n, "fp")
    assert (tmp_path / state["exact_keys"]).exists() and len(list(tmp_path.glob("ftragrec-keys-*.npy"))) == 2
    restored = RetrievalMemory("flat", rerank=50, exact_keys_dir=str(tmp_path))
    restored.load_state_dict(load_checkpoint(str(tmp_path / "memory.pth"))["memory"], 32)
    expected = reranked.search(queries, query_users, query_positions, k=10)
    assert all(torch.equal(a, b) for a, b in zip(expected, restored.search(queries, query_users, query_positions, k=10)))
    # the current, unsaved file goes with its memory
    current = tmp_path / reranked.exact.path.split("/")[-1]
    del reranked
    assert not current.exists()
    # a missing or different file is named
    (tmp_path / state["exact_keys"]).unlink()
    with pytest.raises(ValueError, match=r"exact keys file .*ftragrec-keys-.*\.npy is missing"):
        RetrievalMemory(rerank=50, exact_keys_dir=str(tmp_path)).load_state_dict(state, 32)
    np.save(tmp_path / state["exact_keys"], np.zeros((n, 16), dtype=np.float32))
    with pytest.raises(ValueError, match=r"holds float32 \(6000, 16\) .* expected float32 \(6000, 32\)"):
        RetrievalMemory(rerank=50, exact_keys_dir=str(tmp_path)).load_state_dict(state, 32)


def test_compressed_memory_refuses_metadata_beyond_int32():
    keys = spread_keys(100)
    users = torch.arange(100)
    users[3] = 2**31
    ones, zeros = torch.ones(100, dtype=torch.long), torch.zeros(100, dtype=torch.long)
    with pytest.raises(ValueError, match=r"stores the entries' users as int32, but one is 2147483648; set config key 'index_type'"):
        RetrievalMemory("ivfsq8").build(keys, ones, users, zeros, "fp")
    with pytest.raises(ValueError, match=r"announced 101 entries but received 100"):
        RetrievalMemory("ivfsq8").build_stream([(keys, ones, torch.arange(100), zeros)], 101, "fp")


def test_similarity_threshold_masks_poor_neighbours():
    memory, keys, users, positions = clustered_memory()
    _, similarity, mask = memory.search(keys, users, torch.zeros_like(users), k=5)  # other users: cosine well below 1
    _, t_similarity, t_mask = memory.search(keys, users, torch.zeros_like(users), k=5, threshold=0.5)
    assert mask.all() and not t_mask.all() and t_mask.any()
    assert torch.equal(t_mask, mask & (similarity >= 0.5))
    assert (t_similarity[~t_mask] == 0).all()


@pytest.mark.parametrize("index_type", ["auto", "ivfsq8"])
def test_model_memory_holds_training_prefixes_only(settings, index_type):
    _, model, train_data, _, _ = build(settings, index_type=index_type)
    model.refresh_memory()
    memory = model.memory
    assert memory.built_type == ("flat" if index_type == "auto" else "ivfsq8")
    user_ids, histories = training_histories(train_data._dataset.training_split)
    assert len(memory) == sum(len(h) - 1 for h in histories)
    for user, history in zip(user_ids[:10], histories[:10]):
        own = memory.users == user
        order = torch.argsort(memory.positions[own])
        assert torch.equal(memory.positions[own][order], torch.arange(len(history) - 1))
        assert torch.equal(memory.targets[own][order].long(), torch.as_tensor(history[1:])), "entry p -> next item h[p + 1]"
    # training and evaluation queries never retrieve their own user (see FTRagRec's NOTE)
    batch = next(iter(train_data))
    states = model.backbone.gather_last(model(batch["item_id_list"], batch["item_length"]), batch["item_length"])
    index, _, mask = memory.search(states, batch["user_id"], torch.zeros_like(batch["user_id"]), k=5)
    assert mask.all() and (memory.users[index] != batch["user_id"][:, None]).all()


def test_refresh_schedule(settings):
    assert [refresh_interval({0: 1, 3: 2}, e) for e in range(6)] == [1, 1, 1, 2, 2, 2]
    trainer, model, train_data, _, _ = trainer_for(
        settings,
        stages=["retriever", "finetune"],
        stage_epochs={"retriever": 2, "finetune": 5},
        progressive_unfreezing=False,
        refresh_every={0: 1, 3: 2},
    )
    rebuilt = {}
    original = model.refresh_memory

    def refresh_memory(force=False):
        rebuilt[trainer.retrieval_epoch] = original(force)
        return rebuilt[trainer.retrieval_epoch]

    model.refresh_memory = refresh_memory
    trainer.fit(train_data, saved=False)
    # every epoch until epoch 3, then every 2; re-encoded only when the backbone changed (frozen in 'retriever')
    assert trainer.refresh_log == [0, 1, 2, 4, 6]
    assert rebuilt == {0: True, 1: False, 2: False, 4: True, 6: True}
    with pytest.raises(ValueError, match=r"config key 'refresh_every' must be an int >= 1"):
        trainer_for(settings, refresh_every={2: 1})


def test_memory_is_saved_restored_and_rebuilt_on_mismatch(settings, tmp_path):
    for index_type in ("flat", "ivf", "ivfsq8"):
        _, model, _, valid_data, _ = build(settings, index_type=index_type, nlist=4, nprobe=2)
        model.refresh_memory()
        path = str(tmp_path / f"{index_type}.pth")
        save_checkpoint({"state_dict": model.state_dict(), "other": plain_data(model.other_parameter())}, path)
        state = load_checkpoint(path)  # weights_only=True: the memory is tensors and plain data
        _, restored, _, _, _ = build(settings, index_type=index_type, nlist=4, nprobe=2, seed=8)
        restored.load_state_dict(state["state_dict"])
        restored.load_other_parameter(state["other"])
        assert restored.memory_restored and restored.memory.built_type == index_type
        saved, back = model.memory.state_dict(), restored.memory.state_dict()  # ivfsq8: the same codes, no float keys
        assert saved.keys() == back.keys() and ("keys" in saved) == (index_type != "ivfsq8")
        for name, value in saved.items():
            assert torch.equal(value, back[name]) if torch.is_tensor(value) else value == back[name], name
        model.eval(), restored.eval()
        interaction = next(iter(valid_data))[0]
        assert torch.allclose(model.full_sort_predict(interaction), restored.full_sort_predict(interaction), atol=1e-5)

    # ivfsq8 re-ranks by default, with its exact keys in a file beside the checkpoints; when that file is gone the
    # saved memory is encoded again from the loaded weights
    assert restored.memory.exact is not None and restored.memory.exact.path.startswith(settings["checkpoint_dir"])
    for path in glob.glob(os.path.join(settings["checkpoint_dir"], "ftragrec-keys-*.npy")):
        os.remove(path)
    _, again, _, _, _ = build(settings, index_type="ivfsq8", nlist=4, nprobe=2, seed=8)
    again.load_state_dict(state["state_dict"])
    again.load_other_parameter(state["other"])
    assert not again.memory_restored and not again.memory.built
    again.eval()
    assert torch.allclose(model.full_sort_predict(interaction), again.full_sort_predict(interaction), atol=1e-5)

    # other weights: the saved memory is not trusted, and is rebuilt from the current backbone before its next use
    _, other, _, _, _ = build(settings, seed=9)
    other.load_other_parameter(state["other"])
    assert not other.memory_restored and not other.memory.built
    other.full_sort_predict(interaction)
    assert other.memory.fingerprint == other.backbone_fingerprint() != model.memory.fingerprint
    # loading new weights after a build makes the model re-check (and rebuild) its memory
    other.load_state_dict(model.state_dict())
    other.full_sort_predict(interaction)
    assert other.memory.fingerprint == model.memory.fingerprint


# ---- losses ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides",
    [{"fusion": f} for f in FUSIONS]
    + [{"alignment": a} for a in ALIGNMENTS]
    + [{"retriever_encoder": "mlp", "similarity_threshold": 0.9, "alignment_quality_threshold": 0.5}],
)
def test_losses_are_finite_and_reach_the_retriever(settings, overrides):
    _, model, train_data, _, _ = build(settings, **overrides)
    terms = model.loss_terms(next(iter(train_data)))
    assert all(torch.isfinite(v) for v in terms.values())
    assert set(terms) == {"rec", "enhanced"} | ({"alignment"} if model.alignment != "none" else set())
    # diagnostics are logged apart from the losses, never trained on
    assert set(model.loss_diagnostics) == {"quality", "fusion_weight"}
    assert all(isinstance(v, float) for v in model.loss_diagnostics.values())
    assert 0 <= model.loss_diagnostics["fusion_weight"] <= 1
    sum(model.loss_weights[name] * value for name, value in terms.items()).backward()
    grads = [p.grad for p in model.parameter_groups()["retriever"] if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads) and sum(g.abs().sum() for g in grads) > 0


def test_alignment_variants_match_a_hand_computation():
    retrieval, recommendation = torch.tensor([[1.0, 0.0, -1.0]]), torch.tensor([[0.0, 2.0, 0.0]])
    p = torch.softmax(retrieval, -1)[0].tolist()
    q = torch.softmax(recommendation, -1)[0].tolist()
    m = [(a + b) / 2 for a, b in zip(p, q)]

    def kl(a, b):
        return sum(x * math.log(x / y) for x, y in zip(a, b))

    expected = {"kl": kl(p, q), "reverse_kl": kl(q, p), "js": 0.5 * kl(p, m) + 0.5 * kl(q, m)}
    for kind, value in expected.items():
        assert alignment_loss(retrieval, recommendation, kind).item() == pytest.approx(value, rel=1e-5)
    two = torch.cat([retrieval, retrieval])
    assert alignment_loss(two, torch.cat([recommendation, two[:1]]), "kl", torch.tensor([1.0, 0.0])).item() == pytest.approx(
        expected["kl"], rel=1e-5
    ), "rows below the quality threshold do not count"


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("fusion", "sum", r"config key 'fusion' must be one of fixed, dynamic, gate, got 'sum'"),
        ("alignment", "l2", r"config key 'alignment' must be one of kl, reverse_kl, js, none, got 'l2'"),
        ("retrieval_topk", 0, r"config key 'retrieval_topk' must be an int >= 1, got 0"),
        ("ivf_kmeans_iterations", 0, r"config key 'ivf_kmeans_iterations' must be an int >= 1, got 0"),
        ("index_type", "hnsw", r"config key 'index_type' must be one of auto, flat, ivf, ivfsq8, got 'hnsw'"),
        ("compressed_min_size", 0, r"config key 'compressed_min_size' must be an int >= 1, got 0"),
        ("compressed_nprobe", 1.5, r"config key 'compressed_nprobe' must be an int >= 1, got 1.5"),
        ("retriever_temperature", 0, r"config key 'retriever_temperature' must be a number > 0, got 0"),
        ("alpha", 1.5, r"config key 'alpha' must be a number >= 0 and <= 1, got 1.5"),
    ],
)
def test_bad_config_values_are_named(settings, key, value, message):
    with pytest.raises(ValueError, match=message):
        build(settings, **{key: value})


# ---- trainer ---------------------------------------------------------------------------------------------------
def test_frozen_parts_stay_frozen_until_their_unfreeze_step(settings):
    trainer, model, train_data, _, _ = trainer_for(
        settings, stages=["retriever", "finetune"], unfreeze_every=1, stage_lr_scale={"finetune": {"backbone": 0.5}}
    )
    trainer._enter_stage(0)
    before = snapshot(model)
    trainer._train_epoch(train_data, 0)
    assert changed_groups(model, before) == {"retriever"}, "retriever stage: the warm-started backbone stays frozen"
    trainer._enter_stage(1)
    lrs = {group["group"]: group["lr"] for group in trainer.optimizer.param_groups}
    assert lrs["backbone"] == pytest.approx(0.5 * lrs["retriever"]) and lrs["item_embedding"] == lrs["retriever"]
    seen = []
    for epoch in range(3):
        before = snapshot(model)
        trainer._train_epoch(train_data, epoch)
        seen.append(changed_groups(model, before))
    assert seen == [{"retriever"}, {"retriever", "backbone"}, {"retriever", "backbone", "item_embedding"}]


def test_dual_evaluation_reports_with_and_without_retrieval(settings):
    trainer, model, train_data, valid_data, test_data = trainer_for(
        settings, stages=["retriever"], stage_epochs={"retriever": 1}, alpha=0.5
    )
    trainer.fit(train_data, valid_data, saved=False)
    (entry,) = trainer.valid_history
    assert entry["with_retrieval"]["ndcg@10"] == trainer.run_best_score
    assert entry["without_retrieval"] is not None and set(entry["without_retrieval"]) == set(entry["with_retrieval"])
    with_retrieval = trainer.evaluate(test_data, load_best_model=False)
    without = trainer.result_without_retrieval
    # the per-user rows kept are those of the result returned, not of the second pass without retrieval
    per_user = {key: round(float(values.mean()), 4) for key, values in row_metrics(trainer.evaluator, trainer.last_evaluated_rows.struct).items()}
    assert per_user == {key: with_retrieval[key] for key in per_user}
    assert any(with_retrieval[key] != without[key] for key in per_user)
    model.set_objective("backbone")
    assert trainer.evaluate(test_data, load_best_model=False) == without and trainer.result_without_retrieval is None
    assert with_retrieval != without, "retrieval changes the scores"


def test_resume_keeps_the_refresh_schedule(settings):
    trainer, model, train_data, valid_data, _ = trainer_for(
        settings, stages=["retriever", "finetune"], stage_epochs={"retriever": 1, "finetune": 2}, refresh_every=2
    )
    trainer.fit(train_data, valid_data)
    resumed, *_ = trainer_for(settings, stages=["retriever", "finetune"], stage_epochs={"retriever": 1, "finetune": 2}, refresh_every=2)
    resumed.saved_model_file = trainer.saved_model_file
    resumed.resume_checkpoint(trainer.last_checkpoint_file)
    assert (resumed.retrieval_epoch, resumed.last_refresh, resumed.stage_index) == (3, 2, 1)
    # the memory in use when the checkpoint was written comes back with it, even if it lags behind the weights
    assert resumed.model.memory_restored
    assert torch.equal(resumed.model.memory.keys, model.memory.keys)


def test_full_sort_predict_shape(settings):
    _, model, _, valid_data, _ = build(settings)
    model.eval()
    interaction = next(iter(valid_data))[0]
    for use_retrieval in (True, False):
        model.use_retrieval = use_retrieval
        scores = model.full_sort_predict(interaction)
        assert scores.shape == (len(interaction), model.n_items) and torch.isfinite(scores).all()


def test_trains_and_evaluates_with_a_compressed_memory(settings, duorec_file):
    result = run_recbole_ur4rec(
        "FTRagRec",
        "tiny",
        config_dict={
            **settings,
            "duorec_checkpoint": duorec_file,
            "index_type": "ivfsq8",
            "stages": ["retriever", "finetune"],
            "stage_epochs": {"retriever": 1, "finetune": 1},
        },
        keep_user_values=True,
    )
    assert_user_values_are_the_results(result)  # with retrieval, from the memory the best-model file holds
    untrained = untrained_test_ndcg10("FTRagRec", "tiny", {**settings, "index_type": "ivfsq8"})  # no warm start
    assert result["test_result"]["ndcg@10"] > 4 * untrained
    memory = load_checkpoint(result["model_file"])["other_parameter"]["memory"]
    assert memory["index_type"] == "ivfsq8" and "keys" not in memory and memory["targets"].dtype == torch.int32


def test_learns_the_sequential_pattern(settings, duorec_file):
    result = run_recbole_ur4rec(
        "FTRagRec",
        "tiny",
        config_dict={
            **settings,
            "duorec_checkpoint": duorec_file,
            "stage_epochs": {"pretrain_backbone": 5, "retriever": 4, "finetune": 4},
            "stage_learning_rate": {"pretrain_backbone": 0.01, "retriever": 0.01, "finetune": 0.005},
            "unfreeze_every": 1,
        },
    )
    untrained = untrained_test_ndcg10("FTRagRec", "tiny", settings)  # no warm start, no training
    assert result["test_result"]["ndcg@10"] > 0.5 and result["test_result"]["ndcg@10"] > 4 * untrained


# ---- schedules ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fusion", FUSIONS)
def test_alpha_grows_and_the_enhanced_weight_ramps_over_the_retrieval_stages(settings, fusion):
    """alpha moves linearly from alpha to alpha_end, and the enhanced loss's weight from enhanced_rec_weight_start to
    enhanced_rec_weight, over the retrieval stages' scheduled steps; both follow the checkpoint."""
    trainer, model, train_data, valid_data, _ = trainer_for(
        settings, stages=["retriever", "finetune"], stage_epochs={"retriever": 2, "finetune": 2}, fusion=fusion,
        alpha=0.1, alpha_end=0.3, enhanced_rec_weight=0.5, enhanced_rec_weight_start=0.1,
    )
    seen = []
    original = model.loss_terms

    def loss_terms(interaction):
        seen.append((model.schedule_progress, model.fusion.alpha, trainer.loss_weights()["enhanced"]))
        return original(interaction)

    model.loss_terms = loss_terms
    trainer.fit(train_data, valid_data, saved=True)
    steps = 4 * len(train_data)
    progress, alphas, weights = map(list, zip(*seen))
    assert progress == [step / steps for step in range(steps)]
    assert alphas == pytest.approx([0.1 + 0.2 * p for p in progress]) and weights == pytest.approx([0.1 + 0.4 * p for p in progress])
    interaction = next(iter(train_data))
    if fusion == "gate":  # the gate's weights shift with alpha's logit: at the end alpha = 0.3 for a gate still at its start
        model.set_schedule_progress(0.0)
        start = model.retrieve(*_query(model, interaction))["weight"]
        model.set_schedule_progress(1.0)
        end = model.retrieve(*_query(model, interaction))["weight"]
        shift = math.log(0.3 / 0.7) - math.log(0.1 / 0.9)
        assert torch.allclose(torch.logit(end), torch.logit(start) + shift, atol=1e-4)
    elif fusion == "fixed":
        model.set_schedule_progress(1.0)
        assert torch.allclose(model.retrieve(*_query(model, interaction))["weight"][model.retrieve(*_query(model, interaction))["has"]], torch.tensor(0.3))
    # the best checkpoint keeps the schedule's point: a reloaded model predicts with the alpha of its epoch
    state = load_checkpoint(trainer.saved_model_file)
    _, reloaded, _, _, _ = build(settings, fusion=fusion, alpha=0.1, alpha_end=0.3)
    reloaded.load_other_parameter(state["other_parameter"])
    assert reloaded.schedule_progress == state["other_parameter"]["schedule_progress"] > 0
    assert reloaded.fusion.alpha == pytest.approx(0.1 + 0.2 * reloaded.schedule_progress)


def _query(model, interaction):
    hidden = model.forward(interaction[model.ITEM_SEQ], interaction[model.ITEM_SEQ_LEN])
    states, _, users = supervised_positions(model, interaction, hidden)
    return states[:32].detach(), users[:32], torch.zeros_like(users[:32])


def test_the_enhanced_loss_counts_only_queries_with_good_enough_neighbours(settings):
    _, model, train_data, _, _ = build(settings, enhanced_quality_threshold=0.0, retrieval_max_positions=10_000)
    interaction = next(iter(train_data))
    torch.manual_seed(0)
    out = model.retrieve(*_query(model, interaction))
    assert out["has"].any()
    # a threshold above every query's quality leaves no query: the enhanced term is 0 and reaches nothing
    model.enhanced_quality_threshold = float(out["quality"].max()) + 1.0
    terms = model.loss_terms(interaction)
    assert terms["enhanced"] == 0 and not terms["enhanced"].requires_grad
    # at the median quality: the term is the enhanced loss of the queries at or above it only (no dropout)
    model.eval()
    hidden = model.forward(interaction[model.ITEM_SEQ], interaction[model.ITEM_SEQ_LEN])
    states, targets, users = supervised_positions(model, interaction, hidden)
    everything = model.retrieve(states, users, torch.zeros_like(users))
    threshold = float(everything["quality"].median())
    keep = everything["has"] & (everything["quality"] >= threshold)
    expected = position_loss(everything["enhanced"][keep], targets[keep], model.backbone.item_embedding.weight, model.loss_type, model.neg_sample_num)
    model.enhanced_quality_threshold = threshold  # retrieval_max_positions covers every position
    assert torch.allclose(model.loss_terms(interaction)["enhanced"], expected, atol=1e-5)
    assert 0 < keep.sum() < len(keep)


@pytest.mark.parametrize("knowledge_targets", ["direct", "encoded", "learned"])
def test_knowledge_targets_decide_the_direct_path_of_the_neighbours_next_items(settings, knowledge_targets):
    """'direct' adds the neighbours' target embeddings to the knowledge, 'encoded' lets them in through the encoder only
    (so the knowledge comes from the similar sequences), 'learned' adds them with a learned weight."""
    _, model, train_data, _, _ = build(settings, knowledge_targets=knowledge_targets, retriever_dropout=0.0,
                                       hidden_dropout_prob=0.0, attn_dropout_prob=0.0)
    model.eval()
    fusion = model.fusion
    q, k = 5, 4
    states, keys = torch.randn(q, 16), torch.randn(q, k, 16)
    targets, similarity, mask = torch.randn(q, k, 16), torch.rand(q, k), torch.ones(q, k, dtype=torch.bool)
    base = fusion(states, keys, targets, similarity, mask, 0.1)["knowledge"]
    # the direct path is linear in the target embeddings' contribution: what it adds is known exactly
    x = fusion.encode(fusion.neighbour_proj(torch.cat([keys, targets], dim=-1)), mask)
    attention = torch.softmax(torch.nn.functional.cosine_similarity(fusion.query_proj(states).unsqueeze(1), x, dim=-1) / 0.1, -1)
    encoded_only = (attention.unsqueeze(-1) * fusion.value_proj(x)).sum(1)
    direct = (attention.unsqueeze(-1) * targets).sum(1)
    weight = {"direct": 1.0, "encoded": 0.0, "learned": 0.5}[knowledge_targets]
    assert torch.allclose(base, encoded_only + weight * direct, atol=1e-5)
    assert hasattr(fusion, "target_logit") == (knowledge_targets == "learned")
