"""The recipe: run a config's phases in order, each resumable, into one workdir.

::

    workdir/
      config.json          the config of the run (a rerun must match it)
      <phase>/             orbax checkpoints of the phase, complete.json when done
      tensorboard/         scalars of every phase
      results.json         per phase: accuracy, loss, steps, time, ...
      curves.png           training loss and eval accuracy of all phases

A phase is ``train`` (a model in one mode, from scratch or from its parent
phase's final variables) or ``decouple`` (the coupled parent's final model
turned into the equivalent decoupled binary one, accuracy before and after).
Running the same command again skips complete phases and resumes the
unfinished one from its latest checkpoint.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import tqdm

from duo_jax import checkpointing, input_pipeline, layers, models, reporting, sharding, summary, train
from duo_jax.decouple import decouple
from duo_jax.errors import UserError

_log = logging.getLogger(__name__)
PHASE_KINDS = ("train", "decouple")


# ---------------------------------------------------------------------------
# Config checks
# ---------------------------------------------------------------------------


def phase_names(config: ml_collections.ConfigDict) -> list[str]:
    """The phases to run, checked: each has a sub-config, parents come first."""
    names = [p.strip() for p in str(config.phases).split(",") if p.strip()]
    if not names:
        raise UserError("config.phases is empty; list the phases to run, e.g. 'coupled,decouple,finetune'")
    for i, name in enumerate(names):
        if name not in config or not isinstance(config[name], ml_collections.ConfigDict):
            raise UserError(f"phase {name!r} has no sub-config config.{name}")
        ph = config[name]
        if ph.get("kind") not in PHASE_KINDS:
            raise UserError(f"phase {name!r}: unknown kind {ph.get('kind')!r}; known: {', '.join(PHASE_KINDS)}")
        if ph.kind == "train" and ph.get("mode") not in layers.MODES:
            raise UserError(f"phase {name!r}: unknown mode {ph.get('mode')!r}; set config.{name}.mode to one of: "
                            f"{', '.join(layers.MODES)}")
        parent = ph.get("parent") or ""
        if parent and parent not in names[:i]:
            raise UserError(f"phase {name!r} starts from {parent!r}, which must be listed before it in config.phases")
        if ph.kind == "decouple":
            if not parent or config[parent].get("mode") != "coupled":
                raise UserError(f"phase {name!r} decouples {parent or 'nothing'!r}, which is not a coupled-mode phase")
    return names


def config_json(config: ml_collections.ConfigDict) -> dict:
    return json.loads(config.to_json_best_effort())


def check_workdir(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Creates ``workdir``; refuses one that holds a run of another config."""
    try:
        os.makedirs(workdir, exist_ok=True)
        probe = os.path.join(workdir, f".write_test.{jax.process_index()}")  # one per process
        with open(probe, "w") as f:
            f.write("")
        os.remove(probe)
    except OSError as e:
        raise UserError(f"cannot write to workdir {workdir}: {e.strerror}; choose another --workdir") from None
    path = os.path.join(workdir, "config.json")
    saved = reporting.read_json(path)
    if saved is None:
        reporting.write_json_atomic(path, config_json(config))
    elif saved != config_json(config):
        diff = sorted(_diff_keys(saved, config_json(config)))
        raise UserError(
            f"workdir {workdir} holds a run of a different config (differs in: {', '.join(diff[:6])}); "
            "use another --workdir, or delete that one to start afresh"
        )


def _diff_keys(a: Any, b: Any, prefix: str = "") -> set[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out: set[str] = set()
        for k in set(a) | set(b):
            out |= _diff_keys(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return set() if a == b else {prefix.rstrip(".")}


# ---------------------------------------------------------------------------
# The runner
# ---------------------------------------------------------------------------


class Runner:
    """Runs the phases of one config in one workdir."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str, *, progress: bool = True):
        self.config = config
        self.workdir = workdir
        self.progress = progress and reporting.is_lead()
        self.names = phase_names(config)
        sharding.check_batch_size(config.batch_size)
        sharding.check_batch_size(config.eval_batch_size, "eval_batch_size")
        self.mesh = sharding.make_mesh()
        self.data = input_pipeline.create_dataset(
            config.data, global_batch_size=config.batch_size, eval_batch_size=config.eval_batch_size,
            seed=config.seed, process_index=jax.process_index(), process_count=jax.process_count())
        info = self.data.info
        self.sample = jnp.zeros((1, *info.image_shape), jnp.float32)
        self.results_path = os.path.join(workdir, "results.json")
        self.results: dict[str, Any] = {}
        self._put_batch = functools.partial(sharding.put_batch, sharding=sharding.batch_sharding(self.mesh))
        self._step_fn = sharding.jit_train_step(train.train_step, self.mesh)
        self._eval_fn = sharding.jit_eval_step(train.eval_step, self.mesh)
        self._abstract: dict[Any, dict] = {}
        self._models: dict[str, Any] = {}
        self._costs: dict[str, Any] = {}
        self._sigterm = train.SigtermFlag()  # entered by run()

    def validate(self) -> None:
        """Checks what every phase will need (models, optimizers, lengths) before anything is written."""
        cfg, spe = self.config, self.data.steps_per_epoch
        for key in ("log_every", "checkpoint_every", "keep_checkpoints"):
            if not isinstance(cfg.get(key), int) or cfg.get(key) < 1:
                raise UserError(f"config.{key} must be a positive integer, got {cfg.get(key)!r}")
        h, w, c = self.data.info.image_shape
        for name in self.names:
            ph = cfg[name]
            for mode in ("coupled", "decoupled") if ph.kind == "decouple" else (ph.mode,):
                model = self.model(mode)
                try:
                    self.abstract_variables(model)
                except (ValueError, TypeError) as e:
                    msg = " ".join(str(e).split())
                    try:  # does it build on large images? Then the data's images are what does not fit.
                        jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 224, 224, c)), train=False))
                    except (ValueError, TypeError):
                        raise UserError(f"model {cfg.model.name!r} in {mode} mode cannot be built: {msg}") from None
                    raise UserError(f"model {cfg.model.name!r} cannot take the {h}x{w}x{c} images of "
                                    f"{self.data.info.name!r} ({msg}); resize them with data.image_size") from None
            if ph.kind == "train":
                try:
                    train.make_optimizer(ph.optimizer, spe, train.num_steps_for(ph, spe))
                except UserError as e:
                    raise UserError(f"phase {name!r}: {e}") from None

    # -- helpers --------------------------------------------------------------

    def model(self, mode: str):
        """The config's model in ``mode``; one object per mode, so jitted steps that take its
        ``apply`` as a static argument compile once per mode, not once per phase."""
        if mode not in self._models:
            self._models[mode] = self._create_model(mode)
        return self._models[mode]

    def cost(self, mode: str) -> dict[str, Any] | None:
        """Cost totals per image of the config's model in ``mode`` (:func:`duo_jax.summary.totals`).

        None, with a warning, if the summary fails for any reason: the figures
        are a report, and a model that trains should not fail for want of them.
        """
        if mode not in self._costs:
            try:
                self._costs[mode] = summary.totals(self.model(mode), self.data.info.image_shape)
            except Exception as e:  # noqa: BLE001 -- a report must not fail a phase that trained
                _log.warning("no cost figures for the %s model: %s: %s", mode, type(e).__name__,
                             " ".join(str(e).split()))
                self._costs[mode] = None
        return self._costs[mode]

    def _create_model(self, mode: str):
        opts = dict(self.config.model.get("options", {}))
        if isinstance(opts.get("dtype"), str):
            opts["dtype"] = jnp.dtype(opts["dtype"])
        if opts.get("widths") is not None:
            opts["widths"] = tuple(opts["widths"])
        try:
            return models.create_model(self.config.model.name, mode=mode, num_classes=self.data.info.num_classes, **opts)
        except ValueError as e:
            raise UserError(str(e)) from None

    def init_variables(self, model) -> dict:
        # The 'rbg' generator: XLA compiles a model's threefry init 10x slower on CPU.
        key = jax.random.key(self.config.seed, impl="rbg")
        try:
            variables = jax.jit(functools.partial(model.init, train=False))(key, self.sample)
        except ValueError as e:
            raise UserError(f"model {self.config.model.name!r} cannot take images of shape "
                            f"{self.data.info.image_shape}: {e}") from None
        return dict(variables)

    def abstract_variables(self, model) -> dict:
        if model not in self._abstract:
            self._abstract[model] = jax.eval_shape(lambda: dict(model.init(jax.random.key(0), self.sample, train=False)))
        return self._abstract[model]

    def evaluate(self, model, variables) -> dict[str, float]:
        return train.evaluate(model.apply, variables, self.data.eval_batches(), put=self._put_batch,
                              eval_fn=self._eval_fn)

    def checkpoints(self, name: str) -> checkpointing.PhaseCheckpoints:
        return checkpointing.PhaseCheckpoints(os.path.join(self.workdir, name),
                                              max_to_keep=self.config.keep_checkpoints)

    def final_variables(self, name: str) -> dict:
        """The variables a complete phase ended with.

        Exactly its newest checkpoint: if that one is unreadable this stops
        (a UserError) rather than fall back to an earlier step, which would
        hand the next phase a different model.
        """
        ph = self.config[name]
        model = self.model(ph.mode)
        abstract = self.abstract_variables(model)
        target = {"params": abstract["params"], "batch_stats": abstract.get("batch_stats", {})}
        with self.checkpoints(name) as ckpt:
            last = ckpt.latest_step()
            if ph.kind == "train":
                tx = train.make_optimizer(ph.optimizer, self.data.steps_per_epoch, 1)
                state = jax.eval_shape(lambda: train.create_state(model.apply, abstract, tx, 0))
                state, _ = ckpt.restore(self._abstract_replicated(state), step=last)
                return state.variables
            variables, _ = ckpt.restore(self._abstract_replicated(target), step=last)
            return variables

    def _abstract_replicated(self, tree):
        rep = sharding.replicated(self.mesh)
        return jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=rep), tree)

    def _meta(self, name: str, **extra) -> dict:
        ph = self.config[name]
        return {"phase": name, "kind": ph.kind, "mode": ph.mode, "parent": ph.get("parent") or "",
                "config": config_json(self.config), **extra}

    # -- phases ---------------------------------------------------------------

    def _stop_if_preempted(self, where: str) -> None:
        if self._sigterm.agreed():  # every process calls this at the same points
            raise train.Preempted(f"SIGTERM received; stopped {where}; rerun the same command to resume")

    def run(self) -> dict[str, Any]:
        writer = reporting.ScalarWriter(os.path.join(self.workdir, "tensorboard"))
        try:
            with self._sigterm:  # SIGTERM stops the run at the next step (several processes: sync point)
                self._run_phases(writer)
        finally:
            writer.close()
        reporting.write_json_atomic(self.results_path, self.results)
        reporting.plot_curves(self.results, os.path.join(self.workdir, "curves.png"))
        return self.results

    def _run_phases(self, writer) -> None:
        for i, name in enumerate(self.names):
            with self.checkpoints(name) as ckpt:
                if ckpt.is_complete():
                    self.results[name] = ckpt.read_complete()
                    _log.info("phase %s is complete; skipped", name)
                    continue
                run = self.train_phase if self.config[name].kind == "train" else self.decouple_phase
                summary = run(name, ckpt, writer)
                ckpt.wait()
                ckpt.mark_complete(summary)
            self.results[name] = summary
            reporting.write_json_atomic(self.results_path, self.results)
            if i + 1 < len(self.names):
                self._stop_if_preempted(f"after phase {name!r} finished, before {self.names[i + 1]!r}")

    def train_phase(self, name: str, ckpt: checkpointing.PhaseCheckpoints, writer) -> dict:
        cfg, ph = self.config, self.config[name]
        spe = self.data.steps_per_epoch
        num_steps = train.num_steps_for(ph, spe)
        model = self.model(ph.mode)
        tx = train.make_optimizer(ph.optimizer, spe, num_steps)
        parent = ph.get("parent") or ""
        history: dict[str, list] = {"train_history": [], "eval_history": []}
        wall = 0.0
        if ckpt.latest_step() is None:
            variables = self.final_variables(parent) if parent else self.init_variables(model)
            state = sharding.put_replicated(train.create_state(model.apply, variables, tx, cfg.seed), self.mesh)
        else:  # resume: the phase's own checkpoint, restored onto an abstract state (no init, no parent)
            abstract = jax.eval_shape(lambda: train.create_state(model.apply, self.abstract_variables(model), tx, 0))
            state, meta = ckpt.restore(self._abstract_replicated(abstract))
            history = {k: meta.get(k, []) for k in history}
            wall = float(meta.get("wall_time", 0.0))
            _log.info("phase %s: resuming at step %d", name, int(state.step))
        start_time = time.perf_counter() - wall
        eval_every = int(cfg.get("eval_every", 0) or spe)

        bar = tqdm.tqdm(total=num_steps * cfg.batch_size, initial=int(state.step) * cfg.batch_size,
                        unit="img", unit_scale=True, desc=name, disable=not self.progress, dynamic_ncols=True)

        def on_log(step, means):
            history["train_history"].append({"step": step, **means})
            writer.scalars(step, means, prefix=f"{name}/train_")
            bar.update(step * cfg.batch_size - bar.n)
            bar.set_postfix(loss=f"{means['loss']:.3f}", top1=f"{100 * means['top1']:.1f}%")

        def save(s):
            ckpt.save(int(s.step), s, self._meta(name, wall_time=time.perf_counter() - start_time, **history))

        def evaluate_and_save(s):
            step = int(s.step)
            ev = self.evaluate(model, s.variables)
            history["eval_history"].append({"step": step, **ev})
            writer.scalars(step, ev, prefix=f"{name}/eval_")
            if self.progress:
                bar.write(f"{name}: step {step}/{num_steps}  eval top-1 {100 * ev['top1']:.2f}%  loss {ev['loss']:.4f}")
            save(s)

        try:
            step = int(state.step)
            evaluated = bool(history["eval_history"]) and history["eval_history"][-1]["step"] == step
            if step > 0 and (step % eval_every == 0 or step == num_steps) and not evaluated:
                evaluate_and_save(state)  # stopped (SIGTERM) at an evaluation point before evaluating
            while int(state.step) < num_steps:
                s = int(state.step)
                self._stop_if_preempted(f"in phase {name!r} at saved step {s}" if s else f"at the start of phase {name!r}")
                target = min(num_steps, (int(state.step) // eval_every + 1) * eval_every)
                state = train.train_loop(
                    state, num_steps=target, batch_iter=self.data.train_iter, step_fn=self._step_fn,
                    put=self._put_batch, save=save, log_every=cfg.log_every,
                    checkpoint_every=cfg.checkpoint_every, on_log=on_log, phase=name)
                evaluate_and_save(state)
        finally:
            bar.close()
        ckpt.wait()
        final = history["eval_history"][-1]
        return {
            "kind": "train", "mode": ph.mode, "label": ph.get("label") or "", "parent": parent,
            "top1": final["top1"], "top5": final["top5"], "loss": final["loss"],
            "best_top1": max(h["top1"] for h in history["eval_history"]),
            "steps": num_steps, "epochs": num_steps / spe, "wall_time": time.perf_counter() - start_time,
            "cost": self.cost(ph.mode), **history,
        }

    def decouple_phase(self, name: str, ckpt: checkpointing.PhaseCheckpoints, writer) -> dict:
        ph = self.config[name]
        t0 = time.perf_counter()
        coupled_model, decoupled_model = self.model("coupled"), self.model("decoupled")
        try:
            coupled_vars = self.final_variables(ph.parent)
        except UserError as e:
            raise UserError(f"phase {name!r} cannot read the coupled model it decouples: {e}") from None
        before = self.evaluate(coupled_model, coupled_vars)
        template = self.abstract_variables(decoupled_model)
        variables = sharding.put_replicated(decouple(coupled_vars, template), self.mesh)
        after = self.evaluate(decoupled_model, variables)
        image = self._put_batch(next(iter(self.data.eval_batches()))["image"])
        yc = jax.jit(coupled_model.apply)(coupled_vars, image)
        yd = jax.jit(decoupled_model.apply)(variables, image)
        rel_diff = float(jnp.max(jnp.abs(yc - yd)) / jnp.maximum(jnp.max(jnp.abs(yc)), 1e-30))
        summary = {
            "kind": "decouple", "mode": "decoupled", "label": ph.get("label") or "", "parent": ph.parent,
            "coupled_top1": before["top1"], "coupled_top5": before["top5"],
            "top1": after["top1"], "top5": after["top5"], "loss": after["loss"],
            "max_rel_logit_diff": rel_diff, "steps": 0, "wall_time": time.perf_counter() - t0,
            "cost": self.cost("decoupled"),
        }
        writer.scalars(0, {"coupled_top1": before["top1"], "decoupled_top1": after["top1"]}, prefix=f"{name}/")
        if self.progress:
            tqdm.tqdm.write(f"{name}: coupled top-1 {100 * before['top1']:.2f}% -> decoupled "
                            f"{100 * after['top1']:.2f}% (max relative logit difference {rel_diff:.1e})")
        ckpt.save(0, variables, self._meta(name, **summary))
        return summary


def run(config: ml_collections.ConfigDict, workdir: str, *, progress: bool = True) -> dict[str, Any]:
    """Runs (or resumes) every phase of ``config`` in ``workdir``; returns the results.

    The whole config is checked (data, models, optimizers) before ``workdir`` is
    touched, so a bad config leaves no trace there.
    """
    phase_names(config)
    runner = Runner(config, workdir, progress=progress)
    runner.validate()
    check_workdir(config, workdir)
    return runner.run()
