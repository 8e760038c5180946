"""A user's weights file: read with torch.load(weights_only=True) or safetensors, unwrapped, fitted
to the model rapc builds, and every way it can be wrong is one RapcError line. Also the input
normalization the user controls (model.normalize)."""

from __future__ import annotations

import importlib
import json
import pickle
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from rapc.config import ModelConfig, NormalizeConfig
from rapc.data import DatasetInfo
from rapc.errors import RapcError
from rapc.modelio import Architecture, load_model, read_architecture, save_model
from rapc.models import LeNet, Normalize, Normalized
from rapc.weights import fit_weights, load_weights_file, read_weights_file

DIGITS = DatasetInfo(10, 1, 8, (0.3,), (0.4,))
RGB = DatasetInfo(10, 3, 8, (0.5, 0.4, 0.3), (0.2, 0.2, 0.2))

NETS = '''
import torch
from torch import nn


class TinyNet(nn.Module):
    def __init__(self, num_classes=10, in_channels=1, channels=4, batchnorm=False):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, padding=1)
        self.bn = nn.BatchNorm2d(channels) if batchnorm else nn.Identity()
        self.fc = nn.Linear(channels * 64, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(torch.relu(self.bn(self.conv1(x))), 1))


def tiny(num_classes=10, in_channels=1, channels=4, batchnorm=False):
    return TinyNet(num_classes, in_channels, channels, batchnorm)


class Holder(nn.Module):
    """A network whose only child is called `model`: its own keys start with `model.`."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.model = nn.Sequential(nn.Flatten(), nn.Linear(64, num_classes))

    def forward(self, x):
        return self.model(x)


def holder(num_classes=10):
    return Holder(num_classes)
'''


@pytest.fixture(scope="module")
def nets(tmp_path_factory) -> str:
    """A user's model file, importable as `rapc_test_user_nets`: rapc imports it by name like any package."""
    folder = tmp_path_factory.mktemp("user")
    (folder / "rapc_test_user_nets.py").write_text(textwrap.dedent(NETS))
    sys.path.insert(0, str(folder))
    yield "rapc_test_user_nets"
    sys.path.remove(str(folder))
    sys.modules.pop("rapc_test_user_nets", None)


def _user_model(nets: str, factory: str = "tiny", normalize=None, info: DatasetInfo = DIGITS, **kwargs) -> nn.Module:
    cfg = ModelConfig(name=f"{nets}:{factory}", allow_import=True, normalize=normalize, kwargs=kwargs)
    return Architecture.for_data(cfg, info).build(allow_import=True)


def _user_net(nets: str, factory: str = "tiny", **kwargs) -> nn.Module:
    """The network as the user trains it, outside rapc: no wrapper, their own keys."""
    torch.manual_seed(1)
    return getattr(importlib.import_module(nets), factory)(**kwargs)


def _lenet(normalize=None, width: int = 2) -> nn.Module:
    return Architecture.for_data(ModelConfig(name="lenet", width=width, normalize=normalize), DIGITS).build()


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- reading files --------------------------------------------------------------------------------

def test_a_state_dict_saved_with_torch_save_is_read_tensor_for_tensor(tmp_path):
    state = _lenet().state_dict()
    torch.save(state, tmp_path / "w.pt")
    assert _equal(read_weights_file(tmp_path / "w.pt"), state)


def test_safetensors_files_are_read(tmp_path):
    state = {k: v.contiguous() for k, v in _lenet().state_dict().items()}
    save_file(state, str(tmp_path / "w.safetensors"))
    assert _equal(read_weights_file(tmp_path / "w.safetensors"), state)


@pytest.mark.parametrize("key", ["state_dict", "model_state_dict", "model"])
def test_a_checkpoint_dict_is_unwrapped_and_what_sits_beside_the_state_dict_is_ignored(tmp_path, key):
    model = _lenet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.rand(2, 1, 8, 8)).sum().backward()
    optimizer.step()
    torch.save({"epoch": 7, key: model.state_dict(), "optimizer": optimizer.state_dict(), "best_acc": 0.9}, tmp_path / "ckpt.pth")
    assert _equal(read_weights_file(tmp_path / "ckpt.pth"), model.state_dict())


def test_a_nested_checkpoint_is_unwrapped_to_its_state_dict(tmp_path):
    state = _lenet().state_dict()
    torch.save({"model": {"state_dict": state, "arch": "lenet"}, "epoch": 3}, tmp_path / "nested.pt")
    assert _equal(read_weights_file(tmp_path / "nested.pt"), state)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_a_pickled_whole_module_is_refused_in_one_line_that_says_how_to_save_weights(tmp_path):
    torch.save(_lenet(), tmp_path / "whole.pt")  # what `torch.save(model, path)` writes: the class, pickled
    with pytest.raises(RapcError) as error:
        read_weights_file(tmp_path / "whole.pt")
    message = str(error.value)
    assert "\n" not in message
    assert "pickled Python object" in message and "rapc.models.LeNet" in message
    assert "torch.save(model.state_dict()" in message


def test_a_pickle_that_would_run_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "executed"

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (tmp_path / "evil.pt").write_bytes(pickle.dumps({"state_dict": Exploit()}, protocol=2))  # torch.save's protocol
    with pytest.raises(RapcError, match=r"pickled Python object \(it needs io.open to load\)"):
        read_weights_file(tmp_path / "evil.pt")
    assert not marker.exists()


def test_unreadable_files_are_one_line_errors_naming_the_file(tmp_path):
    torch.save(_lenet().state_dict(), tmp_path / "good.pt")
    cases = {
        "missing.pt": ("", "does not exist"),
        "junk.pt": (b"not a torch file at all", "corrupt or not a PyTorch file"),
        "truncated.pt": ((tmp_path / "good.pt").read_bytes()[:400], "corrupt or not a PyTorch file"),
        "truncated.safetensors": (b"\x10\x00\x00\x00\x00\x00\x00\x00{", "corrupt or truncated safetensors"),
        "weights.bin": (b"x", "not a weights file"),
    }
    for name, (content, words) in cases.items():
        if content:
            (tmp_path / name).write_bytes(content)
        with pytest.raises(RapcError) as error:
            read_weights_file(tmp_path / name)
        assert str(tmp_path / name) in str(error.value) and words in str(error.value) and "\n" not in str(error.value), name


def test_a_file_that_holds_no_state_dict_says_what_it_holds(tmp_path):
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    with pytest.raises(RapcError, match="holds a list, not a state dict"):
        read_weights_file(tmp_path / "list.pt")
    torch.save({"weights": _lenet().state_dict(), "epoch": 3}, tmp_path / "unknown-key.pt")
    with pytest.raises(RapcError, match=r"entries weights \(OrderedDict\), epoch \(int\) are not tensors.*state_dict / model_state_dict / model"):
        read_weights_file(tmp_path / "unknown-key.pt")
    torch.save({}, tmp_path / "empty.pt")
    with pytest.raises(RapcError, match="holds no tensors"):
        read_weights_file(tmp_path / "empty.pt")


# -- fitting them to the model --------------------------------------------------------------------

@pytest.mark.parametrize("prefix", ["module.", "model.", "_orig_mod.", "module._orig_mod."])
def test_wrapper_prefixes_on_every_key_are_stripped(tmp_path, prefix):
    source = _lenet()
    torch.save({prefix + k: v for k, v in source.state_dict().items()}, tmp_path / "w.pt")
    target = load_weights_file(_lenet(), tmp_path / "w.pt")
    assert _equal(target.state_dict(), source.state_dict())


def test_a_network_whose_own_keys_start_with_model_keeps_them(nets):
    net = _user_net(nets, "holder")
    assert all(k.startswith("model.") for k in net.state_dict())
    model = _user_model(nets, "holder")
    fit_weights(model, net.state_dict(), "holder.pt")
    assert _equal(model.net.state_dict(), net.state_dict())
    wrapped = {"module." + k: v for k, v in net.state_dict().items()}
    fit_weights(model := _user_model(nets, "holder"), wrapped, "holder.pt")
    assert _equal(model.net.state_dict(), net.state_dict())


def test_every_missing_extra_and_misshaped_tensor_is_named_in_one_line(nets):
    model = _user_model(nets, channels=4)
    other = _user_net(nets, channels=8).state_dict()  # conv1 and fc trained at another width
    del other["fc.bias"]
    other["head.weight"] = torch.zeros(3)
    with pytest.raises(RapcError) as error:
        fit_weights(model, other, "mine.pt")
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("mine.pt: tensor conv1.weight has shape [8, 1, 3, 3], the model expects [4, 1, 3, 3]; in all ")
    assert "1 missing (fc.bias)" in message and "1 extra (head.weight)" in message
    assert ("3 mis-shaped (conv1.weight: file [8, 1, 3, 3], model [4, 1, 3, 3], conv1.bias: file [8], model [4], "
            "fc.weight: file [10, 512], model [10, 256])") in message


def test_one_problem_is_said_in_words(nets):
    state = _user_net(nets).state_dict()
    with pytest.raises(RapcError, match=r"^w.pt: tensor fc.bias is missing$"):
        fit_weights(_user_model(nets), {k: v for k, v in state.items() if k != "fc.bias"}, "w.pt")
    with pytest.raises(RapcError, match=r"^w.pt: tensor extra.weight is not part of the model$"):
        fit_weights(_user_model(nets), {**state, "extra.weight": torch.zeros(1)}, "w.pt")


def test_a_user_networks_weights_go_into_the_network_rapc_wraps(nets):
    net = _user_net(nets)
    model = _user_model(nets)
    assert isinstance(model, Normalized)
    fit_weights(model, net.state_dict(), "w.pt")
    assert _equal(model.net.state_dict(), net.state_dict())
    assert model.normalize.mean.flatten().tolist() == pytest.approx([0.3])  # the config's (dataset) statistics
    # a state dict of rapc's wrapped model (net.* and its normalize buffers) fits too
    again = _user_model(nets)
    fit_weights(again, model.state_dict(), "wrapped.pt")
    assert _equal(again.state_dict(), model.state_dict())


def test_batchnorm_batch_counters_may_be_missing_from_the_file(nets):
    net = _user_net(nets, batchnorm=True)
    net.bn.running_mean.uniform_()
    state = {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    model = _user_model(nets, batchnorm=True)
    fit_weights(model, state, "w.safetensors")
    assert torch.equal(model.net.bn.running_mean, net.bn.running_mean)


def test_normalization_in_the_file_must_be_the_configured_one(nets):
    trained = _lenet(NormalizeConfig(mean=[0.1307], std=[0.3081])).state_dict()
    with pytest.raises(RapcError) as error:
        fit_weights(_lenet(), trained, "mnist.pt")  # the config normalizes with the dataset's 0.3 / 0.4
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("mnist.pt: its input normalization normalize.mean/std (mean [0.1307], std [0.3081]) differs from "
                              "the model's (mean [0.3], std [0.4]: model.normalize")
    assert message.endswith("set model.normalize={mean: [0.1307], std: [0.3081]}")
    configured = _lenet(NormalizeConfig(mean=[0.1307], std=[0.3081]))
    fit_weights(configured, trained, "mnist.pt")
    assert _equal(configured.state_dict(), trained)
    # the same for a user network that rapc wraps, and a file without the buffers takes the config's
    net = _user_net(nets).state_dict()
    with pytest.raises(RapcError, match="set model.normalize="):
        fit_weights(_user_model(nets), {**net, "normalize.mean": torch.full((1, 1, 1, 1), 0.5),
                                        "normalize.std": torch.ones(1, 1, 1, 1)}, "w.pt")
    plain = {k: v for k, v in trained.items() if not k.startswith("normalize.")}
    model = _lenet()
    fit_weights(model, plain, "plain.pt")
    assert model.normalize.mean.item() == pytest.approx(0.3) and torch.equal(model.conv1.weight, trained["conv1.weight"])


# -- model.normalize ------------------------------------------------------------------------------

def test_normalize_none_gives_builtins_an_identity_normalize_and_user_networks_no_wrapper(nets):
    lenet = _lenet("none")
    assert isinstance(lenet.normalize, Normalize)
    assert lenet.normalize.mean.flatten().tolist() == [0.0] and lenet.normalize.std.flatten().tolist() == [1.0]
    user = _user_model(nets, normalize="none")
    assert type(user).__name__ == "TinyNet" and not any(isinstance(m, Normalize) for m in user.modules())
    net = _user_net(nets)
    fit_weights(user, {"module." + k: v for k, v in net.state_dict().items()}, "dp.pt")
    assert _equal(user.state_dict(), net.state_dict())  # the user's own keys, no net. prefix


def test_explicit_statistics_are_used_and_need_one_value_per_channel(nets):
    stats = NormalizeConfig(mean=[0.1, 0.2, 0.3], std=[0.5, 0.6, 0.7])
    resnet = Architecture.for_data(ModelConfig(name="resnet18", width=1, normalize=stats), RGB).build()
    assert resnet.normalize.mean.flatten().tolist() == pytest.approx([0.1, 0.2, 0.3])
    user = _user_model(nets, normalize=stats, info=RGB)
    assert user.normalize.std.flatten().tolist() == pytest.approx([0.5, 0.6, 0.7])
    with pytest.raises(RapcError, match="model.normalize gives 3 values per statistic, but the images have 1 channel;"):
        Architecture.for_data(ModelConfig(name="lenet", normalize=stats), DIGITS)


def test_a_saved_model_keeps_its_normalization_and_old_records_still_load(nets, tmp_path):
    user = _user_model(nets, normalize="none")
    architecture = Architecture.for_data(ModelConfig(name=f"{nets}:tiny", normalize="none"), DIGITS)
    save_model(user, architecture, tmp_path / "user")
    assert read_architecture(tmp_path / "user").args["mean"] is None
    loaded = load_model(tmp_path / "user", allow_import=True)
    assert type(loaded).__name__ == "TinyNet" and _equal(loaded.state_dict(), user.state_dict())
    lenet = _lenet("none")
    save_model(lenet, Architecture.for_data(ModelConfig(name="lenet", width=2, normalize="none"), DIGITS), tmp_path / "lenet")
    assert torch.equal(load_model(tmp_path / "lenet").normalize.std, torch.ones(1, 1, 1, 1))
    # a record written before model.normalize existed: the statistics as lists
    old = _lenet()
    save_model(old, Architecture("lenet", {"num_classes": 10, "in_channels": 1, "image_size": 8, "width": 2,
                                           "mean": [0.3], "std": [0.4]}, [1, 8, 8]), tmp_path / "old")
    assert json.loads((tmp_path / "old" / "architecture.json").read_text())["args"]["mean"] == [0.3]
    assert isinstance(load_model(tmp_path / "old"), LeNet) and load_model(tmp_path / "old").normalize.mean.item() == pytest.approx(0.3)
