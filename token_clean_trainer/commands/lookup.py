"""
Names a user types, resolved: accelerate configs by name (ours first, then the ones TRL ships) and the "did you mean"
hint for a misspelt one.

`recipe.py` (checks) and `launch.py` (the relaunch) both need these; neither imports the other for them. Nothing heavy
is imported: `token-clean --help` must answer without torch or TRL.
"""

import difflib
import os
from importlib import resources

from ..utils import expand_path


def did_you_mean(key: str, names: list[str]) -> str:
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
    if not close:
        # a sub-string match catches the common missing prefix or suffix, e.g. `keep_ratio` -> `token_keep_ratio`
        close = sorted((n for n in names if key in n or (len(n) > 4 and n in key)), key=len)[:1]
    return f" (did you mean `{close[0]}`?)" if close else ""


def _trl_accelerate_config_folder():
    """TRL's own shipped accelerate configs (`trl/accelerate_configs/`), found without importing TRL."""
    import importlib.util

    spec = importlib.util.find_spec("trl")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = os.path.join(list(spec.submodule_search_locations)[0], "accelerate_configs")
    return folder if os.path.isdir(folder) else None


def accelerate_config_sources() -> dict[str, str]:
    """
    `{name: path}` of every accelerate config usable by name.

    Ours come first: `cpu_multi_process` (TRL has none), `single_gpu` (TRL's says 8 processes) and the sharded
    `fsdp2` and `zero3` we tune for token cleaning. Every other name resolves to the config TRL ships (`multi_gpu`,
    `zero1`, `zero2`, `fsdp1`), so a copy of TRL's file is never kept here.
    """
    sources = {}
    trl_folder = _trl_accelerate_config_folder()
    if trl_folder is not None:
        for name in sorted(os.listdir(trl_folder)):
            if name.endswith(".yaml"):
                sources[name[: -len(".yaml")]] = os.path.join(trl_folder, name)
    folder = resources.files("token_clean_trainer") / "accelerate_configs"
    for p in folder.iterdir():
        if p.name.endswith(".yaml"):
            sources[p.name[: -len(".yaml")]] = str(p)
    return dict(sorted(sources.items()))


def shipped_accelerate_configs() -> list[str]:
    """Names of the accelerate configs shipped in this package (see [`accelerate_config_sources`] for TRL's)."""
    folder = resources.files("token_clean_trainer") / "accelerate_configs"
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def resolve_accelerate_config(name_or_path: str) -> str:
    """The path of an accelerate config given its name (`zero3`: ours, then TRL's), or the given path if a file."""
    path = expand_path(name_or_path)
    if os.path.isfile(path):
        return os.path.abspath(path)

    name = name_or_path[: -len(".yaml")] if name_or_path.endswith(".yaml") else name_or_path
    sources = accelerate_config_sources()
    if name not in sources:
        known = list(sources)
        raise ValueError(
            f"{name_or_path!r} is neither a file nor a known accelerate config{did_you_mean(name, known)}; known: "
            f"{', '.join(known)}"
        )
    return sources[name]
