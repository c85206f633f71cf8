"""Plugin modules (issue #16 case 5): a custom output function and a custom model outside any importable
path, registered by an operator-listed file, are built from the CLI and served; without the plugin the
index says which name is missing and how to provide it; a name in an index file alone imports nothing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.numpy import save_file

from indexer.features.models import ModelSpec, build_model, load_checkpoint, save_checkpoint
from indexer.plugins import PluginError, load_plugin, load_plugins
from indexer.store.reader import load_index
from service.app import create_app
from service.core.settings import Settings

PLUGIN = '''
from torch import nn

from indexer.features.models import register_model
from indexer.features.tasks import ClassificationMargin, register_output_function


@register_output_function
class HalfMargin(ClassificationMargin):
    """Half the classification margin (a custom output function for the test)."""

    name = "test_plugin_half_margin"

    def output(self, model_output, target):
        return 0.5 * super().output(model_output, target)


def net():
    return nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 3))


register_model("test_plugin_net", net)
'''


@pytest.fixture(scope="module")
def plugin_index(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, torch.Tensor]:
    """``(plugin file, index root, inputs)``: an index built by ``infotrace-index build --plugin``."""
    tmp = tmp_path_factory.mktemp("plugin")
    plugin = tmp / "team_tasks.py"
    plugin.write_text(PLUGIN)
    load_plugin(str(plugin))  # for the weights here; the CLI process imports it from --plugin
    torch.manual_seed(0)
    model = build_model(ModelSpec("test_plugin_net"))
    save_checkpoint(model, tmp / "weights.safetensors")
    x = torch.randn(30, 6)
    data = tmp / "data.safetensors"
    save_file(
        {
            "train_inputs": x.numpy(),
            "train_targets": torch.randint(0, 3, (30,)).numpy(),
            "query_inputs": x[:4].numpy(),
            "query_targets": torch.randint(0, 3, (4,)).numpy(),
        },
        str(data),
    )
    cli = str(Path(sys.executable).with_name("infotrace-index"))
    args = [cli, "build", "--out", str(tmp / "root" / "custom"), "--model", "test_plugin_net", "--checkpoint"]
    args += [str(tmp / "weights.safetensors"), "--data", str(data), "--k", "8", "--image-shape", "2x3"]
    args += ["--output", "test_plugin_half_margin"]
    done = subprocess.run([*args, "--plugin", str(plugin)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return plugin, tmp / "root", x


def test_the_cli_imports_listed_plugins_and_sets_the_image_shape(plugin_index) -> None:
    plugin, root, _ = plugin_index
    model = load_index(root / "custom").manifest.model
    assert model.spec is not None and model.spec.factory == "test_plugin_net"
    assert model.output_function == "test_plugin_half_margin"
    assert model.image_shape == (2, 3)
    # without --plugin the build does not know the names, and says where they come from
    cli = str(Path(sys.executable).with_name("infotrace-index"))
    done = subprocess.run(
        [cli, "build", "--out", str(root / "other"), "--model", "test_plugin_net", "--checkpoint"]
        + [str(root.parent / "weights.safetensors"), "--data", str(root.parent / "data.safetensors")],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2
    assert "unknown model factory 'test_plugin_net'" in done.stderr and "--plugin" in done.stderr


def test_the_service_serves_a_plugin_model_only_when_the_plugin_is_listed(plugin_index) -> None:
    plugin, root, x = plugin_index
    # this process imported the plugin already (the fixture): forget it, to see the service on its own
    from indexer.features import models, tasks

    tasks._REGISTRY.pop("test_plugin_half_margin"), models._FACTORIES.pop("test_plugin_net")
    sys.modules.pop(next(n for n in sys.modules if n.startswith("infotrace_plugin_team_tasks")))
    with TestClient(create_app(Settings(index_root=root))) as client:
        ready = client.get("/readyz").json()
    assert ready["ready"] is False
    assert "unknown output function 'test_plugin_half_margin'" in ready["indexes"]["custom"]
    assert "INFOTRACE_PLUGINS" in ready["indexes"]["custom"]
    # listed, the plugin is imported afresh (as in a new process) and the index is served
    with TestClient(create_app(Settings(index_root=root, plugins=[str(plugin)]))) as client:
        response = client.post("/v1/indexes/custom/attributions", json={"query": {"input": x[1].tolist()}})
        assert response.status_code == 200, response.text
        # the plugin's output function: half the margin of the predicted class
        model = build_model(ModelSpec("test_plugin_net"))
        load_checkpoint(model, root.parent / "weights.safetensors")
        logits = model(x[1]).detach().double()
        top = int(logits.argmax())
        margin = logits[top] - torch.logsumexp(torch.cat([logits[:top], logits[top + 1 :]]), 0)
        assert response.json()["query"]["output"] == pytest.approx(0.5 * float(margin), rel=1e-5)
        png = client.get("/v1/indexes/custom/examples/1/image.png")
        assert png.status_code == 200 and png.headers["content-type"] == "image/png"


def test_a_missing_plugin_file_or_module_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(PluginError, match=r"no such \.py file"):
        load_plugin(str(tmp_path / "absent.py"))
    with pytest.raises(PluginError, match=r"plugin 'no_such_module_xyz': no such module on the Python path"):
        load_plugins(["json", "no_such_module_xyz"])
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('half written')\n")
    with pytest.raises(PluginError, match=r"failed to import: RuntimeError: half written"):
        load_plugin(str(broken))
    with pytest.raises(PluginError):
        with TestClient(create_app(Settings(index_root=tmp_path, plugins=[str(broken)]))):
            pass


def test_a_plugin_listed_by_name_and_by_path_is_imported_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its second import re-ran its registrations, which fail ("already registered")."""
    for order, stem in ((("name", "path"), "twice_a"), (("path", "name"), "twice_b")):
        plugin = tmp_path / f"{stem}.py"
        plugin.write_text("IMPORTS = []\nIMPORTS.append(1)\n")
        monkeypatch.syspath_prepend(str(tmp_path))
        modules = [load_plugin(stem if how == "name" else str(plugin)) for how in order]
        assert modules[0] is modules[1] and modules[0].IMPORTS == [1]
        sys.modules.pop(stem, None)


def test_a_plugin_that_calls_sys_exit_is_a_plugin_error(tmp_path: Path) -> None:
    """A plugin's sys.exit() ended the server silently at startup."""
    leaving = tmp_path / "leaving.py"
    leaving.write_text("import sys\nsys.exit(3)\n")
    with pytest.raises(PluginError, match=r"failed to import: it called sys\.exit\(3\) while being imported"):
        load_plugin(str(leaving))
