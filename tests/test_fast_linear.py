"""Frozen linear layers through oneDNN with packed weights (blipkit.models.fast_linear)."""

from __future__ import annotations

import copy
import json
import pickle

import pytest
import torch
from torch import nn

import blipkit
from blipkit.models import fast_linear
from blipkit.models.fast_linear import PackedLinear, accelerate

pytestmark = pytest.mark.skipif(not fast_linear.packing_available(), reason="torch build without oneDNN")


class TiedNet(nn.Module):
    """Embedding -> two linear layers -> an output head tied to the embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.up = nn.Linear(16, 40)
        self.down = nn.Linear(40, 16, bias=False)
        self.head = nn.Linear(16, 50, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.down(torch.relu(self.up(self.emb(ids)))))


@pytest.fixture
def net() -> TiedNet:
    torch.manual_seed(0)
    return TiedNet().requires_grad_(False).eval()


IDS = torch.randint(0, 50, (3, 7), generator=torch.Generator().manual_seed(1))


def test_packed_layers_compute_what_the_dense_ones_do(net):
    ref, state = net(IDS), copy.deepcopy(net.state_dict())
    assert accelerate(net, "onednn", pack_after=1) == 3
    assert all(isinstance(m, PackedLinear) for m in (net.up, net.down, net.head))
    torch.testing.assert_close(net(IDS), ref, rtol=1e-5, atol=1e-5)
    x = torch.randn(5, 16)
    torch.testing.assert_close(net.up(x), x @ state["up.weight"].T + state["up.bias"], rtol=1e-5, atol=1e-5)


def test_state_dict_copies_and_pickles_are_unchanged(net):
    state = copy.deepcopy(net.state_dict())
    accelerate(net, "onednn", pack_after=1)
    after = net.state_dict()
    assert sorted(after) == sorted(state)
    for key, value in state.items():
        assert torch.equal(after[key], value), key
    assert net.head.weight is net.emb.weight  # the tie holds
    ref = net(IDS)
    for other in (copy.deepcopy(net), pickle.loads(pickle.dumps(net))):
        assert isinstance(other.up, PackedLinear)
        torch.testing.assert_close(other(IDS), ref, rtol=1e-6, atol=1e-6)
    fresh = TiedNet().requires_grad_(False)
    accelerate(fresh, "onednn", pack_after=1)
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh(IDS), ref, rtol=1e-6, atol=1e-6)


def test_moving_off_cpu_fp32_unpacks_and_back_packs_again(net):
    ref = net(IDS)
    accelerate(net, "onednn", pack_after=1)
    net(IDS)
    assert net.up.packed is not None
    net.double()
    assert net.up.packed is None and net.up.weight.dtype == torch.float64
    assert net.head.weight is net.emb.weight
    torch.testing.assert_close(net(IDS), ref.double(), rtol=1e-5, atol=1e-5)
    net.float()
    net(IDS)
    assert net.up.packed is not None
    torch.testing.assert_close(net(IDS), ref, rtol=1e-5, atol=1e-5)


def test_a_layer_packs_on_its_fourth_call(net):
    ref = net(IDS)
    accelerate(net, "onednn")
    for call in range(1, 5):
        torch.testing.assert_close(net(IDS), ref, rtol=1e-5, atol=1e-5)
        assert (net.up.packed is not None) == (call >= 4), call
    assert net.up._dense is None and net.head._dense is net.emb.weight  # the tied weight stays


def test_gradients_through_a_packed_layer_match_the_dense_one(net):
    dense = copy.deepcopy(net.up)
    accelerate(net, "onednn", pack_after=1)
    x1 = torch.randn(4, 16, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    (dense(x1) ** 2).sum().backward()
    (net.up(x2) ** 2).sum().backward()
    torch.testing.assert_close(x2.grad, x1.grad)


def test_trained_layers_are_left_alone():
    net = TiedNet().eval()
    net.emb.requires_grad_(False)
    net.up.requires_grad_(False)
    assert accelerate(net, "onednn", pack_after=1) == 2  # up, and the head that shares the frozen embedding
    assert isinstance(net.up, PackedLinear) and isinstance(net.head, PackedLinear)
    assert type(net.down) is nn.Linear  # still trains


def test_auto_times_each_shape_once_and_keeps_the_timings(net, tmp_path, monkeypatch):
    monkeypatch.setenv("BLIPKIT_CACHE", str(tmp_path))
    timed = []
    monkeypatch.setattr(fast_linear, "_probe", lambda i, o: timed.append((i, o)) or (2.0 if o == 40 else 0.5))
    assert accelerate(net, "auto") == 1  # only the (16 -> 40) shape is "faster" packed
    assert isinstance(net.up, PackedLinear) and type(net.down) is nn.Linear
    assert sorted(timed) == [(16, 40), (16, 50), (40, 16)]
    saved = json.loads((tmp_path / "kernels.json").read_text())
    (machine,) = saved.values()
    assert machine == {"16x40": 2.0, "16x50": 0.5, "40x16": 0.5}
    again = TiedNet().requires_grad_(False)
    accelerate(again, "auto")
    assert len(timed) == 3  # read back, not timed again


def test_default_kernels_and_bad_names(net):
    assert accelerate(net, "default") == 0
    assert type(net.up) is nn.Linear
    with pytest.raises(ValueError, match="kernels must be one of"):
        accelerate(net, "fast")


@pytest.mark.parametrize("llm", ["opt", "llama"])
def test_loaded_model_gives_the_same_tokens_through_either_kernel(tmp_path, llm):
    from hf_tiny import make_blip2
    from PIL import Image

    make_blip2(tmp_path, llm=llm, num_query_tokens=4)
    plain = blipkit.load(tmp_path, kernels="default")
    fast = blipkit.load(tmp_path, kernels="onednn")
    assert not any(isinstance(m, PackedLinear) for m in plain.model.modules())
    packed = [m for m in fast.model.modules() if isinstance(m, PackedLinear)]
    assert packed and not any(isinstance(m, PackedLinear) for m in fast.model.qformer.modules())
    images = [Image.new("RGB", (40, 30), c) for c in ("red", "navy", "olive")]
    assert fast.caption(images, max_new_tokens=8) == plain.caption(images, max_new_tokens=8)
    pixels = plain.pixel_values(images)
    torch.testing.assert_close(
        fast.model.encode_image(pixels), plain.model.encode_image(pixels), rtol=1e-4, atol=1e-5
    )
