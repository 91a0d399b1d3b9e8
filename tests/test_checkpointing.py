"""Tests of duo_jax.checkpointing: round trips, retention, crashes, corruption."""

from __future__ import annotations

import gc
import json
import logging
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.training import train_state

from duo_jax import checkpointing
from duo_jax.checkpointing import PhaseCheckpoints
from duo_jax.errors import UserError

_REPO = pathlib.Path(__file__).resolve().parents[1]

# When one array of a restore fails to read, orbax leaves the reads of the
# others pending in an event loop it has closed; Python reports each one
# ("Exception ignored in: <coroutine ...>") when it is garbage collected, which
# may be during a later test. Tests that corrupt files collect them before
# they end; the reports are orbax's noise, not failures.
pytestmark = pytest.mark.filterwarnings(
    "ignore::pytest.PytestUnraisableExceptionWarning"
)


# ---------------------------------------------------------------------------
# A small but realistic train state
# ---------------------------------------------------------------------------


class _State(train_state.TrainState):
    batch_stats: dict
    rng: jax.Array


def _make_state(seed: int) -> _State:
    """A TrainState after one SGD-momentum step (non-zero trace), with BN stats."""
    rng = np.random.default_rng(seed)
    params = {
        "conv": {"kernel": jnp.asarray(rng.normal(size=(3, 3, 2, 4)), jnp.float32)},
        "dense": {
            "kernel": jnp.asarray(rng.normal(size=(64, 10)), jnp.float32),
            "bias": jnp.asarray(rng.normal(size=(10,)), jnp.bfloat16),
        },
    }
    state = _State.create(
        apply_fn=lambda *a: None,
        params=params,
        tx=optax.sgd(0.1, momentum=0.9),
        batch_stats={
            "bn": {
                "mean": jnp.asarray(rng.normal(size=(4,)), jnp.float32),
                "var": jnp.asarray(rng.uniform(size=(4,)), jnp.float32),
            }
        },
        rng=jax.random.PRNGKey(seed),
    )
    grads = jax.tree.map(lambda p: jnp.ones_like(p) * 0.5, params)
    state = state.apply_gradients(grads=grads)
    return state.replace(step=jnp.asarray(state.step, jnp.int32))  # as after jit


def _assert_same(got, want) -> None:
    """Every leaf equal bit for bit, with the same dtype and tree structure."""
    got_paths, got_leaves = zip(*jax.tree.leaves_with_path(got))
    want_paths, want_leaves = zip(*jax.tree.leaves_with_path(want))
    assert type(got) is type(want) and got_paths == want_paths
    for g, w in zip(got_leaves, want_leaves):
        g, w = np.asarray(g), np.asarray(w)
        assert g.dtype == w.dtype and g.shape == w.shape
        np.testing.assert_array_equal(g, w)


def _array_files(step_dir: pathlib.Path) -> list[pathlib.Path]:
    """The tensorstore data files of a step's state item, largest first."""
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file()]
    data = [p for p in files if p.parent.name == "d"]
    assert data, files
    return sorted(data, key=lambda p: p.stat().st_size, reverse=True)


# ---------------------------------------------------------------------------
# Round trip, retention, meta
# ---------------------------------------------------------------------------


def test_round_trip_train_state_and_meta(tmp_path):
    state = _make_state(0)
    meta = {
        "phase": "coupled",
        "parent": None,
        "config": {"lr": 0.1, "widths": [8, 16], "model": "vgg7"},
        "metrics": {"acc": np.float32(0.25), "loss": jnp.float32(1.5)},
    }
    with PhaseCheckpoints(tmp_path / "coupled") as ckpt:
        assert ckpt.latest_step() is None and ckpt.all_steps() == []
        assert ckpt.read_meta() is None
        ckpt.save(7, state, meta)
        ckpt.wait()
        assert ckpt.latest_step() == 7

    with PhaseCheckpoints(tmp_path / "coupled") as ckpt:
        target = _make_state(1)  # same structure, other values
        restored, got_meta = ckpt.restore(target)
        _assert_same(restored, state)
        assert isinstance(restored, _State)
        assert int(np.asarray(restored.opt_state[0].trace["conv"]["kernel"]).any())
        assert got_meta == {
            "phase": "coupled",
            "parent": None,
            "config": {"lr": 0.1, "widths": [8, 16], "model": "vgg7"},
            "metrics": {"acc": 0.25, "loss": 1.5},
        }
        assert ckpt.read_meta(7) == got_meta and ckpt.read_meta() == got_meta
        assert ckpt.read_meta(3) is None

        # An abstract target restores onto the shardings it carries.
        device = jax.devices()[0]
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(
                np.shape(x), jnp.asarray(x).dtype,
                sharding=jax.sharding.SingleDeviceSharding(device),
            ),
            target,
        )
        restored, _ = ckpt.restore(abstract, step=7)
        _assert_same(restored, state)
        assert restored.params["conv"]["kernel"].sharding.device_set == {device}

        with pytest.raises(UserError, match="no checkpoint step 8"):
            ckpt.restore(target, step=8)


def test_latest_step_max_to_keep_and_existing_step(tmp_path):
    state = _make_state(0)
    with PhaseCheckpoints(tmp_path, max_to_keep=2) as ckpt:
        for step in (10, 20, 30):
            ckpt.save(step, jax.tree.map(lambda x: x + step, state), {"step": step})
        ckpt.wait()
        assert ckpt.all_steps() == [20, 30] and ckpt.latest_step() == 30
        ckpt.save(30, state, {"step": "other"})  # exists: a no-op
        ckpt.wait()
        assert ckpt.read_meta(30) == {"step": 30}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["20", "30"]

    with PhaseCheckpoints(tmp_path, max_to_keep=2) as ckpt:
        assert ckpt.all_steps() == [20, 30]
        restored, meta = ckpt.restore(state)
        _assert_same(restored, jax.tree.map(lambda x: x + 30, state))
        assert meta == {"step": 30}
        ckpt.save(40, state, {"step": 40})
        ckpt.wait()
        assert ckpt.all_steps() == [30, 40]

    missing = tmp_path / "nowhere"
    with PhaseCheckpoints(missing, create=False) as ckpt:
        assert ckpt.latest_step() is None and not missing.exists()
        with pytest.raises(UserError, match="no checkpoint to restore"):
            ckpt.restore(state)


def test_two_async_saves_in_a_row_and_in_flight_listing(tmp_path):
    state = _make_state(0)
    ckpt = PhaseCheckpoints(tmp_path, max_to_keep=3)
    ckpt.save(1, state, {"i": 1})
    ckpt.save(2, state, {"i": 2})  # waits for the first internally
    assert set(ckpt.all_steps()) <= {1, 2}  # only finalized steps are listed
    ckpt.close()
    ckpt.close()  # idempotent
    with PhaseCheckpoints(tmp_path) as again:
        assert again.all_steps() == [1, 2]


# ---------------------------------------------------------------------------
# Crashes and corruption
# ---------------------------------------------------------------------------


def test_interrupted_save_is_ignored_and_cleaned_up(tmp_path):
    """A crash mid-save leaves only ``<step>.orbax-checkpoint-tmp``, never ``<step>``."""
    state1, state2 = _make_state(1), _make_state(2)
    with PhaseCheckpoints(tmp_path) as ckpt:
        ckpt.save(1, state1, {"step": 1})
    # Simulate an interrupted save of step 2: orbax writes into a tmp-named
    # directory and renames it only when all items are written; commit marker
    # and part of the array data never made it.
    with PhaseCheckpoints(tmp_path / "donor") as donor:
        donor.save(2, state2, {"step": 2})
    tmp_dir = tmp_path / "2.orbax-checkpoint-tmp"
    shutil.copytree(tmp_path / "donor" / "2", tmp_dir)
    shutil.rmtree(tmp_path / "donor")
    for marker in tmp_dir.rglob("commit_success.txt"):
        marker.unlink()
    biggest = _array_files(tmp_dir)[0]
    os.truncate(biggest, biggest.stat().st_size // 2)

    with PhaseCheckpoints(tmp_path) as ckpt:
        assert ckpt.all_steps() == [1] and ckpt.latest_step() == 1
        restored, meta = ckpt.restore(state2)
        _assert_same(restored, state1)
        assert meta == {"step": 1}
        # Orbax removes unfinished directories before the next save (process 0).
        ckpt.save(2, state2, {"step": 2})
        ckpt.wait()
        assert not tmp_dir.exists()
        assert ckpt.all_steps() == [1, 2]
        _assert_same(ckpt.restore(state1)[0], state2)


def _corrupt(step_dir: pathlib.Path, how: str) -> None:
    target = _array_files(step_dir)[0]
    if how == "truncate":
        os.truncate(target, target.stat().st_size // 3)
    else:  # flip bytes in place, size unchanged
        data = bytearray(target.read_bytes())
        for i in range(len(data) // 2, len(data) // 2 + 32):
            data[i] ^= 0x5A
        target.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["truncate", "garble"])
def test_corrupted_latest_falls_back_with_warning(tmp_path, caplog, how):
    states = {s: _make_state(s) for s in (1, 2, 3)}
    with PhaseCheckpoints(tmp_path, max_to_keep=3) as ckpt:
        for s, st in states.items():
            ckpt.save(s, st, {"step": s})
    _corrupt(tmp_path / "3", how)

    with PhaseCheckpoints(tmp_path, max_to_keep=3) as ckpt:
        assert ckpt.latest_step() == 3  # listed: it is finalized, just damaged
        with caplog.at_level(logging.WARNING, logger=checkpointing.__name__):
            restored, meta = ckpt.restore(states[1])
        _assert_same(restored, states[2])
        assert meta == {"step": 2}
        warnings = [r.getMessage() for r in caplog.records
                    if r.name == checkpointing.__name__ and r.levelno == logging.WARNING]
        assert any("step 3" in w and str(tmp_path) in w and "unreadable" in w
                   for w in warnings), warnings
        if how == "garble":  # orbax reads flipped bytes silently; the sums catch it
            assert any("checksum mismatch" in w for w in warnings), warnings

        # An explicit request for the damaged step does not fall back.
        with pytest.raises(UserError, match="no readable checkpoint"):
            ckpt.restore(states[1], step=3)
        # Training resumed from step 2 reaches step 3 again: the bad copy is replaced.
        ckpt.save(3, states[3], {"step": 3, "again": True})
        ckpt.wait()
        restored, meta = ckpt.restore(states[1])
        _assert_same(restored, states[3])
        assert meta == {"step": 3, "again": True}
    gc.collect()


def test_all_corrupted_raises_one_line_user_error(tmp_path):
    state = _make_state(0)
    with PhaseCheckpoints(tmp_path, max_to_keep=2) as ckpt:
        ckpt.save(1, state, {})
        ckpt.save(2, state, {})
    _corrupt(tmp_path / "1", "truncate")
    _corrupt(tmp_path / "2", "garble")
    with PhaseCheckpoints(tmp_path) as ckpt:
        with pytest.raises(UserError) as info:
            ckpt.restore(state)
    message = str(info.value)
    assert "\n" not in message
    assert str(tmp_path) in message and "delete that directory" in message
    assert "step 2" in message and "step 1" in message
    gc.collect()


def test_changed_model_is_a_user_error_not_a_corruption(tmp_path):
    state = _make_state(0)
    with PhaseCheckpoints(tmp_path) as ckpt:
        ckpt.save(1, state, {})
    wider = state.replace(
        params={**state.params, "dense": {"kernel": jnp.zeros((64, 12)),
                                          "bias": jnp.zeros((12,), jnp.bfloat16)}}
    )
    with PhaseCheckpoints(tmp_path) as ckpt:
        with pytest.raises(UserError, match=r"dense\.kernel is \(64, 10\) on disk") as info:
            ckpt.restore(wider)
        assert "\n" not in str(info.value) and "config" in str(info.value)


def test_checksums_detect_a_bit_flip_and_ignore_the_container():
    x = np.arange(24, dtype=np.float32).reshape(4, 6)
    y = x.copy()
    y.view(np.uint32)[2, 3] ^= 1 << 7
    tree = {"a": x, "b": jnp.asarray(x), "c": np.array([True, False]), "d": 3}
    sums = checkpointing._checksums(tree)
    assert sums["a"] == sums["b"]  # NumPy and jax leaves agree
    assert set(sums) == {"a", "b", "c"}  # Python scalars are not arrays
    assert checkpointing._checksums({"a": y})["a"] != sums["a"]
    swapped = x.copy()
    swapped[0, [0, 1]] = swapped[0, [1, 0]]
    assert checkpointing._checksums({"a": swapped})["a"] != sums["a"]


# ---------------------------------------------------------------------------
# Phase completion
# ---------------------------------------------------------------------------


def test_mark_complete(tmp_path):
    with PhaseCheckpoints(tmp_path / "finetune") as ckpt:
        assert not ckpt.is_complete() and ckpt.read_complete() is None
        ckpt.save(5, _make_state(0), {"phase": "finetune"})
        ckpt.mark_complete({"phase": "finetune", "acc": np.float32(0.5), "step": 5})
        assert ckpt.is_complete()
        assert ckpt.read_complete() == {"phase": "finetune", "acc": 0.5, "step": 5}
        assert ckpt.latest_step() == 5  # mark_complete waited for the save
    names = sorted(p.name for p in (tmp_path / "finetune").iterdir())
    assert names == ["5", "complete.json"]  # no temporary file left behind
    with PhaseCheckpoints(tmp_path / "finetune") as ckpt:
        assert ckpt.is_complete() and ckpt.all_steps() == [5]
    (tmp_path / "finetune" / "complete.json").write_text("{not json")
    with pytest.raises(UserError, match="complete.json is not valid JSON"):
        PhaseCheckpoints(tmp_path / "finetune").read_complete()


def test_not_a_directory_is_a_user_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is not a directory"):
        PhaseCheckpoints(tmp_path / "file")


# ---------------------------------------------------------------------------
# 8 devices -> 1 device, in subprocesses
# ---------------------------------------------------------------------------

_EXPECTED = """
import numpy as np
W = np.arange(24, dtype=np.float32).reshape(8, 3) / 7
B = np.arange(32, dtype=np.int32).reshape(16, 2) * 3 - 5
"""

_SAVE_8 = _EXPECTED + """
import sys
import jax, jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
from duo_jax.checkpointing import PhaseCheckpoints
assert jax.device_count() == 8, jax.devices()
mesh = jax.make_mesh((8,), ("data",))
rep, data = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
state = {
    "params": {"w": jax.device_put(W, rep)},
    "rng": jax.device_put(jax.random.PRNGKey(3), rep),
    "batch_buffer": jax.device_put(B, data),
}
assert len(state["batch_buffer"].sharding.device_set) == 8
with PhaseCheckpoints(sys.argv[1]) as ckpt:
    ckpt.save(4, state, {"devices": 8})
"""

_RESTORE_1 = _EXPECTED + """
import json, sys
import jax, jax.numpy as jnp
from jax.sharding import SingleDeviceSharding
from duo_jax.checkpointing import PhaseCheckpoints
assert jax.device_count() == 1
one = SingleDeviceSharding(jax.devices()[0])
target = {
    "params": {"w": jax.ShapeDtypeStruct((8, 3), jnp.float32, sharding=one)},
    "rng": jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=one),
    "batch_buffer": jax.ShapeDtypeStruct((16, 2), jnp.int32, sharding=one),
}
with PhaseCheckpoints(sys.argv[1]) as ckpt:
    state, meta = ckpt.restore(target)
np.testing.assert_array_equal(np.asarray(state["params"]["w"]), W)
np.testing.assert_array_equal(np.asarray(state["batch_buffer"]), B)
np.testing.assert_array_equal(np.asarray(state["rng"]), np.asarray(jax.random.PRNGKey(3)))
assert all(x.sharding == one for x in jax.tree.leaves(state))
print(json.dumps({"meta": meta, "ok": True}))
"""


def _run(code: str, directory: pathlib.Path, devices: int) -> str:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_REPO), env.get("PYTHONPATH")]))
    if devices > 1:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), str(directory)],
        env=env, capture_output=True, text=True, timeout=120, cwd=_REPO,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


def test_saved_on_8_devices_restores_on_1(tmp_path):
    _run(_SAVE_8, tmp_path / "phase", devices=8)
    out = _run(_RESTORE_1, tmp_path / "phase", devices=1)
    assert json.loads(out.strip().splitlines()[-1]) == {"meta": {"devices": 8}, "ok": True}
