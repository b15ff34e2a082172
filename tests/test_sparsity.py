"""Run-time level switching on a live module, and the differentiable masked view used for training."""

from __future__ import annotations

import pytest
import torch
from helpers import write_checkpoint
from torch import nn
from torch.func import functional_call

from dsnn_compress.core.bundle import Bundle, load_bundle
from dsnn_compress.core.masked import masked_parameters
from dsnn_compress.errors import DsnnError, UsageError
from dsnn_compress.prune import PruneOptions, prune_checkpoint
from dsnn_compress.runtime.sparsity import attach

LEVELS = (0.3, 0.6, 0.9)
PRUNED = ["lstm.weight_hh_l0", "lstm.weight_hh_l0_reverse", "lstm.weight_ih_l0", "lstm.weight_ih_l0_reverse",
          "mlp.0.weight", "mlp.2.weight"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(6, 8, batch_first=True, bidirectional=True)
        self.mlp = nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden, _ = self.lstm(x)
        return self.mlp(hidden)


def new_net(seed: int) -> Net:
    torch.manual_seed(seed)
    return Net().eval()


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    tmp = tmp_path_factory.mktemp("sparsity")
    src = write_checkpoint(tmp / "dense.safetensors", new_net(0).state_dict())
    prune_checkpoint(src, tmp / "bundle.safetensors", PruneOptions(LEVELS))
    loaded = load_bundle(tmp / "bundle.safetensors")
    assert sorted(loaded.codes) == PRUNED
    return loaded


@pytest.fixture()
def inputs() -> torch.Tensor:
    return torch.randn(2, 7, 6, generator=torch.Generator().manual_seed(1))


def reference_output(state: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    model = new_net(99)
    model.load_state_dict(state)
    with torch.no_grad():
        return model(x)


def test_set_level_zeroes_pruned_weights_and_matches_exported_state(bundle: Bundle, inputs: torch.Tensor) -> None:
    dense = new_net(0).state_dict()
    ds = attach(new_net(7), bundle)  # different init: attach must load the bundle's dense weights
    params = dict(ds.module.named_parameters())
    assert all(torch.equal(params[n], dense[n]) for n in params)
    dense_out = reference_output(dense, inputs)
    for k, level in enumerate(LEVELS, 1):
        ds.set_level(level)
        assert ds.level == level
        for name, param in params.items():
            if name in bundle.codes:
                keep = bundle.codes[name] >= k
                assert int((~keep).sum()) == round(level * param.numel())
                assert bool((param[~keep] == 0).all()), name
                assert torch.equal(param[keep], dense[name][keep]), name
            else:
                assert torch.equal(param, dense[name]), name
        with torch.no_grad():
            out = ds.module(inputs)
        assert torch.equal(out, reference_output(bundle.state_dict_at(level), inputs))
        assert not torch.allclose(out, dense_out)
        expected_state = bundle.state_dict_at(level)
        assert all(torch.equal(v, expected_state[n]) for n, v in ds.state_dict_at(level).items())
    ds.set_level(0)
    assert ds.level == 0.0
    assert all(torch.equal(params[n], dense[n]) for n in params)
    with torch.no_grad():
        assert torch.equal(ds.module(inputs), dense_out)


def test_switching_in_any_order_and_by_percentage(bundle: Bundle, inputs: torch.Tensor) -> None:
    ds = attach(new_net(3), bundle)
    for level in ["90%", "0.3", "dense", 0.6, "90%", 0.3]:
        ds.set_level(level)
        with torch.no_grad():
            out = ds.module(inputs)
        assert torch.equal(out, reference_output(bundle.state_dict_at(level), inputs)), level
    with pytest.raises(UsageError, match=r"outside \[0, 0.9\]"):
        ds.set_level(0.95)
    assert ds.level == 0.3  # a refused switch leaves the active level alone
    module = ds.detach()
    dense = new_net(0).state_dict()
    assert all(torch.equal(p, dense[n]) for n, p in module.named_parameters())


def test_state_dict_at_does_not_change_active_level(bundle: Bundle) -> None:
    ds = attach(new_net(3), bundle)
    ds.set_level(0.6)
    before = {n: p.detach().clone() for n, p in ds.module.named_parameters()}
    dense = ds.state_dict_at(0)
    assert torch.equal(dense["mlp.0.weight"], bundle.tensors["mlp.0.weight"])
    assert all(torch.equal(p, before[n]) for n, p in ds.module.named_parameters())


def test_masked_view_matches_in_place_and_blocks_gradients(bundle: Bundle, inputs: torch.Tensor) -> None:
    in_place = attach(new_net(4), bundle)
    trained = new_net(5)
    trained.load_state_dict(bundle.tensors)
    params = dict(trained.named_parameters())
    for k, level in enumerate(LEVELS, 1):
        in_place.set_level(level)
        # Grad mode on both sides: the LSTM kernel without autograd may differ in the last bit.
        expected = in_place.module(inputs).detach()
        for p in params.values():
            p.grad = None
        masked = masked_parameters(params, bundle.codes, k)
        assert sorted(masked) == PRUNED
        out = functional_call(trained, {**params, **masked}, (inputs,))
        assert torch.equal(out, expected)
        (out ** 2).sum().backward()
        for name in PRUNED:
            keep = bundle.codes[name] >= k
            grad = params[name].grad
            assert grad is not None
            assert bool((grad[~keep] == 0).all()), f"{name} gets gradient through pruned weights at {level}"
            assert bool((grad[keep] != 0).any()), name
        assert params["mlp.0.bias"].grad is not None and bool((params["mlp.0.bias"].grad != 0).any())
    dense_view = masked_parameters(params, bundle.codes, 0)
    assert all(dense_view[n] is params[n] for n in PRUNED)


def test_attach_to_wrong_module_is_refused(bundle: Bundle) -> None:
    with pytest.raises(DsnnError, match="disagree"):
        attach(nn.Sequential(nn.Linear(16, 12)), bundle)
    other = nn.Module()
    other.mlp = nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 4))
    codes = {"mlp.2.weight": bundle.codes["mlp.2.weight"]}
    with pytest.raises(DsnnError, match="shape"):
        attach(other, Bundle({}, codes, LEVELS), load_weights=False)


def test_attach_without_loading_uses_module_values_as_dense(bundle: Bundle) -> None:
    module = new_net(11)
    own = {n: p.detach().clone() for n, p in module.named_parameters()}
    ds = attach(module, bundle, load_weights=False)
    ds.set_level(0.9)
    ds.set_level(0)
    assert all(torch.equal(p, own[n]) for n, p in module.named_parameters())
