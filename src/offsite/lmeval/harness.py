"""`offsite lm-eval ARGS`: lm-eval's own command line, with the `offsite` model type registered.

lm-eval 0.4 finds a model type only if the module defining it was imported before its CLI parses
`--model`, and it has no plugin hook for other packages; this command imports ours first, so
`offsite lm-eval run --model offsite --model_args pretrained=BUNDLE,adapter=ADAPTER --tasks ...` is
`lm_eval run --model offsite ...` with every lm-eval flag.
"""

from __future__ import annotations

import sys

from offsite.lmeval.evaluate import require_lm_eval


def run_harness(arguments: list[str]) -> int:
    """lm-eval's CLI on `arguments`; its exit status."""
    require_lm_eval("offsite lm-eval")
    import offsite.lmeval.model  # noqa: F401, PLC0415 - registers the `offsite` model type (imports lm-eval)
    from lm_eval.__main__ import cli_evaluate  # noqa: PLC0415 - lm-eval is an optional extra

    saved = sys.argv
    sys.argv = ["lm-eval", *arguments]
    try:
        cli_evaluate()
    except SystemExit as exit_:  # argparse's --help and usage errors
        return exit_.code if isinstance(exit_.code, int) else 1
    finally:
        sys.argv = saved
    return 0
