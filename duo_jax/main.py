r"""Runs a BinaryDuo recipe: ``python -m duo_jax.main --config=configs/NAME.py --workdir=DIR``.

With no flags it runs ``configs/quickstart.py`` into ``runs/quickstart``.
Override any config value with ``--config.KEY=VALUE`` (the config is locked:
a misspelt key is an error). Rerunning the same command resumes.
"""

from __future__ import annotations

import errno
import os
import re
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "quickstart.py")
FLAGS = flags.FLAGS


def _define_flags() -> None:
    # Defined here, not at import: ml_collections applies the --config.* overrides
    # while defining the flag, and a typo there must reach the one-line error below.
    config_flags.DEFINE_config_file("config", _DEFAULT_CONFIG, "Config file (configs/*.py[:variant]).",
                                    lock_config=True)
    flags.DEFINE_string("workdir", None, "Where checkpoints and results go (default runs/<config name>).")
    flags.DEFINE_bool("progress", True, "Show a progress bar.")
    # Several processes (README "Scaling out"); the DUO_JAX_* environment variables do the same.
    flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0, for a multi-process run.")
    flags.DEFINE_integer("num_processes", None, "Number of processes of a multi-process run.")
    flags.DEFINE_integer("process_id", None, "This process's index, 0 to num_processes - 1.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    from duo_jax import launch_env, phases, reporting  # after flags: jax starts here

    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every file it renames at INFO
    launch_env.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    config = FLAGS.config
    workdir = FLAGS.workdir or os.path.join("runs", config.get("name", "run"))
    results = phases.run(config, workdir, progress=FLAGS.progress)
    if reporting.is_lead():
        print(reporting.summary_table(results))
        print(f"results: {os.path.join(workdir, 'results.json')}, curves: {os.path.join(workdir, 'curves.png')}")


_YNN = "--xla_cpu_experimental_ynn_fusion_type=dot"


def _cpu_speed_flags() -> None:
    """XLA's YNNPACK dot fusions train these models 1.5-2x faster on CPU.

    Set before jax creates its backend; ``DUO_JAX_YNN=0`` turns it off (other
    platforms ignore it).
    """
    current = os.environ.get("XLA_FLAGS", "")
    if os.environ.get("DUO_JAX_YNN", "1") != "0" and "ynn_fusion_type" not in current:
        os.environ["XLA_FLAGS"] = f"{current} {_YNN}".strip()


def _one_line(e: BaseException) -> str:
    return " ".join(str(e.args[0] if isinstance(e, KeyError) and e.args else e).split())


def _flag_error(e: BaseException) -> str:
    """One line for a bad flag; an override naming no config key says which one and why."""
    text = _one_line(e)
    if isinstance(e, flags.IllegalFlagValueError):
        return f"{text}; give a value of the type that the config file sets for that key"
    if "No such file" in text:
        return f"{text}; check the --config path (configs/NAME.py, optionally :VARIANT)"
    unescaped = text.replace("\\'", "'").replace("\\n", " ")
    key = re.search(r"'(\w+)'", unescaped)
    if not isinstance(e, (KeyError, AttributeError)) or key is None:
        return text
    flag = next((a.split("=")[0] for a in sys.argv[1:] if a.startswith("--config.")
                 and key.group(1) in a.split("=")[0].split(".")), "--config.*")
    hint = re.search(r"Did you mean [^?]*\?", unescaped)
    hint = f" ({hint.group(0)})" if hint else ""
    return (f"{flag}: the config has no key {key.group(1)!r}{hint}; configs are locked, so an override "
            "must name a key the config file defines (check the spelling, or add the key to the config file)")


# Failures of the file system that the user can fix (as opposed to bugs).
_USER_OS_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}


def run() -> None:
    """Entry point: bad input becomes one line on stderr and exit status 2."""
    try:
        _define_flags()
        argv = FLAGS(sys.argv)
        FLAGS.config.get("name")  # loads the config file now, so that a bad path fails here
    except (flags.Error, KeyError, AttributeError, TypeError, ValueError, OSError) as e:
        print(f"error: bad flag or config: {_flag_error(e)}", file=sys.stderr)
        sys.exit(2)

    _cpu_speed_flags()
    from duo_jax.errors import UserError
    from duo_jax.train import NonFiniteLoss, Preempted

    try:
        main(argv)  # not app.run: it would parse the flags (and define the overrides) a second time
    except app.UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except (UserError, NonFiniteLoss) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except Preempted as e:
        print(str(e), file=sys.stderr)
        sys.exit(3)
    except OSError as e:
        if e.errno not in _USER_OS_ERRORS:
            raise
        print(f"error: {e.strerror}: {e.filename or 'a file of the run'}; free disk space or fix the "
              "permissions, then rerun the same command to resume", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    run()
