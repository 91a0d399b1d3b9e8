r"""Exports a run's fine-tuned binary model as packed bits.

::

    python -m duo_jax.export --workdir=RUN [--phase=finetune] [--check_images=-1]

reads the final variables of the run's decoupled training phase (the last one
in ``config.phases``, ``finetune`` in the recipe) and writes::

    RUN/export/
      model.npz     every array (numpy .npz, no pickle: np.load(allow_pickle=False))
      export.json   the model (family, mode, options), every binary layer and
                    folded BatchNorm, the sizes, and the check against the float model

Binary layers are stored as their kernels' sign bits in ``uint32`` words with
their scales, each BatchNorm + binary activation after one as an int32
threshold and an int8 sign per feature (:mod:`duo_jax.bitpack`), the float
layers as they are. :func:`load` reads it back; ``bitpack.forward(model,
packed)`` runs it. The export runs the packed and the float forward over the
run's eval split (``--check_images``; 0 skips) and records their agreement.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from duo_jax import bitpack, models
from duo_jax.errors import UserError

FORMAT = "duo_jax.packed/1"
ARRAYS, META = "model.npz", "export.json"


def _model_from_spec(spec: dict[str, Any]):
    opts = dict(spec.get("options", {}))
    if isinstance(opts.get("dtype"), str):
        opts["dtype"] = jnp.dtype(opts["dtype"])
    if opts.get("widths") is not None:
        opts["widths"] = tuple(opts["widths"])
    return models.create_model(spec["name"], mode=spec["mode"], num_classes=int(spec["num_classes"]), **opts)


def _pick_phase(config: ml_collections.ConfigDict, phase: str | None) -> str:
    from duo_jax import phases

    names = phases.phase_names(config)
    if phase:
        if phase not in names:
            raise UserError(f"the run has no phase {phase!r}; its phases: {', '.join(names)}")
        if config[phase].get("mode") not in ("binary", "decoupled"):
            raise UserError(f"phase {phase!r} trains a {config[phase].get('mode')!r} model; "
                            "only a binary or decoupled model exports as bits")
        return phase
    trained = [n for n in names if config[n].kind == "train" and config[n].mode == "decoupled"]
    if not trained:
        raise UserError("the run has no decoupled training phase (finetune); pass --phase=NAME of a binary "
                        "or decoupled phase")
    return trained[-1]


def _check(model, variables, packed_model, packed: bitpack.PackedModel, batches, limit: int) -> dict[str, Any]:
    """Float eval forward vs packed forward on up to ``limit`` eval images (-1: all)."""
    float_fn = jax.jit(lambda v, x: model.apply(v, x, train=False))
    packed_fn = bitpack.forward(packed_model, packed)
    count = agree = 0
    max_abs = max_rel = 0.0
    for batch in batches:
        keep = batch["mask"] > 0
        if limit >= 0:
            keep &= np.cumsum(keep) <= limit - count
        if not keep.any():
            break
        x = jnp.asarray(batch["image"])
        yf, yp = np.asarray(float_fn(variables, x))[keep], np.asarray(packed_fn(x))[keep]
        count += int(keep.sum())
        agree += int(np.sum(yf.argmax(-1) == yp.argmax(-1)))
        diff = np.abs(yf - yp).max(axis=-1)
        max_abs = max(max_abs, float(diff.max()))
        max_rel = max(max_rel, float(np.max(diff / np.maximum(np.abs(yf).max(axis=-1), 1e-30))))
    return {"images": count, "argmax_agreement": agree / count if count else None,
            "max_abs_logit_diff": max_abs, "max_rel_logit_diff": max_rel}


def save(packed: bitpack.PackedModel, directory: str, meta: dict[str, Any]) -> dict[str, Any]:
    """Writes ``model.npz`` and ``export.json`` (``meta`` plus layers and sizes) into ``directory``.

    Returns:
      The JSON written.
    """
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, ARRAYS)
    tmp = path + ".tmp.npz"
    np.savez(tmp, **packed.arrays)
    os.replace(tmp, path)
    layers = {}
    binary_float = binary_packed = 0
    for name, spec in packed.layers.items():
        entry = dict(spec)
        if spec["kind"] == "binary":
            entry["float_bytes"] = 4 * int(np.prod(spec["kernel_shape"]))
            entry["packed_bytes"] = int(packed.arrays[f"binary/{name}/bits"].nbytes)
            entry["ratio"] = entry["float_bytes"] / entry["packed_bytes"]
            binary_float += entry["float_bytes"]
            binary_packed += entry["packed_bytes"]
        layers[name] = entry
    file_bytes = os.path.getsize(path)
    float_bytes = int(meta.get("float_bytes", 0))
    out = {
        "format": FORMAT, **meta, "file": ARRAYS, "file_bytes": file_bytes,
        "payload_bytes": int(sum(a.nbytes for a in packed.arrays.values())),
        "ratio": float_bytes / file_bytes if float_bytes else None,
        "binary_layers": {"float_bytes": binary_float, "packed_bytes": binary_packed,
                          "ratio": binary_float / binary_packed if binary_packed else None},
        "layers": layers,
    }
    _write_json(os.path.join(directory, META), out)
    return out


def _write_json(path: str, data: dict[str, Any]) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
    os.replace(path + ".tmp", path)


def load(directory: str):
    """Reads an export: ``(model, packed, meta)``; arrays are read without unpickling.

    Raises:
      UserError: the directory holds no export of this format.
    """
    meta_path = os.path.join(directory, META)
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"no readable export in {directory} ({META}: {e}); run python -m duo_jax.export") from None
    if meta.get("format") != FORMAT:
        raise UserError(f"{meta_path} is not a {FORMAT} export (format {meta.get('format')!r})")
    with np.load(os.path.join(directory, ARRAYS), allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    layers = {k: {f: v for f, v in spec.items() if f not in ("float_bytes", "packed_bytes", "ratio")}
              for k, spec in meta["layers"].items()}
    return _model_from_spec(meta["model"]), bitpack.PackedModel(arrays, layers), meta


def export_run(workdir: str, phase: str | None = None, check_images: int = -1,
               log: Callable[[str], None] = print) -> dict[str, Any]:
    """Exports phase ``phase`` (default: the last decoupled training phase) of the run in ``workdir``.

    Raises:
      UserError: no run there, the phase is not complete, or its model cannot
        be packed (float weights in its binary layers: ``binarize_weights``).
    """
    from duo_jax import phases, reporting

    saved = reporting.read_json(os.path.join(workdir, "config.json"))
    if saved is None:
        raise UserError(f"no run in {workdir} (config.json not found); pass the --workdir of a duo_jax.main run")
    config = ml_collections.ConfigDict(saved)
    name = _pick_phase(config, phase)
    runner = phases.Runner(config, workdir, progress=False)
    model = runner.model(config[name].mode)
    if not getattr(model, "binarize_weights", True):
        raise UserError(f"phase {name!r} of this run has float weights in its binary-activation layers (model "
                        "option binarize_weights is off); only binarized weights export as bits: train with "
                        "--config.model.options.binarize_weights=True")
    with runner.checkpoints(name) as ckpt:
        if not ckpt.is_complete():
            raise UserError(f"phase {name!r} of this run is not complete; finish it with duo_jax.main first")
    variables = jax.device_get(runner.final_variables(name))
    shape = tuple(runner.data.info.image_shape)
    sample = next(iter(runner.data.eval_batches()))["image"][:16]
    packed = bitpack.pack(model, variables, sample)
    spec = {"name": config.model.name, "mode": config[name].mode, "num_classes": runner.data.info.num_classes,
            "options": json.loads(config.model.get("options", ml_collections.ConfigDict()).to_json_best_effort())}
    meta = {"phase": name, "model": spec, "input_shape": list(shape),
            "float_bytes": 4 * sum(int(np.size(a)) for a in jax.tree_util.tree_leaves(variables)), "check": None}
    directory = os.path.join(workdir, "export")
    out = save(packed, directory, meta)
    if check_images:  # what is on disk, read back, against the float model
        loaded_model, loaded, _ = load(directory)
        out["check"] = _check(model, variables, loaded_model, loaded, runner.data.eval_batches(), check_images)
        _write_json(os.path.join(directory, META), out)
    b = out["binary_layers"]
    count = sum(s["kind"] == "binary" for s in out["layers"].values())
    log(f"{name}: {count} binary layers "
        f"packed {b['float_bytes']:,} -> {b['packed_bytes']:,} bytes ({b['ratio']:.1f}x); "
        f"file {out['file_bytes']:,} bytes vs float {out['float_bytes']:,} ({out['ratio']:.1f}x smaller)")
    check = out["check"]
    if check:
        log(f"check on {check['images']} eval images: argmax agreement {100 * check['argmax_agreement']:.2f}%, "
            f"max |logit difference| {check['max_abs_logit_diff']:.2e} "
            f"(relative {check['max_rel_logit_diff']:.1e})")
    log(f"wrote {os.path.join(workdir, 'export', ARRAYS)} and {META}")
    return out


def main() -> None:
    """Entry point: bad input is one line on stderr and exit status 2."""
    from absl import flags

    flags.DEFINE_string("workdir", None, "The run to export (the --workdir of duo_jax.main).")
    flags.DEFINE_string("phase", None, "Phase to export (default: the last decoupled training phase).")
    flags.DEFINE_integer("check_images", -1, "Eval images to compare packed and float forwards on (-1: all, 0: none).")
    try:
        argv = flags.FLAGS(sys.argv)
        if len(argv) > 1:
            raise UserError(f"unexpected arguments: {' '.join(argv[1:])}")
        if not flags.FLAGS.workdir:
            raise UserError("--workdir is required: the directory of a duo_jax.main run")
    except (flags.Error, UserError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        sys.exit(2)
    try:
        export_run(flags.FLAGS.workdir, flags.FLAGS.phase, flags.FLAGS.check_images)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
