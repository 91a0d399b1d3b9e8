"""One training phase: train state, optimizer, jitted steps, the loop.

Nothing here knows a particular model: a phase gets an ``apply_fn`` (a Linen
``model.apply``), initial variables, a dataset and its settings.

The loop, top to bottom: restore the latest checkpoint of the phase (or start
from the given variables) -> for each step: take batch ``step`` (a pure
function of seed and step), run the jitted ``train_step`` -> every
``log_every`` steps: fetch metrics, stop on a non-finite loss, log ->
every ``checkpoint_every`` steps and at the end: save -> evaluate.
"""

from __future__ import annotations

import logging
import math
import signal
from typing import Any, Callable, Iterable, Mapping

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from duo_jax import sharding
from duo_jax.errors import UserError

PyTree = Any
Metrics = dict[str, jax.Array]
_log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------
# State
# ---------------------------------------------------------------------------


class TrainState(flax.struct.PyTreeNode):
    """Everything a phase needs to continue bit for bit: a pytree of arrays.

    ``rng`` holds raw ``uint32`` key data (checkpointable); ``apply_fn`` and
    ``tx`` are static and not saved.
    """

    step: jax.Array
    params: PyTree
    batch_stats: PyTree
    opt_state: PyTree
    rng: jax.Array
    apply_fn: Callable = flax.struct.field(pytree_node=False)
    tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)

    @property
    def variables(self) -> dict[str, PyTree]:
        return {"params": self.params, "batch_stats": self.batch_stats}


def create_state(apply_fn: Callable, variables: Mapping[str, PyTree], tx: optax.GradientTransformation,
                 seed: int) -> TrainState:
    """A fresh state at step 0 from model variables (``params``, ``batch_stats``)."""
    params = variables["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=variables.get("batch_stats", {}),
        opt_state=tx.init(params),
        rng=jax.random.key_data(jax.random.key(seed)),
        apply_fn=apply_fn,
        tx=tx,
    )


# ---------------------------------------------------------------------------
# Optimizer
# ---------------------------------------------------------------------------

OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("constant", "step", "cosine")


def make_schedule(opt: ml_collections.ConfigDict, steps_per_epoch: int, total_steps: int) -> optax.Schedule:
    """Learning-rate schedule: ``constant``, ``step`` (x ``decay_factor`` at
    ``decay_epochs``) or ``cosine`` (to zero at ``total_steps``), with an
    optional linear warm-up of ``warmup_epochs``."""
    lr = float(opt.lr)
    if not lr > 0:
        raise UserError(f"learning rate must be positive, got lr={opt.lr}")
    kind = opt.get("schedule", "constant")
    if kind not in SCHEDULES:
        raise UserError(f"unknown schedule {kind!r}; known: {', '.join(SCHEDULES)}")
    warmup = int(round(float(opt.get("warmup_epochs", 0.0)) * steps_per_epoch))
    if kind == "constant":
        main = optax.constant_schedule(lr)
    elif kind == "step":
        bounds = {int(round(e * steps_per_epoch)) - warmup: float(opt.get("decay_factor", 0.1))
                  for e in opt.get("decay_epochs", ())}
        main = optax.piecewise_constant_schedule(lr, {b: f for b, f in bounds.items() if b > 0})
    else:
        main = optax.cosine_decay_schedule(lr, max(1, total_steps - warmup))
    if warmup <= 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], [warmup])


def make_optimizer(opt: ml_collections.ConfigDict, steps_per_epoch: int, total_steps: int) -> optax.GradientTransformation:
    """SGD (momentum, Nesterov) or Adam with L2 weight decay added to the gradient,
    as Torch's ``weight_decay`` (the authors' setting: SGD, Nesterov 0.9, 1e-4)."""
    name = opt.get("name", "sgd")
    if name not in OPTIMIZERS:
        raise UserError(f"unknown optimizer {name!r}; known: {', '.join(OPTIMIZERS)}")
    schedule = make_schedule(opt, steps_per_epoch, total_steps)
    wd = float(opt.get("weight_decay", 0.0))
    if wd < 0:
        raise UserError(f"weight_decay must be >= 0, got {wd}")
    if name == "sgd":
        base = optax.sgd(schedule, momentum=opt.get("momentum", 0.9) or None, nesterov=bool(opt.get("nesterov", True)))
    else:
        base = optax.adam(schedule)
    return optax.chain(optax.add_decayed_weights(wd), base) if wd > 0 else base


# ---------------------------------------------------------------------------
# Steps
# ---------------------------------------------------------------------------


def _classification_metrics(logits: jax.Array, labels: jax.Array, weights: jax.Array) -> Metrics:
    """Weighted sums: loss, top-1 and top-5 correct, and the weight itself."""
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    k = min(5, logits.shape[-1])
    topk = jax.lax.top_k(logits, k)[1]
    top1 = (topk[:, 0] == labels).astype(jnp.float32)
    top5 = jnp.any(topk == labels[:, None], axis=-1).astype(jnp.float32)
    return {"loss": jnp.sum(loss * weights), "top1": jnp.sum(top1 * weights),
            "top5": jnp.sum(top5 * weights), "count": jnp.sum(weights)}


def train_step(state: TrainState, batch: Mapping[str, jax.Array]) -> tuple[TrainState, Metrics]:
    """One SGD step on the mean cross-entropy; returns per-batch metric sums."""
    dropout_rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    labels = batch["label"]

    def loss_fn(params):
        logits, updates = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats}, batch["image"], train=True,
            mutable=["batch_stats"], rngs={"dropout": dropout_rng},
        )
        loss = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))
        return loss, (logits, updates)

    (_, (logits, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    deltas, opt_state = state.tx.update(grads, state.opt_state, state.params)
    new_state = state.replace(
        step=state.step + 1,
        params=optax.apply_updates(state.params, deltas),
        batch_stats=updates.get("batch_stats", state.batch_stats),
        opt_state=opt_state,
    )
    return new_state, _classification_metrics(logits, labels, jnp.ones_like(labels, jnp.float32))


def eval_step(variables: PyTree, batch: Mapping[str, jax.Array], apply_fn: Callable) -> Metrics:
    """Metric sums of one (padded) eval batch; ``batch['mask']`` weights the rows."""
    logits = apply_fn(variables, batch["image"], train=False)
    return _classification_metrics(logits, batch["label"], batch["mask"])


_jit_eval = jax.jit(eval_step, static_argnums=2)


def evaluate(apply_fn: Callable, variables: PyTree, batches: Iterable[Mapping[str, np.ndarray]],
             put: Callable = jnp.asarray, eval_fn: Callable = _jit_eval) -> dict[str, float]:
    """Top-1, top-5 and mean loss over the eval batches (one jit per model).

    ``eval_fn`` is the jitted :func:`eval_step` (with the shardings ``put`` makes).
    """
    totals: dict[str, float] = {}
    for batch in batches:
        m = eval_fn(variables, {k: put(v) for k, v in batch.items()}, apply_fn)
        for k, v in jax.device_get(m).items():
            totals[k] = totals.get(k, 0.0) + float(v)
    n = totals.get("count", 0.0)
    if n == 0:
        raise UserError("the evaluation split is empty")
    return {"top1": totals["top1"] / n, "top5": totals["top5"] / n, "loss": totals["loss"] / n}


# ---------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or Inf."""


class Preempted(RuntimeError):
    """SIGTERM arrived; the state was saved at a step boundary."""


class SigtermFlag:
    """Records SIGTERM instead of dying (main thread only), so a run can save and stop.

    Flags nest: an inner flag starts raised if the outer one was, and hands a
    SIGTERM it caught to the outer one on exit, so a signal that arrives
    between two training loops (during an evaluation, say) is not lost.
    """

    def __init__(self):
        self.raised = False
        self._old = None

    def __enter__(self):
        try:
            self._old = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread
            self._old = None
        self.raised = self.raised or bool(getattr(self._outer(), "raised", False))
        return self

    def _outer(self):
        outer = getattr(self._old, "__self__", None)
        return outer if isinstance(outer, SigtermFlag) else None

    def _handle(self, signum, frame):
        self.raised = True

    def agreed(self) -> bool:
        """Whether any process of the run has received SIGTERM.

        With several processes every one must call this at the same point of
        the program (it is a collective); they then all stop at the same step,
        and save it together. A process that stopped on its own would wait in
        the collective save for the others, which would wait for it in their
        next training step.
        """
        if jax.process_count() == 1:
            return self.raised
        agreed = sharding.any_process(self.raised)
        # A SIGTERM handled during the collective stays recorded for the next agreement,
        # but the answer is the one every process got.
        self.raised = self.raised or agreed
        return agreed

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)
            if self.raised and self._outer() is not None:
                self._outer().raised = True


@jax.jit
def _all_finite(tree: PyTree) -> jax.Array:
    """Whether every float leaf of ``tree`` is finite (one boolean)."""
    flags = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(flags)) if flags else jnp.bool_(True)


def num_steps_for(phase: ml_collections.ConfigDict, steps_per_epoch: int) -> int:
    """``phase.steps`` if set, else ``ceil(phase.epochs * steps_per_epoch)``."""
    if phase.get("steps"):
        steps = int(phase.steps)
    else:
        epochs = float(phase.get("epochs", 0))
        if not epochs > 0:
            raise UserError(f"epochs must be positive, got {phase.get('epochs')}; set epochs (or steps) to a positive number")
        steps = math.ceil(epochs * steps_per_epoch)
    if steps <= 0:
        raise UserError(f"a training phase needs a positive number of steps, got {steps}; set steps > 0 (or 0 to use epochs)")
    return steps


def train_loop(
    state: TrainState,
    *,
    num_steps: int,
    batch_iter: Callable[[int], Iterable[Mapping[str, np.ndarray]]],
    step_fn: Callable,
    put: Callable = jnp.asarray,
    save: Callable[[TrainState], None],
    log_every: int,
    checkpoint_every: int,
    on_log: Callable[[int, dict[str, float]], None],
    phase: str,
) -> TrainState:
    """Runs ``step_fn`` from ``state.step`` to ``num_steps``.

    Args:
      state: the state to continue from (its ``step`` says where).
      num_steps: last step of the phase.
      batch_iter: ``batch_iter(start)`` yields host batches ``start, start+1, ...``.
      step_fn: the jitted ``train_step``.
      put: moves a host array onto the device(s) (sharding goes here).
      save: saves a state (asynchronously); called every ``checkpoint_every``
        steps before ``num_steps``, and on SIGTERM. The caller saves the state
        it gets back.
      log_every: fetch and log metrics every this many steps (the only host
        syncs in the loop). With several processes these steps, the periodic
        saves and ``num_steps`` are also where the processes agree whether any
        of them received SIGTERM, so that all stop at the same step.
      on_log: receives ``(step, means)`` of the metrics since the last log.
      phase: name, for messages.

    Raises:
      NonFiniteLoss: the loss, the parameters or the optimizer state became
        NaN/Inf (checked before every save and at ``num_steps``, so a
        non-finite state is never saved); the last good checkpoint is kept.
      Preempted: SIGTERM arrived (also before this loop, under an outer
        :class:`SigtermFlag`); the state was saved first.
    """
    start = int(jax.device_get(state.step))
    if start >= num_steps:
        return state
    batches = iter(batch_iter(start))
    pending: list[Metrics] = []
    last_saved = start  # a resumed state (start > 0) came from a checkpoint of that step
    several = jax.process_count() > 1
    with SigtermFlag() as sigterm:
        for step in range(start, num_steps):
            batch = next(batches)
            state, metrics = step_fn(state, {k: put(v) for k, v in batch.items()})
            pending.append(metrics)
            done = step + 1
            # The last step is saved by the caller, after whatever it does at the end (evaluation).
            periodic = done % checkpoint_every == 0 and done < num_steps
            sync_point = done % log_every == 0 or periodic or done == num_steps
            # One process checks its own flag every step; several agree on theirs at sync points.
            stop = (sync_point and sigterm.agreed()) if several else sigterm.raised
            must_save = periodic or stop
            # Never save or return an unchecked state.
            if sync_point or must_save:
                totals = jax.device_get(pending)
                pending = []
                count = sum(float(m["count"]) for m in totals)
                means = {k: sum(float(m[k]) for m in totals) / count for k in ("loss", "top1", "top5")}
                what = None
                if not math.isfinite(means["loss"]):
                    what = f"the training loss became {means['loss']}"
                elif not bool(_all_finite((state.params, state.batch_stats, state.opt_state))):
                    what = "the parameters or optimizer state became NaN/Inf"
                if what:
                    kept = (f"the last good checkpoint, step {last_saved}, is kept" if last_saved
                            else "no checkpoint of this phase was saved yet")
                    raise NonFiniteLoss(
                        f"phase {phase!r}: {what} by step {done}; {kept}; lower the learning rate "
                        "(or fix the data) and start again with a new --workdir"
                    )
                on_log(done, means)
            if stop:
                save(state)
                raise Preempted(f"phase {phase!r}: SIGTERM received, saved step {done}; rerun the same command to resume")
            if must_save:
                save(state)
                last_saved = done
    return state
