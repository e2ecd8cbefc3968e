"""int8 frozen towers: which layers are quantized (not the output head, not those whose inputs carry
outliers), what stays untouched (Q-Former, bridge), answers kept on the default model, and clear errors for
modes this machine cannot run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hf_tiny import make_blip2
from torch import nn

import blipkit
from blipkit.cli import main
from blipkit.errors import EnvironmentProblem, UsageError
from blipkit.models.quantize import check_mode, frozen_linears, outlier_ratios, quantize

Dynamic = torch.ao.nn.quantized.dynamic.Linear
IMAGE = Path(__file__).resolve().parents[1] / "examples" / "red_circle.png"


@pytest.fixture(scope="module", params=["opt", "llama"])
def tiny(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(f"quantize-{request.param}")
    make_blip2(path, llm=request.param, num_query_tokens=4)
    return path


def test_int8_quantizes_the_frozen_towers_only(tiny):
    ref = blipkit.load(tiny)
    q = blipkit.load(tiny, quantize="int8")
    head = q.model.llm.get_output_embeddings()
    assert isinstance(head, nn.Linear)  # the output head stays fp32
    llm_layers = [m for m in q.model.llm.modules() if isinstance(m, Dynamic)]
    vision_layers = [m for m in q.model.vision.modules() if isinstance(m, Dynamic)]
    assert llm_layers and vision_layers
    assert not any(isinstance(m, Dynamic) for m in q.model.qformer.modules())
    trained = {k: v for k, v in ref.model.state_dict().items() if k.split(".")[0] in ("qformer", "bridge")}
    for k, v in q.model.state_dict().items():
        if k in trained:
            torch.testing.assert_close(v, trained[k], rtol=0, atol=0)
    torch.manual_seed(0)
    pixels = torch.randn(2, 3, 28, 28)
    prompts = [ref.text.prompt("a photo of", 5)] * 2
    with torch.no_grad():  # 8-bit error on a 32-wide random model: close, not equal
        a = ref.model.llm(inputs_embeds=ref.llm_inputs(pixels, prompts).embeds).logits
        b = q.model.llm(inputs_embeds=q.llm_inputs(pixels, prompts).embeds).logits
    assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.95
    assert len(q.caption(pixels, max_new_tokens=3)) == 2


def test_layers_with_input_outliers_stay_fp32():
    torch.manual_seed(0)
    tower = nn.ModuleDict({"a": nn.Linear(256, 8), "b": nn.Linear(256, 8)})
    plain, spiky = torch.randn(32, 256), torch.randn(32, 256)
    spiky[:, 3] *= 500  # one huge channel, as in some LLM down-projections

    def calibrate():
        tower["a"](plain)
        tower["b"](spiky)

    ratios = outlier_ratios(frozen_linears({"t": tower}), calibrate)
    assert ratios["t.b"] > 20 > ratios["t.a"]
    reference = tower["a"](plain).detach()
    done = quantize({"t": tower}, "int8", calibrate)
    assert done.quantized == ["t.a"] and done.kept == ["t.b"]
    assert isinstance(tower["a"], Dynamic) and isinstance(tower["b"], nn.Linear)
    torch.testing.assert_close(tower["a"](plain), reference, rtol=0.05, atol=0.05)


def test_unreached_and_kept_layers_are_not_quantized():
    towers = {"t": nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))}
    done = quantize(towers, "int8", lambda: towers["t"][0](torch.randn(3, 4)), keep=set())
    assert done.quantized == ["t.0"] and done.kept == ["t.1"]  # t.1 never ran: nothing says it is safe


@pytest.mark.parametrize(
    ("mode", "device", "dtype", "error", "words"),
    [
        ("int4", None, None, UsageError, "int8, 8bit, 4bit"),
        ("int8", "cuda", None, UsageError, "8bit or 4bit"),
        ("int8", None, torch.bfloat16, UsageError, "fp32"),
        ("8bit", None, None, UsageError, "--device cuda"),
        ("4bit", "cpu", None, UsageError, "--quantize int8"),
    ],
)
def test_modes_this_setup_cannot_run_are_refused(mode, device, dtype, error, words):
    with pytest.raises(error, match=words):
        check_mode(mode, device, dtype)


def test_bitsandbytes_missing_names_the_extra():
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        with pytest.raises(EnvironmentProblem, match=r"blipkit\[cuda\]"):
            check_mode("8bit", "cuda", None)
    else:
        pytest.skip("bitsandbytes is installed")


def test_cli_refuses_before_loading(capsys):
    assert main(["caption", str(IMAGE), "--quantize", "4bit"]) == 2
    assert "needs a CUDA device" in capsys.readouterr().err
    assert main(["caption", str(IMAGE), "--quantize", "int8", "--dtype", "bf16"]) == 2


def test_default_model_keeps_its_captions_in_int8():
    import easy_vqa

    paths = easy_vqa.get_test_image_paths()
    files = [paths[i] for i in sorted(paths)[:24]]
    ref = blipkit.load("default")
    q = blipkit.load("default", quantize="int8")
    assert q.caption(files, max_new_tokens=8) == ref.caption(files, max_new_tokens=8)


def test_caption_job_loads_int8(opt_dir, tmp_path, capsys):
    out = tmp_path / "captions.jsonl"
    args = ["--model", str(opt_dir), "--max-new-tokens", "3", "--workers", "0", "--out", str(out)]
    assert main(["caption", str(IMAGE), "--quantize", "int8", *args]) == 0
    assert len(out.read_text().splitlines()) == 1


def test_llava_int8_answers(tmp_path):
    from hf_tiny_llava import make_llava

    make_llava(tmp_path / "llava")
    q = blipkit.load(tmp_path / "llava", quantize="int8")
    assert any(isinstance(m, Dynamic) for m in q.model.llm.modules())
    assert isinstance(q.model.llm.get_output_embeddings(), nn.Linear)
    assert isinstance(q.ask(IMAGE, "what is it?", 3), str)
