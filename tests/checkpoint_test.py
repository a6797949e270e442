"""Cached artefacts are verified when read: a damaged one is reported, discarded and computed
again, never used (l2r.checkpoint, the Task-B histories, the meta-training checkpoints)."""

import glob
import json
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from absl import logging

from l2r import checkpoint, histories
from l2r.meta import loop


def network(seed: int) -> dict:
    k1, k2 = jax.random.split(jax.random.key(seed))
    return {"w": jax.random.normal(k1, (16, 8)), "b": jax.random.normal(k2, (8,))}


def biggest_file(folder) -> str:
    files = [p for p in glob.glob(f"{folder}/**/*", recursive=True)
             if os.path.isfile(p) and "l2r_" not in os.path.basename(p)]  # fmt: skip
    return max(files, key=os.path.getsize)


def truncate(path) -> None:
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def flip(path) -> None:
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0x01
    with open(path, "wb") as f:
        f.write(data)


def garble(path) -> None:
    with open(path, "wb") as f:
        f.write(b"\xff\xfe{not json")


@pytest.fixture
def saved(tmp_path):
    path = str(tmp_path / "ckpt")
    tree = network(0)
    checkpoint.save(path, tree, {"test_accuracy": 0.5})
    return path, tree


def test_an_intact_checkpoint_restores_exactly(saved):
    path, tree = saved
    restored, meta = checkpoint.restore(path)
    chex.assert_trees_all_equal(restored, tree)
    assert meta == {"test_accuracy": 0.5}  # The digests are l2r's, not the caller's.


@pytest.mark.parametrize("damage", [truncate, flip])
def test_a_damaged_array_file_is_found_before_orbax_reads_it(saved, damage):
    path, _ = saved
    damage(biggest_file(path))
    with pytest.raises(checkpoint.DamagedCheckpoint, match="differ from those written"):
        checkpoint.restore(path)


def test_garbled_metadata_is_a_damaged_checkpoint(saved):
    path, _ = saved
    garble(os.path.join(path, checkpoint.META_FILE))
    with pytest.raises(checkpoint.DamagedCheckpoint, match="cannot be read"):
        checkpoint.restore(path)


def test_altered_arrays_fail_their_digest_even_with_matching_files(saved):
    """The array digest is a second check, independent of the file digests."""
    path, _ = saved
    meta_path = os.path.join(path, checkpoint.META_FILE)
    meta = json.load(open(meta_path))
    meta[checkpoint.DIGEST_KEY] = checkpoint.digest(network(1))
    json.dump(meta, open(meta_path, "w"))
    with pytest.raises(checkpoint.DamagedCheckpoint, match="digest mismatch"):
        checkpoint.restore(path)


def test_a_checkpoint_written_without_digests_still_restores(saved):
    path, tree = saved
    meta_path = os.path.join(path, checkpoint.META_FILE)
    json.dump({"test_accuracy": 0.5}, open(meta_path, "w"))
    chex.assert_trees_all_equal(checkpoint.restore(path)[0], tree)


def test_cached_networks_recompute_only_the_damaged_one(tmp_path, caplog):
    trained = []

    def train(ids):
        trained.append(list(ids))
        return [(network(i), {"test_accuracy": i / 10}) for i in ids]

    root = str(tmp_path / "nets")
    first, accs, _ = checkpoint.cached_networks(root, 3, 2, train, "Test")
    assert trained == [[0, 1], [2]]
    truncate(biggest_file(os.path.join(root, "ckpt_1")))
    caplog.set_level(logging.WARNING, logger="absl")
    again, accs_again, _ = checkpoint.cached_networks(root, 3, 2, train, "Test")
    assert trained[-1] == [1]  # Only the damaged network was trained again.
    chex.assert_trees_all_equal(again, first)
    np.testing.assert_array_equal(accs_again, accs)
    warnings = [r.getMessage() for r in caplog.records if "Damaged" in r.getMessage()]
    assert len(warnings) == 1 and "ckpt_1" in warnings[0]


@pytest.mark.parametrize("damage", [truncate, flip, garble])
def test_a_damaged_task_b_cache_is_recomputed(tmp_path, damage, caplog):
    path = str(tmp_path / "task_b" / "sgd-0123.npz")
    history = {"readout_A": np.random.default_rng(0).random((2, 5)), "loss": np.ones((2, 5))}
    histories.save_history(path, history, 3.0, 1.0)
    loaded, train_s, probe_s, _ = histories.load_history(path)
    chex.assert_trees_all_equal(loaded, history)
    assert (train_s, probe_s) == (3.0, 1.0)
    damage(path)
    caplog.set_level(logging.WARNING, logger="absl")
    assert histories.load_history(path) is None
    assert not os.path.exists(path)  # Discarded: the rerun writes it anew.
    assert sum("Damaged Task-B cache" in r.getMessage() for r in caplog.records) == 1


def test_a_damaged_meta_checkpoint_falls_back_to_the_one_before(tmp_path, caplog):
    ckpt_dir = str(tmp_path / "meta")
    states = {step: network(step) for step in (1, 2)}
    options = ocp.CheckpointManagerOptions(max_to_keep=2, create=True)
    with ocp.CheckpointManager(ckpt_dir, options=options) as manager:
        for step, state in states.items():
            manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                history=ocp.args.JsonSave({"loss": [float(step)]}),
                digest=ocp.args.JsonSave({"state": checkpoint.digest(state)}),
            ))  # fmt: skip
            manager.wait_until_finished()
            checkpoint.write_manifest(os.path.join(ckpt_dir, str(step)))
        flip(biggest_file(os.path.join(ckpt_dir, "2")))
        caplog.set_level(logging.WARNING, logger="absl")
        like = jax.tree.map(jnp.zeros_like, states[1])
        state, history, best = loop._restore_latest(manager, like, ckpt_dir)
        chex.assert_trees_all_equal(state, states[1])
        assert best is None  # Saved without meta-validation.
        assert history == {"loss": [1.0]}
        assert manager.all_steps() == [1]
    assert sum("Damaged meta-training checkpoint" in r.getMessage() for r in caplog.records) == 1
