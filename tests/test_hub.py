"""Hub ids resolved to snapshot dirs: a real cache layout offline, a closed port, and a tiny fake hub."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import huggingface_hub.constants
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from blipkit.errors import EnvironmentProblem, UsageError
from blipkit.hub import is_hub_id, snapshot

REPO = "owner/name"
MAIN_COMMIT = "1" * 40
V1_COMMIT = "2" * 40
UNCACHED_COMMIT = "3" * 40
CLOSED_PORT = "http://127.0.0.1:9"
WEIGHT = torch.arange(6, dtype=torch.float32).reshape(2, 3)


def tiny_model_dir(path: Path, revision: str) -> Path:
    """A model dir with a ``config.json`` naming ``revision`` and a tiny ``model.safetensors``."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"model_type": "blip-2", "revision": revision}))
    save_file({"weight": WEIGHT}, str(path / "model.safetensors"))
    return path


def add_to_cache(cache: Path, repo_id: str, commit: str, model_dir: Path, refs: tuple[str, ...]) -> Path:
    """Put ``model_dir`` in ``cache`` as huggingface_hub does: blobs, a snapshot linking them, and refs."""
    repo_dir = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot_dir = repo_dir / "snapshots" / commit
    snapshot_dir.mkdir(parents=True)
    (repo_dir / "blobs").mkdir(exist_ok=True)
    for file in model_dir.iterdir():
        blob = repo_dir / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()
        shutil.copyfile(file, blob)
        link_or_copy(blob, snapshot_dir / file.name)
    (repo_dir / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (repo_dir / "refs" / ref).write_text(commit)
    return snapshot_dir


def link_or_copy(blob: Path, target: Path) -> None:
    try:
        target.symlink_to(os.path.relpath(blob, target.parent))
    except OSError:
        shutil.copyfile(blob, target)


@pytest.fixture
def hub_env(tmp_path, monkeypatch):
    """A private ``HF_HOME`` and ``HF_HUB_CACHE``, offline, with every hub address on a closed port.

    huggingface_hub reads its env vars once, at import: its constants are set here too, so nothing it does
    on the side (such as fetching its agent registry) leaves this machine.
    """
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_ENDPOINT", CLOSED_PORT)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", CLOSED_PORT)
    template = CLOSED_PORT + "/{repo_id}/resolve/{revision}/{filename}"
    monkeypatch.setattr(huggingface_hub.constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_ETAG_TIMEOUT", 2)
    monkeypatch.setattr(
        huggingface_hub.constants, "AGENT_HARNESSES_PATH", str(tmp_path / "agents.json"), raising=False
    )
    return tmp_path / "cache"


@pytest.fixture
def cached(hub_env, tmp_path):
    """``owner/name`` in the cache: ``main`` at one commit, ``v1`` at another with a different config."""
    main = add_to_cache(hub_env, REPO, MAIN_COMMIT, tiny_model_dir(tmp_path / "main", "main"), ("main",))
    v1 = add_to_cache(hub_env, REPO, V1_COMMIT, tiny_model_dir(tmp_path / "v1", "v1"), ("v1",))
    return {"main": main, "v1": v1}


def read_back(folder: Path) -> str:
    """The revision the snapshot's config names, after checking its weights load."""
    torch.testing.assert_close(load_file(str(folder / "model.safetensors"))["weight"], WEIGHT)
    return json.loads((folder / "config.json").read_text())["revision"]


def test_main_snapshot_from_the_cache(cached):
    folder = snapshot(REPO)
    assert folder == cached["main"]
    assert read_back(folder) == "main"


@pytest.mark.parametrize("revision", ["v1", V1_COMMIT])
def test_tag_or_commit_gives_its_snapshot(cached, revision):
    folder = snapshot(REPO, revision=revision)
    assert folder == cached["v1"]
    assert read_back(folder) == "v1"


def test_cached_snapshot_needs_no_hub(cached, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    started = time.monotonic()
    assert snapshot(REPO) == cached["main"]
    assert time.monotonic() - started < 5


def assert_clear_problem(problem: pytest.ExceptionInfo, *parts: str) -> None:
    message = str(problem.value)
    assert "\n" not in message
    for part in parts:
        assert part in message, f"{part!r} not in {message!r}"


def test_uncached_id_offline(cached, hub_env):
    with pytest.raises(EnvironmentProblem) as problem:
        snapshot("owner/other")
    assert problem.value.exit_code == 1
    assert_clear_problem(
        problem, "'owner/other'", "`hf download owner/other`", str(hub_env), "HF_HUB_OFFLINE=1"
    )


@pytest.mark.parametrize("revision", ["v2", UNCACHED_COMMIT])
def test_uncached_revision_offline_does_not_fall_back_to_main(cached, hub_env, revision):
    with pytest.raises(EnvironmentProblem) as problem:
        snapshot(REPO, revision=revision)
    command = f"`hf download {REPO} --revision {revision}`"
    assert_clear_problem(
        problem, f"revision '{revision}'", f"'{REPO}'", command, str(hub_env), "HF_HUB_OFFLINE"
    )


def test_unreachable_hub_is_an_environment_problem(cached, hub_env, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    started = time.monotonic()
    with pytest.raises(EnvironmentProblem) as problem:
        snapshot("owner/other")
    assert time.monotonic() - started < 15
    assert_clear_problem(
        problem, "'owner/other'", "could not be reached", CLOSED_PORT, "`hf download owner/other`"
    )


def test_invalid_id_is_a_usage_error(hub_env):
    with pytest.raises(UsageError, match="a/b/c"):
        snapshot("a/b/c")


HUB_COMMIT = "4" * 40
HUB_FILES = {
    "config.json": b'{"revision": "hub"}',
    "model.safetensors": b"safetensors weights",
    "tokenizer.model": b"tokenizer",
    "chat_template.jinja": b"{{ messages }}",
    "pytorch_model.bin": b"pickled weights",
    "model.onnx": b"onnx graph",
    "flax_model.msgpack": b"flax weights",
}


class FakeHub(BaseHTTPRequestHandler):
    """Serves ``owner/name`` at ``main``; ``owner/gated`` is gated; any other repo or revision is missing."""

    requested: list[str] = []

    def log_message(self, *args) -> None:
        pass

    def do_HEAD(self) -> None:
        self.answer(send_body=False)

    def do_GET(self) -> None:
        self.answer(send_body=True)

    def answer(self, send_body: bool) -> None:
        path = self.path.split("?")[0]
        self.requested.append(path)
        status, headers, body = self.route(path)
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if send_body:
            self.wfile.write(body)

    def route(self, path: str) -> tuple[int, dict[str, str], bytes]:
        resolve_prefix = f"/{REPO}/resolve/{HUB_COMMIT}/"
        if path in (f"/api/models/{REPO}", f"/api/models/{REPO}/revision/main"):
            return (
                200,
                {"Content-Type": "application/json"},
                json.dumps(
                    {"id": REPO, "sha": HUB_COMMIT, "siblings": [{"rfilename": n} for n in self.files()]}
                ).encode(),
            )
        if path == f"/api/models/{REPO}/tree/{HUB_COMMIT}":
            return 200, {"Content-Type": "application/json"}, json.dumps(self.tree()).encode()
        if path.startswith(resolve_prefix) and path[len(resolve_prefix) :] in self.files():
            body = self.files()[path[len(resolve_prefix) :]]
            return 200, {"X-Repo-Commit": HUB_COMMIT, "ETag": f'"{hashlib.sha1(body).hexdigest()}"'}, body
        if path.startswith("/api/models/owner/gated"):
            return 403, {"X-Error-Code": "GatedRepo"}, b"gated"
        if path.startswith(f"/api/models/{REPO}/revision/"):
            return 404, {"X-Error-Code": "RevisionNotFound"}, b"no such revision"
        return 404, {"X-Error-Code": "RepoNotFound"}, b"no such repo"

    files_served: dict[str, bytes] = HUB_FILES

    def files(self) -> dict[str, bytes]:
        return type(self).files_served

    def tree(self) -> list[dict]:
        return [
            {"type": "file", "path": name, "size": len(body), "oid": hashlib.sha1(body).hexdigest()}
            for name, body in self.files().items()
        ]


@pytest.fixture
def fake_hub(hub_env, monkeypatch):
    """The fake hub on a free local port, named by ``HF_ENDPOINT``, with ``HF_HUB_OFFLINE`` unset."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    endpoint = f"http://127.0.0.1:{server.server_port}"
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setenv("HF_TOKEN", "hf_fake")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(FakeHub, "requested", [])
    yield endpoint
    server.shutdown()
    server.server_close()
    thread.join()


def test_download_takes_model_files_only_then_works_offline(fake_hub, hub_env, monkeypatch):
    folder = snapshot(REPO)
    assert folder == hub_env / f"models--{REPO.replace('/', '--')}" / "snapshots" / HUB_COMMIT
    assert sorted(path.name for path in folder.iterdir()) == [
        "chat_template.jinja",
        "config.json",
        "model.safetensors",
        "tokenizer.model",
    ]
    downloaded = {path.rsplit("/", 1)[-1] for path in FakeHub.requested if "/resolve/" in path}
    assert downloaded == {"chat_template.jinja", "config.json", "model.safetensors", "tokenizer.model"}
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert snapshot(REPO) == folder
    assert snapshot(REPO, revision=HUB_COMMIT) == folder


def test_repo_without_safetensors_gets_its_pytorch_weights(fake_hub, monkeypatch):
    """Like the original LLaVA checkpoints: ``pytorch_model*.bin`` only, and then those are taken."""
    bin_only = {k: v for k, v in HUB_FILES.items() if k != "model.safetensors"}
    monkeypatch.setattr(FakeHub, "files_served", bin_only)
    folder = snapshot(REPO)
    assert sorted(p.name for p in folder.iterdir()) == [
        "chat_template.jinja",
        "config.json",
        "pytorch_model.bin",
        "tokenizer.model",
    ]


@pytest.mark.parametrize(
    ("repo_id", "revision", "reason"),
    [
        ("owner/missing", None, "no such repo"),
        ("owner/gated", None, "gated"),
        (REPO, "v9", "no such revision"),
    ],
)
def test_hub_refusal_is_an_environment_problem(fake_hub, hub_env, repo_id, revision, reason):
    with pytest.raises(EnvironmentProblem) as problem:
        snapshot(repo_id, revision=revision)
    parts = [f"'{repo_id}'", reason, str(hub_env)] + ([f"revision '{revision}'"] if revision else [])
    assert_clear_problem(problem, *parts)


@pytest.mark.parametrize(
    "ref", ["Salesforce/blip2-opt-2.7b", "llava-hf/llava-1.5-7b-hf", "openai/clip-vit-base-patch32"]
)
def test_hub_ids(ref, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert is_hub_id(ref)


@pytest.mark.parametrize("ref", ["default", "./a/b", "/tmp/x", "~/x", "a/b/c", "a//b", "a/b--c", "a/.b", ""])
def test_not_hub_ids(ref, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert not is_hub_id(ref)


def test_existing_relative_dir_is_not_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert is_hub_id("a/b")
    (tmp_path / "a" / "b").mkdir(parents=True)
    assert not is_hub_id("a/b")


def _build(family: str, path: Path) -> Path:
    from hf_tiny import make_blip2
    from hf_tiny_clip import make_clip
    from hf_tiny_llava import make_llava

    {"blip2": lambda: make_blip2(path, llm="opt", num_query_tokens=4), "llava": lambda: make_llava(path),
     "clip": lambda: make_clip(path)}[family]()  # fmt: skip
    return path


@pytest.mark.parametrize(
    ("family", "repo_id"),
    [("blip2", "Salesforce/tiny-blip2"), ("llava", "llava-hf/tiny-llava-hf"), ("clip", "openai/tiny-clip")],
)
def test_load_by_hub_id_offline(family, repo_id, hub_env, tmp_path):
    """``blipkit.load(id)`` and ``--model id`` read a cached model of every family with the hub offline."""
    import blipkit
    from blipkit.cli import main

    model_dir = _build(family, tmp_path / "model")
    add_to_cache(hub_env, repo_id, MAIN_COMMIT, model_dir, ("main",))
    by_id, by_dir = blipkit.load(repo_id), blipkit.load(model_dir)
    assert by_id.path == hub_env / f"models--{repo_id.replace('/', '--')}" / "snapshots" / MAIN_COMMIT
    image = np.full((40, 40, 3), 200, dtype=np.uint8)
    if family == "clip":
        torch.testing.assert_close(by_id.embed_images(image), by_dir.embed_images(image))
    else:
        assert by_id.caption(image, max_new_tokens=5) == by_dir.caption(image, max_new_tokens=5)
    with pytest.raises(EnvironmentProblem, match="acme/not-cached"):
        blipkit.load("acme/not-cached")
    assert main(["ask", str(tmp_path / "img.png"), "what ?", "--model", "acme/not-cached"]) == 1


def test_original_llava_tower_by_hub_id(hub_env, tmp_path):
    """The original LLaVA layout names its vision tower by hub id (``mm_vision_tower``): from the cache."""
    from hf_tiny_llava import make_llava_original

    import blipkit

    hf_dir = _build("llava", tmp_path / "hf")
    original = make_llava_original(tmp_path / "orig", hf_dir, image_aspect_ratio="square")
    add_to_cache(hub_env, "openai/tiny-clip-tower", MAIN_COMMIT, original / "tower", ("main",))
    config = json.loads((original / "config.json").read_text())
    config["mm_vision_tower"] = "openai/tiny-clip-tower"
    (original / "config.json").write_text(json.dumps(config))
    shutil.rmtree(original / "tower")
    image = np.full((28, 28, 3), 120, dtype=np.uint8)
    assert blipkit.load(original).ask(image, "what ?", max_new_tokens=5) == blipkit.load(hf_dir).ask(
        image, "what ?", max_new_tokens=5
    )


def test_revision_is_for_hub_ids(tmp_path):
    import blipkit
    from blipkit.errors import UsageError

    with pytest.raises(UsageError, match="revision"):
        blipkit.load("default", revision="v1")
