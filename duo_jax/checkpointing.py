"""Checkpoints of one training phase, on orbax; the only module importing orbax.

A :class:`PhaseCheckpoints` owns one directory (``workdir/<phase>/``)::

    <directory>/
      <step>/                 one finalized orbax checkpoint per saved step
        state/                the train state (arrays, via tensorstore)
        meta/                 JSON: phase name, config, parent phase, metrics
        checksums/            JSON: two 32-bit sums per array, see below
      <step>.orbax-checkpoint-tmp/   a save in flight or interrupted; ignored
      complete.json           written once the phase has finished

Nothing is pickled: arrays are written by tensorstore (zarr in an OCDBT
store) and everything else is JSON.

Atomicity is orbax's. On a local or network file system a step is written
into ``<step>.orbax-checkpoint-tmp`` and renamed to ``<step>`` only after
every item is on disk, so a directory named ``<step>`` is complete by
construction; on GCS (no atomic rename) orbax writes a ``commit_success.txt``
marker last and treats a step without it as unfinished. Unfinished
directories are never listed by :meth:`PhaseCheckpoints.all_steps`; a new
manager has orbax delete them (process 0, in the background, done before its
first save).

Orbax does not detect flipped bytes inside an array file (it does detect a
truncated one), so each save also records, per array, two wrapping 32-bit
sums of its bit pattern, computed on device. They do not depend on the
sharding, so a restore onto a different mesh is checked as well. A step
whose files cannot be read or whose sums disagree is *unreadable*:
:meth:`PhaseCheckpoints.restore` warns and falls back to the previous step.

Multi-host: every process constructs the manager and calls ``save``,
``restore``, ``wait`` and ``mark_complete`` (orbax saves collectively);
``complete.json`` is written by process 0 only.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax import lax

from duo_jax import sharding
from duo_jax.errors import UserError

__all__ = ["PhaseCheckpoints"]

_log = logging.getLogger(__name__)

_STATE, _META, _SUMS = "state", "meta", "checksums"
_COMPLETE = "complete.json"
_HINT = "delete that directory to start the phase afresh"


# ---------------------------------------------------------------------------
# Checksums: sharding-independent, exact (integer sums wrap modulo 2**32).
# ---------------------------------------------------------------------------


def _summable(x: Any) -> bool:
    """Array leaves of whole-byte numeric dtypes (and PRNG keys) get sums."""
    if not isinstance(x, (jax.Array, np.ndarray, np.generic)):
        return False  # Python scalars, None, ...
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        return True
    dtype = np.dtype(x.dtype)
    return dtype.kind not in "OSUMmV" or (
        dtype.kind == "V" and jax.dtypes.itemsize_bits(dtype) == 8 * dtype.itemsize
    )  # kind "V": ml_dtypes (bfloat16, float8...); sub-byte ones are skipped


def _host_words(x: Any) -> Any:
    """Gives a NumPy leaf an unsigned-integer view; jax arrays pass through."""
    if isinstance(x, jax.Array):
        return x
    a = np.ascontiguousarray(x)
    if a.dtype == np.bool_:
        return a.view(np.uint8)
    if a.dtype.itemsize in (1, 2, 4):
        return a.view(f"uint{8 * a.dtype.itemsize}")
    # 8- and 16-byte dtypes: 32-bit words in memory order (flattened).
    return a.reshape(-1).view(np.uint32)


def _device_words(x: jax.Array) -> jax.Array:
    """The bit pattern of ``x`` as uint32 words (inside jit)."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if jnp.iscomplexobj(x):
        x = jnp.stack([jnp.real(x), jnp.imag(x)], axis=-1)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    size = x.dtype.itemsize
    if size == 8:
        return lax.bitcast_convert_type(x, jnp.uint32)  # trailing axis of 2
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[size]
    return lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _sums_impl(leaves: list[jax.Array]) -> list[jax.Array]:
    out = []
    for x in leaves:
        w = _device_words(x)
        # Row-major position of every word, built from iotas (no reshape, so a
        # sharded array is reduced where it lies).
        index = jnp.zeros(w.shape, jnp.uint32)
        stride = 1
        for axis in reversed(range(w.ndim)):
            iota = lax.broadcasted_iota(jnp.uint32, w.shape, axis)
            index = index + iota * jnp.uint32(stride % 2**32)
            stride *= w.shape[axis]
        weight = index * jnp.uint32(2) + jnp.uint32(1)
        out.append(
            jnp.stack(
                [jnp.sum(w, dtype=jnp.uint32), jnp.sum(w * weight, dtype=jnp.uint32)]
            )
        )
    return out


_sums_jit = jax.jit(_sums_impl)


def _leaf_names(tree: Any) -> list[str]:
    return jax.tree.leaves(ocp.tree.get_param_names(tree, include_empty_nodes=False))


def _checksums(tree: Any) -> dict[str, list]:
    """Maps each array leaf's orbax name to ``[dtype, sum, weighted sum]``."""
    names, leaves = _leaf_names(tree), jax.tree.leaves(tree)
    picked = [(n, x) for n, x in zip(names, leaves) if _summable(x)]
    if not picked:
        return {}
    sums = jax.device_get(_sums_jit([_host_words(x) for _, x in picked]))
    return {
        n: [str(x.dtype), int(s[0]), int(s[1])]
        for (n, x), s in zip(picked, sums)
    }


def _bad_checksums(restored: Any, expected: Mapping[str, list]) -> list[str]:
    """Names whose restored bits differ from those saved (same dtype only)."""
    got = _checksums(restored)
    return [
        n
        for n, (dtype, *sums) in expected.items()
        if n in got and got[n][0] == dtype and got[n][1:] != sums
    ]


# ---------------------------------------------------------------------------
# Small helpers.
# ---------------------------------------------------------------------------


def _to_json(meta: Mapping[str, Any]) -> dict:
    """A plain-JSON copy of ``meta``; NumPy/jax scalars and arrays become lists."""

    def default(obj: Any) -> Any:
        if isinstance(obj, (np.generic, np.ndarray, jax.Array)):
            return np.asarray(obj).tolist()
        raise TypeError(f"checkpoint meta: {type(obj).__name__} is not JSON-able")

    if not isinstance(meta, Mapping):
        raise TypeError(f"checkpoint meta must be a dict, got {type(meta).__name__}")
    return json.loads(json.dumps(dict(meta), default=default))


def _first_line(err: BaseException, limit: int = 300) -> str:
    """The first line of the innermost cause (tensorstore's own message)."""
    for _ in range(8):
        inner = err.__cause__ or err.__context__
        if inner is None:
            break
        err = inner
    text = (str(err).strip().splitlines() or [""])[0]
    text = f"{type(err).__name__}: {text}" if text else type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _os_error(err: BaseException) -> str | None:
    """The operating-system error behind a failed write (e.g. "No space left
    on device"), from an ``OSError`` or tensorstore's ``os_error_code``; else None."""
    for _ in range(8):
        if isinstance(err, OSError) and err.errno:
            return err.strerror or os.strerror(err.errno)
        code = re.search(r"os_error_code='?(\d+)", str(err))
        if code:
            return os.strerror(int(code.group(1)))
        err = err.__cause__ or err.__context__
        if err is None:
            break
    return None


def _mismatch(target: Any, on_disk: Any) -> str | None:
    """Describes how ``target`` differs from a checkpoint's tree metadata."""
    want = {
        n: tuple(np.shape(x))
        for n, x in zip(_leaf_names(target), jax.tree.leaves(target))
    }
    have = {
        m.name: tuple(m.shape)
        for m in jax.tree.leaves(on_disk)
        if hasattr(m, "name") and hasattr(m, "shape")
    }
    problems = []
    missing = sorted(set(want) - set(have))
    extra = sorted(set(have) - set(want))
    if missing:
        problems.append("not in checkpoint: " + ", ".join(missing[:3]))
    if extra:
        problems.append("not in target: " + ", ".join(extra[:3]))
    for n in sorted(set(want) & set(have)):
        if want[n] != have[n] and len(problems) < 4:
            problems.append(f"{n} is {have[n]} on disk, {want[n]} expected")
    return "; ".join(problems) or None


# ---------------------------------------------------------------------------
# The manager.
# ---------------------------------------------------------------------------


class PhaseCheckpoints:
    """Saves and restores the checkpoints of one training phase.

    Args:
        directory: The phase's directory (local path or ``gs://...``).
        max_to_keep: How many of the newest steps to keep on disk; older ones
            are deleted once a newer save is finalized.
        create: Create ``directory`` if missing. When False and it is missing,
            the manager simply has no steps.

    Raises:
        UserError: ``directory`` exists but is not a directory.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        max_to_keep: int = 2,
        create: bool = True,
    ):
        text = os.fspath(directory)
        self._local = "://" not in text
        self.directory = epath.Path(os.path.abspath(text) if self._local else text)
        if self.directory.exists() and not self.directory.is_dir():
            raise UserError(
                f"checkpoint directory {self.directory} exists but is not a"
                " directory; move it away or choose another --workdir"
            )
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            create=create,
            cleanup_tmp_directories=True,
            enable_async_checkpointing=True,
        )
        # Registering the handlers up front lets a fresh manager read the
        # metadata of steps written by an earlier run.
        registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
        for item, save, restore in (
            (_STATE, ocp.args.StandardSave, ocp.args.StandardRestore),
            (_META, ocp.args.JsonSave, ocp.args.JsonRestore),
            (_SUMS, ocp.args.JsonSave, ocp.args.JsonRestore),
        ):
            registry.add(item, save)
            registry.add(item, restore)
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, handler_registry=registry
        )
        self._unreadable: set[int] = set()
        self._closed = False

    # -- listing ------------------------------------------------------------

    def all_steps(self) -> list[int]:
        """Finalized steps, oldest first (an async save in flight is excluded)."""
        return [
            s
            for s in sorted(self._manager.all_steps())
            if ocp.utils.is_checkpoint_finalized(self.directory / str(s))
        ]

    def latest_step(self) -> int | None:
        """The newest finalized step, or None if there is none."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    # -- saving -------------------------------------------------------------

    def save(self, step: int, state: Any, meta: Mapping[str, Any]) -> None:
        """Starts saving ``state`` and ``meta`` as ``step`` (asynchronously).

        Returns once the arrays are copied off the device; the files are
        written in the background (see :meth:`wait`). A second save waits for
        the first. Saving a step that exists is a no-op, unless :meth:`restore`
        found it unreadable: steps found unreadable are deleted by the next
        save (so they are not listed, nor rotated in place of good ones).

        Args:
            step: The training step (a non-negative integer).
            state: A pytree of jax/NumPy arrays, e.g. a flax ``TrainState``.
            meta: A JSON-able dict (NumPy/jax scalars are converted).
        """
        step = int(step)
        existing = self._manager.all_steps()
        if step in existing and step not in self._unreadable:
            _log.info("checkpoint step %d exists in %s; not saved again",
                      step, self.directory)
            return
        for bad in sorted(self._unreadable.intersection(existing)):
            self.wait()
            _log.warning("deleting unreadable checkpoint step %d in %s",
                         bad, self.directory)
            self._manager.delete(bad)
        self._unreadable.clear()
        meta = _to_json(meta)
        self._check_space(step, state, meta)
        args = ocp.args.Composite(
            **{
                _STATE: ocp.args.StandardSave(state),
                _META: ocp.args.JsonSave(meta),
                _SUMS: ocp.args.JsonSave(_checksums(state)),
            }
        )
        try:
            self._manager.save(step, args=args, force=True)
        except Exception as e:
            self._raise_write_error(e)
            raise

    def wait(self) -> None:
        """Blocks until every started save is on disk; re-raises its error.

        Raises:
            UserError: A save failed for a reason of the file system (disk
                full, read-only, permissions); the message says which.
        """
        try:
            self._manager.wait_until_finished()
        except Exception as e:
            self._raise_write_error(e)
            raise

    def _check_space(self, step: int, state: Any, meta: Mapping[str, Any]) -> None:
        """Refuses to start a save that cannot fit on a local disk.

        A save that runs out of space halfway fails in orbax's background
        threads, which print their own tracebacks before the error reaches
        :meth:`wait`; checking first gives one clear line in the usual case
        (the disk was already full). Needs the arrays, the meta and 1 MiB.
        """
        if not self._local:
            return
        need = sum(int(np.prod(np.shape(x))) * np.dtype(x.dtype).itemsize
                   for x in jax.tree.leaves(state) if _summable(x) and not
                   jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key))
        need += len(json.dumps(meta)) + (1 << 20)
        existing = self.directory
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        free = shutil.disk_usage(existing).free
        if not sharding.all_processes(free >= need):
            latest = self.latest_step()
            kept = "none is complete yet" if latest is None else f"the last complete one, step {latest}, is kept"
            raise UserError(
                f"cannot write checkpoint step {step} in {self.directory}: No space left on device (needs about"
                f" {need / 2**20:.1f} MiB, {free / 2**20:.1f} MiB free; {kept}); free disk space, then rerun"
                " the same command to resume"
            )

    def _raise_write_error(self, err: BaseException) -> None:
        """A failed write the user can fix becomes one clear line; other errors pass."""
        reason = _os_error(err)
        if reason is None:
            return
        latest = self.latest_step()
        kept = "none is complete yet" if latest is None else f"the last complete one, step {latest}, is kept"
        raise UserError(
            f"cannot write a checkpoint in {self.directory}: {reason} ({kept});"
            " free disk space or fix the permissions, then rerun the same command to resume"
        ) from None

    # -- restoring ----------------------------------------------------------

    def restore(self, target: Any, step: int | None = None) -> tuple[Any, dict]:
        """Restores a step onto the structure, dtypes and shardings of ``target``.

        Args:
            target: A concrete pytree, or an abstract one whose leaves are
                ``jax.ShapeDtypeStruct`` (with ``.sharding`` to place the
                arrays; e.g. a single device after training on eight).
            step: The step to restore; None for the newest readable one, falling
                back past unreadable steps with a warning.

        Returns:
            ``(state, meta)``: the restored pytree and the step's meta dict.

        Raises:
            UserError: No checkpoint, the requested step is missing, the
                checkpoint does not fit ``target`` (a changed config), or no
                candidate step is readable.
        """
        self.wait()
        steps = self.all_steps()
        if not steps:
            raise UserError(f"no checkpoint to restore in {self.directory}")
        if step is not None and step not in steps:
            raise UserError(
                f"no checkpoint step {step} in {self.directory} (it has {steps})"
            )
        candidates = [step] if step is not None else steps[::-1]
        failures = []
        for s in candidates:
            restored, error = self._try_restore(target, s)
            if error is None:
                for bad, why in failures:  # warned about only when falling back: else the error says it
                    _log.warning(
                        "checkpoint step %d in %s is unreadable, ignoring it: %s",
                        bad, self.directory, why,
                    )
                if failures:
                    _log.warning(
                        "restored %s from step %d instead (newer steps unreadable)",
                        self.directory, s,
                    )
                return restored
            self._unreadable.add(s)
            failures.append((s, error))
        failures = [f"step {s}: {error}" for s, error in failures]
        raise UserError(
            f"no readable checkpoint in {self.directory} ({'; '.join(failures)});"
            f" {_HINT}"
        )

    def _try_restore(self, target: Any, step: int) -> tuple[Any, str | None]:
        """Returns ``((state, meta), None)`` or ``(None, why it is unreadable)``."""
        error, mismatch, result = None, None, None
        try:
            on_disk = self._manager.item_metadata(step)[_STATE]
            tree = getattr(on_disk, "tree", None)
            mismatch = _mismatch(target, tree) if tree is not None else None
        except Exception as e:  # noqa: BLE001 - any failure means unreadable
            error = _first_line(e)
        if mismatch is not None:
            raise UserError(
                f"checkpoint step {step} in {self.directory} does not fit the"
                f" state being restored ({mismatch}); was the config changed?"
                f" Use a new --workdir, or {_HINT}"
            )
        if error is None:
            try:
                args = ocp.args.Composite(
                    **{
                        _STATE: ocp.args.StandardRestore(target),
                        _META: ocp.args.JsonRestore(),
                        _SUMS: ocp.args.JsonRestore(),
                    }
                )
                out = self._manager.restore(step, args=args)
                bad = _bad_checksums(out[_STATE], out[_SUMS] or {})
                if bad:
                    error = f"checksum mismatch in {', '.join(bad[:3])}"
                else:
                    result = (out[_STATE], dict(out[_META] or {}))
            except Exception as e:  # noqa: BLE001 - any failure means unreadable
                error = _first_line(e)
        if not sharding.all_processes(error is None):
            return None, error or "unreadable on another process"
        return result, error

    def read_meta(self, step: int | None = None) -> dict | None:
        """The meta dict of a step, without reading its arrays.

        Args:
            step: A step; None for the newest step whose meta is readable.

        Returns:
            The dict, or None if there is no such step or it is unreadable
            (a warning is logged for an unreadable one).
        """
        self.wait()
        steps = self.all_steps()
        candidates = steps[::-1] if step is None else [s for s in steps if s == step]
        for s in candidates:
            try:
                out = self._manager.restore(
                    s, args=ocp.args.Composite(**{_META: ocp.args.JsonRestore()})
                )
                return dict(out[_META] or {})
            except Exception as e:  # noqa: BLE001
                _log.warning("meta of checkpoint step %d in %s is unreadable: %s",
                             s, self.directory, _first_line(e))
        return None

    # -- phase completion ---------------------------------------------------

    @property
    def _complete_path(self) -> epath.Path:
        return self.directory / _COMPLETE

    def mark_complete(self, summary: Mapping[str, Any]) -> None:
        """Waits for pending saves, then records the phase as finished.

        Process 0 writes ``complete.json`` atomically (temporary file and
        ``os.replace``; a single object write on GCS); all processes then meet
        at a barrier.

        Args:
            summary: A JSON-able dict (final metrics, last step, ...).
        """
        self.wait()
        payload = json.dumps(_to_json(summary), indent=2, sort_keys=True)
        if jax.process_index() == 0:
            self.directory.mkdir(parents=True, exist_ok=True)
            if self._local:
                tmp = f"{self._complete_path}.tmp-{os.getpid()}"
                with open(tmp, "w", encoding="utf-8") as f:
                    f.write(payload)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self._complete_path)
            else:
                self._complete_path.write_text(payload)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"duo_jax complete {self.directory}")

    def is_complete(self) -> bool:
        """Whether :meth:`mark_complete` has run for this phase."""
        return self._complete_path.exists()

    def read_complete(self) -> dict | None:
        """The summary given to :meth:`mark_complete`, or None if not complete.

        Raises:
            UserError: ``complete.json`` exists but is not valid JSON.
        """
        if not self.is_complete():
            return None
        try:
            return json.loads(self._complete_path.read_text())
        except ValueError as e:
            raise UserError(
                f"{self._complete_path} is not valid JSON ({_first_line(e)});"
                " delete that file to redo the end of the phase"
            ) from e

    # -- lifetime -----------------------------------------------------------

    def close(self) -> None:
        """Waits for pending saves and releases orbax's threads (idempotent)."""
        if not self._closed:
            self._closed = True
            try:
                self._manager.close()
            except Exception as e:
                self._raise_write_error(e)
                raise

    def __enter__(self) -> PhaseCheckpoints:
        return self

    def __exit__(self, exc_type: Any, *exc: object) -> None:
        if exc_type is None:
            self.close()
            return
        try:  # already failing: a save that failed too must not replace that error
            self.close()
        except Exception as e:  # noqa: BLE001
            _log.warning("closing %s: %s", self.directory, _first_line(e))

    def __repr__(self) -> str:
        return f"PhaseCheckpoints({str(self.directory)!r})"
