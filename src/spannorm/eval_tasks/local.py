"""Loader of the lm-eval tasks shipped with spannorm: their data are JSONL files beside their YAML.

A task names it in its YAML (``custom_dataset: !function local.load_jsonl`` with ``dataset_kwargs:
{file: NAME.jsonl}``): lm-eval resolves ``!function`` relative to the YAML file, and the data are
read from this folder, whatever the working directory, with no hub access.
"""

import json
from pathlib import Path


def load_jsonl(file: str, **metadata):
    """{"test": the rows of ``file``} as a ``datasets.DatasetDict`` (``metadata``: lm-eval passes the
    task's metadata too; unused)."""
    import datasets  # lm-eval's own dependency: this module runs only inside lm-eval

    lines = (Path(__file__).parent / file).read_text().splitlines()
    return datasets.DatasetDict({"test": datasets.Dataset.from_list([json.loads(line) for line in lines])})
