"""``spannorm eval --lm-eval``: lm-eval-harness tasks on a run or an exported Hugging Face folder.

The model runs through lm-eval's own Hugging Face model class (``HFLM``, lm-eval's ``hf``) with
``pretrained=`` the folder (a run directory is exported to a temporary one first): lm-eval loads it
with ``AutoModelForCausalLM``, which knows ``model_type: spannorm`` because this module imports
``spannorm.hf``. The tokenizer is handed over ready for lm-eval, which needs two tokens that a byte
run's tokenizer lacks: a prefix token (what an empty context is scored after: ``<|endoftext|>``,
BPE's document separator, or the newline, a byte run's) and a padding token (the one token of that
prefix: right padding of a causal model is never attended to, and our model refuses padding masks).

Tasks are looked up in spannorm's own (``eval_tasks/``: ``spannorm_spelling``, data shipped, no hub
access), in ``include_path`` (the user's task YAML directory), then in lm-eval's registry.
"""

from __future__ import annotations

import contextlib
import importlib.util
import tempfile
from pathlib import Path

import yaml

from .config import ConfigError, short
from .files import temp_dir
from .run_config import load_config

TASKS_DIR = Path(__file__).parent / "eval_tasks"  # lm-eval tasks shipped with spannorm


def _lm_eval():
    """lm-eval's modules, with a one-line error when it is not installed (an optional dependency: only
    this command needs it, and it pulls in datasets, pandas and scikit-learn)."""
    if importlib.util.find_spec("lm_eval") is None:
        raise ConfigError("--lm-eval needs lm-eval: pip install 'spannorm[eval]'")
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    return lm_eval, HFLM, TaskManager


class _TaskLoader(yaml.SafeLoader):
    """YAML as lm-eval reads a task file: its tags (``!function utils.process``) are accepted, not run."""


_TaskLoader.add_multi_constructor("!", lambda loader, suffix, node: None)


def unreadable_task_file(include_path: Path) -> None:
    """A ConfigError naming the first task YAML under ``include_path`` that is not YAML."""
    for path in sorted(include_path.rglob("*.yaml")):
        try:
            yaml.load(path.read_text(encoding="utf-8"), Loader=_TaskLoader)
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
            reason = short(" ".join(str(e).split()) or type(e).__name__, 200)
            raise ConfigError(
                f"--include-path: the task file {str(path)!r} cannot be read ({reason}): lm-eval would skip it; fix "
                "its YAML"
            ) from None


def task_manager(tasks: list[str], include_path: Path | None = None):
    """An lm-eval TaskManager that knows every name in ``tasks``, or a ConfigError naming the unknown
    ones. lm-eval's own registry (thousands of YAML files, slow to index) is read only when a task is
    not found in spannorm's or in ``include_path``."""
    _, _, TaskManager = _lm_eval()
    paths = [str(TASKS_DIR)]
    if include_path is not None:
        if not Path(include_path).is_dir():
            raise ConfigError(
                f"--include-path {str(include_path)!r} is not a directory: expected a folder of task YAML"
            )
        paths.append(str(include_path))
    manager = TaskManager(include_path=paths, include_defaults=False)
    if not set(tasks) <= set(manager.all_tasks):
        if include_path is not None:
            unreadable_task_file(Path(include_path))  # (lm-eval skips such a file: its task would be "unknown")
        manager = TaskManager(include_path=paths)
    unknown = sorted(set(tasks) - set(manager.all_tasks))
    if unknown:
        raise ConfigError(
            f"--lm-eval: unknown task {', '.join(unknown)}: expected spannorm_spelling, a task of lm-eval, "
            "or one defined in --include-path DIR"
        )
    return manager


def lm_eval_tokenizer(folder: Path):
    """The folder's tokenizer with the prefix and padding tokens lm-eval needs: (tokenizer, prefix id)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    prefix = tokenizer.eos_token_id
    if prefix is None:  # the byte tokenizer: documents are joined by a blank line
        prefix = tokenizer("\n", add_special_tokens=False).input_ids[-1]
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(prefix)
    return tokenizer, prefix


@contextlib.contextmanager
def hf_folder(path: Path):
    """``path`` if it is a Hugging Face folder; a run directory's export in a temporary folder otherwise."""
    from . import hf  # (here: spannorm.hf imports transformers, an optional dependency)

    if (Path(path) / "config.json").is_file():
        yield Path(path)
        return
    with temp_dir(Path(tempfile.gettempdir()), "spannorm-lm-eval") as tmp:  # (one a kill left: deleted)
        yield hf.export(path, Path(tmp) / "hf")


def evaluate(
    path: Path,
    tasks: list[str],
    include_path: Path | None = None,
    limit: int | None = None,
    batch_size: int = 16,
    device: str = "cpu",
    max_length: int | None = None,
) -> dict:
    """lm-eval's result of ``tasks`` on the run or Hugging Face folder ``path``: ``simple_evaluate``'s
    dict (``results``: {task: {"acc,none": …, "acc_stderr,none": …}}, ``configs``, ``versions``, …).
    ``max_length``: the longest context (default: the run's train.seq_len, when known); ``limit``: score
    only the first N items of each task."""
    from . import hf  # (here: spannorm.hf imports transformers, an optional dependency)

    lm_eval, HFLM, _ = _lm_eval()
    manager = task_manager(tasks, include_path)
    with hf_folder(path) as folder:
        if max_length is None and (folder / hf.RUN_FILE).is_file():
            max_length = load_config(folder / hf.RUN_FILE).train.seq_len
        tokenizer, prefix = lm_eval_tokenizer(folder)
        model = HFLM(
            pretrained=str(folder),
            tokenizer=tokenizer,
            prefix_token_id=prefix,
            max_length=max_length,
            batch_size=batch_size,
            device=device,
        )
        return lm_eval.simple_evaluate(model=model, tasks=tasks, task_manager=manager, limit=limit, log_samples=False)


def table(result: dict) -> str:
    """lm-eval's Markdown table of an :func:`evaluate` result."""
    from lm_eval.utils import make_table  # (evaluate found lm-eval installed)

    return make_table(result)
