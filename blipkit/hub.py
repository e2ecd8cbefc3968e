"""Hugging Face hub ids (``owner/name``) resolved to local snapshot directories, from the cache first."""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import HfApi, constants, snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import validate_repo_id

from blipkit.errors import EnvironmentProblem, UsageError

MODEL_FILE_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.jinja"]
PYTORCH_BIN = "pytorch_model*.bin"  # only for repos without safetensors
SKIPPED_FILE_PATTERNS = ["*.bin", "*.pth", "*.h5", "*.msgpack", "*.onnx"]
DOWNLOAD_CLI = "hf download"
LOGIN_CLI = "hf auth login"


def is_hub_id(ref: str) -> bool:
    """Whether ``ref`` reads as a hub id ``owner/name`` rather than a local path."""
    if ref.count("/") != 1 or ref.startswith(("./", "/", "~")):
        return False
    if Path(ref).exists():
        return False
    try:
        validate_repo_id(ref)
    except HFValidationError:
        return False
    return True


def snapshot(repo_id: str, revision: str | None = None) -> Path:
    """The local snapshot dir of ``repo_id`` at ``revision`` (a branch, tag or commit; default ``main``).

    The cache is tried first; an uncached snapshot is downloaded (model files only) unless the hub is offline.
    """
    request = _HubRequest.from_environment(repo_id, revision)
    try:
        return _cached_snapshot(request)
    except LocalEntryNotFoundError as not_cached:
        offline_setting = _offline_setting()
        if offline_setting:
            raise request.not_cached(f"downloads are off ({offline_setting})") from not_cached
    files = _check_hub_has_it(request)
    return _downloaded_snapshot(request, files)


@dataclass(frozen=True)
class _HubRequest:
    """One snapshot asked for, with the cache dir and endpoint read from the environment at call time."""

    repo_id: str
    revision: str | None
    cache_dir: Path
    endpoint: str | None

    @classmethod
    def from_environment(cls, repo_id: str, revision: str | None) -> _HubRequest:
        try:
            validate_repo_id(repo_id)
        except HFValidationError as error:
            raise UsageError(f"'{repo_id}' is not a hub id like Salesforce/blip2-opt-2.7b: {error}") from None
        return cls(repo_id, revision, _cache_dir(), os.environ.get("HF_ENDPOINT") or None)

    @property
    def subject(self) -> str:
        if self.revision is None:
            return f"'{self.repo_id}'"
        return f"revision '{self.revision}' of '{self.repo_id}'"

    @property
    def download_command(self) -> str:
        command = f"{DOWNLOAD_CLI} {self.repo_id}"
        return command if self.revision is None else f"{command} --revision {self.revision}"

    def not_cached(self, reason: str) -> EnvironmentProblem:
        """The error for a snapshot that is not cached and cannot be downloaded for ``reason``."""
        return EnvironmentProblem(
            f"{self.subject} is not in the Hugging Face cache {self.cache_dir} and {reason}; "
            f"run `{self.download_command}` on a machine with network and copy its cache into "
            f"{self.cache_dir}, or pass a local model directory"
        )

    def not_on_hub(self, reason: str) -> EnvironmentProblem:
        """The error for a snapshot the hub refuses to give, for ``reason``."""
        return EnvironmentProblem(
            f"{self.subject} is not in the Hugging Face cache {self.cache_dir} and {reason}; "
            "check the id and revision, or pass a local model directory"
        )


def _cache_dir() -> Path:
    """The hub cache dir the environment names now (``HF_HUB_CACHE``, else ``HF_HOME``/hub, ...)."""
    env = os.environ
    home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    raw = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE") or os.path.join(home, "hub")
    return Path(os.path.expandvars(os.path.expanduser(raw)))


def _offline_setting() -> str | None:
    """The variable that turns the hub off now, as ``NAME=value``; ``None`` when downloads are allowed."""
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        value = os.environ.get(name)
        if value and value.upper() in constants.ENV_VARS_TRUE_VALUES:
            return f"{name}={value}"
    return None


def _snapshot_download(request: _HubRequest, *, local_files_only: bool, pytorch_bin: bool = False) -> Path:
    """``pytorch_bin``: also the ``pytorch_model*.bin`` weights (repos without safetensors, such as the
    original LLaVA's; blipkit reads them with ``torch.load(weights_only=True)``)."""
    allow = [*MODEL_FILE_PATTERNS, *([PYTORCH_BIN] if pytorch_bin else [])]
    ignore = [p for p in SKIPPED_FILE_PATTERNS if not (pytorch_bin and p == "*.bin")]
    folder = snapshot_download(
        request.repo_id,
        revision=request.revision,
        cache_dir=request.cache_dir,
        endpoint=request.endpoint,
        local_files_only=local_files_only,
        allow_patterns=allow,
        ignore_patterns=ignore,
        etag_timeout=constants.HF_HUB_ETAG_TIMEOUT,
    )
    return Path(folder)


def _cached_snapshot(request: _HubRequest) -> Path:
    """The cached snapshot; raises ``LocalEntryNotFoundError`` when it is not (fully) cached."""
    return _snapshot_download(request, local_files_only=True)


def _check_hub_has_it(request: _HubRequest) -> list[str]:
    """Ask the hub (with a timeout) for the repo at the revision: its file names; a clear error when it
    cannot."""
    with _hub_errors_explained(request):
        info = HfApi(endpoint=request.endpoint).repo_info(
            request.repo_id, revision=request.revision, timeout=constants.HF_HUB_ETAG_TIMEOUT
        )
    return [s.rfilename for s in (getattr(info, "siblings", None) or [])]


def _downloaded_snapshot(request: _HubRequest, files: list[str]) -> Path:
    pytorch_bin = not any(f.endswith(".safetensors") for f in files)
    with _hub_errors_explained(request):
        return _snapshot_download(request, local_files_only=False, pytorch_bin=pytorch_bin)


@contextmanager
def _hub_errors_explained(request: _HubRequest) -> Iterator[None]:
    """Turn the errors of a hub call into an ``EnvironmentProblem`` that says what to do."""
    try:
        yield
    except Exception as error:
        problem = _hub_problem(request, error)
        if problem is None:
            raise
        raise problem from error


def _hub_problem(request: _HubRequest, error: Exception) -> EnvironmentProblem | None:
    """The ``EnvironmentProblem`` that explains a failed hub call; ``None`` for an error not of the hub."""
    hub = request.endpoint or constants.ENDPOINT
    if isinstance(error, OfflineModeIsEnabled):
        return request.not_cached("downloads are off (HF_HUB_OFFLINE was set when huggingface_hub loaded)")
    if isinstance(error, GatedRepoError):
        return request.not_on_hub(f"the hub says the repo is gated (accept its terms, then `{LOGIN_CLI}`)")
    if isinstance(error, RepositoryNotFoundError):
        return request.not_on_hub(f"the hub has no such repo, or it is private (`{LOGIN_CLI}` if yours)")
    if isinstance(error, RevisionNotFoundError):
        return request.not_on_hub("the hub has no such revision")
    if isinstance(error, HfHubHTTPError) and error.response is not None:
        return request.not_cached(f"the hub {hub} answered HTTP {error.response.status_code}")
    if isinstance(error, (LocalEntryNotFoundError, *_transport_errors())):
        return request.not_cached(f"the hub {hub} could not be reached ({type(error).__name__})")
    return None


def _transport_errors() -> tuple[type[Exception], ...]:
    """The exceptions of huggingface_hub's HTTP client (httpx2 or httpx) for a network that fails."""
    errors: list[type[Exception]] = [ConnectionError, TimeoutError]
    for client in ("httpx2", "httpx"):
        try:
            errors.append(importlib.import_module(client).TransportError)
        except ImportError:
            continue
    return tuple(errors)
