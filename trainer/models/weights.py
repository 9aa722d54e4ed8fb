"""Reading backbone weights from local files or hubs, with one-line errors.

Training nodes are often offline, so a local file is a first-class source and every
failure (missing file, failed download, keys that do not fit) says what to do next.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Mapping, TypeVar

import torch

__all__ = [
    "WEIGHT_SUFFIXES",
    "is_weights_file",
    "read_state_dict",
    "strip_common_prefix",
    "fetch_or_fail",
    "describe_mismatch",
    "load_checked",
    "select_prefix",
    "offline_requested",
    "hub_timeout",
    "ensure_reachable",
    "guard_timm_download",
    "guard_url_download",
]

# A first try that says quickly whether the hub answers at all: offline nodes would
# otherwise spend about a minute per preset in the hub client's retries.
DEFAULT_HUB_TIMEOUT_S = 5.0


WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".safetensors")
_PREFIXES = ("module.", "_orig_mod.", "model.", "backbone.", "encoder.")
T = TypeVar("T")


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".strip()


def is_weights_file(value: Any) -> bool:
    """A `pretrained` string names a file when it has a weights suffix or a path separator."""
    if not isinstance(value, (str, os.PathLike)):
        return False
    text = os.fspath(value)
    if text.startswith("hf-hub:"):
        return False
    return text.lower().endswith(WEIGHT_SUFFIXES) or os.sep in text or Path(text).exists()


def strip_common_prefix(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop wrapper prefixes (DDP `module.`, compile `_orig_mod.`, `model.`...) shared by all keys."""
    out = dict(state)
    changed = True
    while changed and out:
        changed = False
        for prefix in _PREFIXES:
            if all(k.startswith(prefix) for k in out):
                out = {k[len(prefix):]: v for k, v in out.items()}
                changed = True
    return out


def select_prefix(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Keep only `prefix.*` keys (stripped) when some keys carry it, e.g. a whole encoder's file."""
    if any(k.startswith(prefix) for k in state):
        return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return dict(state)


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a `.safetensors` or torch-pickled state dict (weights only), unwrapping checkpoints."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path), device="cpu")
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt file, wrong format
        raise ValueError(f"cannot read weights file {path}: {_one_line(exc)}") from None
    for key in ("state_dict", "model", "module"):
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
    if not isinstance(state, Mapping) or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f"weights file {path} does not hold a state dict of tensors")
    return strip_common_prefix(state)


def fetch_or_fail(what: str, fetch: Callable[[], T]) -> T:
    """Run a hub download; turn any failure into one actionable line."""
    try:
        return fetch()
    except Exception as exc:
        raise RuntimeError(
            f"could not fetch pretrained weights for {what} ({_one_line(exc)}); "
            "when offline pass a local .pth/.safetensors file as `pretrained`, or pretrained: null"
        ) from None


def offline_requested() -> bool:
    """True when the user asked for no network: ``HF_HUB_OFFLINE`` (or
    ``TRANSFORMERS_OFFLINE``) set to 1/true/yes/on, read at call time."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().lower() in ("1", "true", "yes", "on")


def hub_timeout() -> float:
    """Seconds the reachability probe waits (``STREAMLOC_HUB_TIMEOUT``, default 5)."""
    text = os.environ.get("STREAMLOC_HUB_TIMEOUT", "")
    try:
        return max(0.1, float(text)) if text else DEFAULT_HUB_TIMEOUT_S
    except ValueError:
        raise ValueError(f"STREAMLOC_HUB_TIMEOUT={text!r} is not a number of seconds") from None


_OFFLINE_HINT = "pass a local .pth/.safetensors file as `pretrained`, or pretrained: null"


def ensure_reachable(url: str, what: str) -> None:
    """One HTTP HEAD with a short timeout; any HTTP answer (even 404) counts as online.

    Raises ``RuntimeError`` (one line) when the host does not answer in time.
    """
    import urllib.error
    import urllib.request

    timeout = hub_timeout()
    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
    except urllib.error.HTTPError:
        return
    except Exception as exc:  # URLError, timeout, refused, DNS
        reason = getattr(exc, "reason", exc)
        raise RuntimeError(
            f"could not fetch pretrained weights for {what}: {url} could not be reached within "
            f"{timeout:g} s ({_one_line(reason) if isinstance(reason, BaseException) else reason}); "
            f"offline? set HF_HUB_OFFLINE=1 to fail at once, and {_OFFLINE_HINT}"
        ) from None


def _hf_cached(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    for filename in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"):
        hit = try_to_load_from_cache(repo_id, filename)
        if isinstance(hit, str) and os.path.isfile(hit):
            return True
    return False


def guard_timm_download(model_name: str) -> Callable[[Callable[[], T]], T]:
    """Check, before timm downloads ``model_name``'s weights, that it can succeed quickly.

    Cached weights load with the hub client in offline mode (no update check).
    Otherwise ``HF_HUB_OFFLINE`` fails at once, and an unreachable hub fails after
    one short probe instead of the client's retries. Returns a runner for the download.
    """
    repo_id = None
    if model_name.startswith("hf-hub:"):
        repo_id = model_name[len("hf-hub:"):].split("@")[0]
    else:
        try:
            from timm.models import get_pretrained_cfg

            cfg = get_pretrained_cfg(model_name)
            repo_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
        except Exception:
            repo_id = None
    cached = bool(repo_id) and _hf_cached(repo_id)
    if not cached:
        if offline_requested():
            raise RuntimeError(
                f"could not fetch pretrained weights for {model_name}: HF_HUB_OFFLINE is set and "
                f"{repo_id or model_name} is not in the local Hugging Face cache; {_OFFLINE_HINT}")
        try:
            from huggingface_hub import constants

            endpoint = constants.ENDPOINT
        except ImportError:
            endpoint = "https://huggingface.co"
        ensure_reachable(endpoint.rstrip("/") + "/api/models/" + (repo_id or ""), model_name)

    def run(fetch: Callable[[], T]) -> T:
        if not cached:
            return fetch_or_fail(model_name, fetch)
        from huggingface_hub import constants

        old = constants.HF_HUB_OFFLINE
        constants.HF_HUB_OFFLINE = True  # the cache is enough: no update check to time out
        try:
            return fetch_or_fail(model_name, fetch)
        finally:
            constants.HF_HUB_OFFLINE = old

    return run


def guard_url_download(url: str, what: str) -> None:
    """torchvision-style downloads to ``torch.hub``'s checkpoint folder: nothing to check
    when cached; otherwise fail at once when offline, or after one short probe."""
    filename = os.path.basename(url.split("?")[0])
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", filename)
    if os.path.isfile(cached):
        return
    if offline_requested():
        raise RuntimeError(f"could not fetch pretrained weights for {what}: HF_HUB_OFFLINE is set "
                           f"and {cached} is not cached; {_OFFLINE_HINT}")
    ensure_reachable(url, what)


def describe_mismatch(name: str, missing: list[str], unexpected: list[str], wrong: list[str] = ()) -> str:
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:3])})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:3])})")
    if wrong:
        parts.append(f"{len(wrong)} keys with other shapes (e.g. {', '.join(wrong[:3])})")
    return f"weights do not fit {name}: " + "; ".join(parts)


def load_checked(module: torch.nn.Module, state: Mapping[str, torch.Tensor], name: str, source: str) -> None:
    """Strict load that reports missing, unexpected and mis-shaped keys on one line."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        raise ValueError(f"{source}: " + describe_mismatch(name, missing, unexpected, wrong))
    module.load_state_dict(state, strict=True)
