import json
import pickle

import pytest
import torch

from rapc.config import PruningConfig, ShrinkConfig
from rapc.errors import RapcError
from rapc.modelio import ARCHITECTURE, WEIGHTS, Architecture, load_model, save_model
from rapc.pipeline.masks import MaskSet
from rapc.pipeline.projection import Projector
from rapc.pipeline.shrink import shrink
from rapc.rundir import RunDir

ARGS = {"num_classes": 10, "in_channels": 3, "image_size": 16, "width": 2, "mean": [0.5] * 3, "std": [0.25] * 3}


@pytest.fixture(scope="module")
def shrunk(tmp_path_factory):
    architecture = Architecture("resnet18", ARGS, [3, 16, 16])
    torch.manual_seed(0)
    model = architecture.build().eval()
    batch = torch.rand(8, 3, 16, 16)
    projector = Projector(model, batch, PruningConfig(scheme="filter", ratio=0.5))
    params = dict(model.named_parameters())
    MaskSet(model, projector.masks({n: params[n] for n in projector.targets}, params)).apply()
    result = shrink(model, batch, ShrinkConfig())
    directory = tmp_path_factory.mktemp("model")
    save_model(result.model, Architecture("resnet18", ARGS, [3, 16, 16], result.history), directory)
    return result.model, directory, batch


def test_save_load_round_trip_is_exact(shrunk):
    model, directory, batch = shrunk
    loaded = load_model(directory)
    assert not loaded.training
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    with torch.no_grad():
        assert torch.equal(model(batch), loaded(batch))


def test_saved_model_is_json_and_safetensors_only(shrunk):
    _, directory, _ = shrunk
    assert sorted(p.name for p in directory.iterdir()) == [ARCHITECTURE, WEIGHTS]
    record = json.loads((directory / ARCHITECTURE).read_text())
    assert record["builder"] == "resnet18" and record["pruning_history"]


def test_weights_that_do_not_fit_the_architecture_name_the_tensor_and_both_shapes(shrunk, tmp_path):
    _, directory, _ = shrunk
    for name in (ARCHITECTURE, WEIGHTS):
        (tmp_path / name).write_bytes((directory / name).read_bytes())
    record = json.loads((tmp_path / ARCHITECTURE).read_text())
    record["pruning_history"] = []  # the dense architecture: the shrunk weights no longer fit
    (tmp_path / ARCHITECTURE).write_text(json.dumps(record))
    with pytest.raises(RapcError, match=r"tensor conv1.weight has shape \[4, 3, 3, 3\], the architecture expects \[8, 3, 3, 3\]"):
        load_model(tmp_path)


def test_truncated_weights_and_broken_records_are_clear_errors(shrunk, tmp_path):
    _, directory, _ = shrunk
    (tmp_path / ARCHITECTURE).write_bytes((directory / ARCHITECTURE).read_bytes())
    (tmp_path / WEIGHTS).write_bytes((directory / WEIGHTS).read_bytes()[:1000])
    with pytest.raises(RapcError, match="corrupt or truncated"):
        load_model(tmp_path)
    (tmp_path / ARCHITECTURE).write_text("{not json")
    with pytest.raises(RapcError, match="unreadable architecture record"):
        load_model(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(RapcError, match="holds no saved model"):
        load_model(tmp_path / "empty")


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pickled_checkpoints_are_refused_without_running_code(tmp_path):
    marker = tmp_path / "executed"

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    run = RunDir(tmp_path / "run")
    run.checkpoint("admm").write_bytes(pickle.dumps({"model": Exploit()}))
    with pytest.raises(RapcError, match="not a loadable checkpoint"):
        run.load_checkpoint("admm")
    assert not marker.exists()


def test_user_factories_need_explicit_opt_in():
    with pytest.raises(RapcError, match="allow_import"):
        Architecture("collections:OrderedDict", dict(ARGS), [3, 16, 16]).build()
