"""Where models and data come from: the one resolver of the `embedded:` sentinels and the one dataset loader.

Every path that takes a model, a chat template or a dataset by name goes through here: a recipe's
`model_name_or_path`, `ref_model_name_or_path`, `chat_template_path`, `dataset_name` or `datasets:` mixture
(`token-clean train`, `score`, `purge-mix`), `token-clean eval`, purge-mix's own inputs and the demo. A name is

- `embedded:smollm2` or `embedded:chatterbot`: the packaged offline default ([`assets`] builds both);
- a local `save_to_disk` folder or a `.json`/`.jsonl`/`.parquet`/`.csv` file (its one split is `train`);
- a Hub id (`org/name`), read through the local cache when runs are offline.

`~` and environment variables are expanded in local paths. Nothing heavy is imported at the top.
"""

import dataclasses
import os
from importlib import resources

from .assets import EMBEDDED_DATASET, EMBEDDED_MODEL
from .utils import expand_path

EMBEDDED_MODELS = (EMBEDDED_MODEL,)
EMBEDDED_DATASETS = (EMBEDDED_DATASET,)
# Chat templates shipped with the package, usable by name in `chat_template_path`.
NAMED_CHAT_TEMPLATES = ("tulu",)
LOCAL_DATA_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


def looks_local(value: str) -> bool:
    """A local path rather than a Hub id (`org/name`): write local folders as `./data/...` to be unambiguous."""
    return value.startswith((".", "/", "~")) or value.count("/") > 1 or os.path.exists(value)


def resolve_model(value: str | None) -> str | None:
    """A model reference with the `embedded:smollm2` sentinel replaced by the converted local folder."""
    if value in EMBEDDED_MODELS:
        from .assets import default_model_path

        return default_model_path()
    return expand_path(value)


def resolve_chat_template(value: str | None) -> str | None:
    """`chat_template_path` with a shipped template name (`tulu`) replaced by the packaged `.jinja` file."""
    if value in NAMED_CHAT_TEMPLATES:
        return str(resources.files("token_clean_trainer") / "chat_templates" / f"{value}.jinja")
    return expand_path(value)


def load_recipe_dataset(script, splits: list[str], mixture=None):
    """
    Load a recipe's dataset (its `ScriptArguments` and `DatasetMixtureConfig`) and return `{split: Dataset}` for the
    requested splits.

    The one loader of `train`, `score`, `eval` and `purge-mix`. With a `datasets:` mixture ([`~trl.DatasetMixtureConfig`])
    the data comes from TRL's own [`~trl.get_dataset`], exactly as `trl sft` loads it (`streaming`, `fraction`,
    `test_split_size`). Otherwise `dataset_name` may be `embedded:chatterbot`, a `save_to_disk` folder, a local
    `.json`/`.jsonl`/`.parquet`/`.csv` file (one split, `train`) or a Hub id (loaded with `datasets.load_dataset`).
    `dataset_streaming: true` returns `IterableDataset`s (plain SFT only; see `commands.recipe.check_recipe`). `~` and
    environment variables are expanded in local paths.
    """
    from datasets import Dataset

    data, name, streaming, _ = load_dataset_dict(script, mixture)
    out = {}
    for split in splits:
        if split not in data:
            raise ValueError(
                f"`{split}` is not a split of {name if name.startswith('the ') else f'`dataset_name: {name}`'}; its "
                f"splits are {list(data)}. Set `dataset_train_split` / `dataset_test_split` / `ref_warmup_split` to "
                "one of them."
            )
        split_data = data[split]
        if streaming and isinstance(split_data, Dataset):
            split_data = split_data.to_iterable_dataset()  # embedded or `save_to_disk` data, streamed as asked
        out[split] = split_data
    return out


def load_dataset_dict(script, mixture=None):
    """
    `(DatasetDict, description, streaming, single)` of a recipe's data. `single` is True when the source has no splits
    of its own (a data file or a saved `Dataset`), which then becomes split `train`.
    """
    from datasets import Dataset, DatasetDict, IterableDataset, IterableDatasetDict, load_dataset, load_from_disk

    if mixture is not None and mixture.datasets:
        from trl import get_dataset

        entries = [
            dataclasses.replace(
                entry,
                path=expand_path(entry.path),
                data_dir=expand_path(entry.data_dir),
                data_files=_expand_data_files(entry.data_files),
            )
            for entry in mixture.datasets
        ]
        streaming = bool(mixture.streaming or script.dataset_streaming)
        data = get_dataset(dataclasses.replace(mixture, datasets=entries, streaming=streaming))
        name = "the `datasets:` mixture"
    else:
        streaming = bool(script.dataset_streaming)
        name = script.dataset_name
        if not name:
            raise ValueError(
                "`dataset_name` is required (a Hub id, a local .json/.jsonl/.parquet/.csv file, a `save_to_disk` "
                "folder, or `embedded:chatterbot`), or a `datasets:` list (TRL's dataset mixture)."
            )
        path = expand_path(name)
        if name in EMBEDDED_DATASETS:
            from .assets import load_chatterbot_dataset

            data = load_chatterbot_dataset()
        elif os.path.isdir(path) and (
            os.path.isfile(os.path.join(path, "dataset_dict.json")) or os.path.isfile(os.path.join(path, "state.json"))
        ):
            data = load_from_disk(path)
        elif os.path.isfile(path):
            extension = os.path.splitext(path)[1]
            if extension not in LOCAL_DATA_FORMATS:
                raise ValueError(
                    f"`dataset_name: {name}`: unsupported file type {extension!r}; use one of "
                    f"{sorted(LOCAL_DATA_FORMATS)} or a `save_to_disk` folder."
                )
            data = load_dataset(LOCAL_DATA_FORMATS[extension], data_files=path, streaming=streaming)
        elif looks_local(path):
            raise FileNotFoundError(
                f"`dataset_name: {name}` not found (no such file or folder). Point it to a `save_to_disk` folder, a .json/.jsonl/.parquet/"
                ".csv file, a Hub id (`org/name`), or `embedded:chatterbot`."
            )
        else:
            data = load_dataset(name, name=script.dataset_config, streaming=streaming)
    single = isinstance(data, (Dataset, IterableDataset)) or (
        not (mixture is not None and mixture.datasets) and os.path.isfile(expand_path(name))
    )
    if isinstance(data, Dataset):
        data = DatasetDict({"train": data})
    elif isinstance(data, IterableDataset):
        data = IterableDatasetDict({"train": data})
    return data, name, streaming, single


def load_split(spec: str, split: str = "train", config_name: str | None = None, what: str = "--split"):
    """
    One split of a dataset named as a recipe's `dataset_name` ([`load_dataset_dict`]): `embedded:chatterbot`, a
    `save_to_disk` folder, a local `.json`/`.jsonl`/`.parquet`/`.csv` file (its one split, whatever `split` says) or a
    Hub id. `what` names the option in the error when the split does not exist.
    """
    from types import SimpleNamespace

    script = SimpleNamespace(dataset_name=spec, dataset_config=config_name, dataset_streaming=False)
    data, _, _, single = load_dataset_dict(script)
    if single:
        return data["train"]
    if split not in data:
        raise ValueError(f"`{what} {split!r}` is not in {spec!r}; its splits are {sorted(data)}.")
    return data[split]


def _expand_data_files(value):
    if isinstance(value, str):
        return expand_path(value)
    if isinstance(value, list):
        return [expand_path(v) for v in value]
    if isinstance(value, dict):
        return {k: _expand_data_files(v) for k, v in value.items()}
    return value


def take_rows(dataset, rows: int, seed: int | None):
    """The first `rows` rows (after a seeded shuffle when `seed` is set); all of them when `rows` is 0."""
    from datasets import IterableDataset

    if isinstance(dataset, IterableDataset):  # streamed: a shuffle buffer and `take`, never a full read
        if seed is not None:
            dataset = dataset.shuffle(seed=seed, buffer_size=10_000)
        return dataset.take(rows) if rows else dataset
    if seed is not None:
        dataset = dataset.shuffle(seed=seed)
    if rows and rows < len(dataset):
        dataset = dataset.select(range(rows))
    return dataset
