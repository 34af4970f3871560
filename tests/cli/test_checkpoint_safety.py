"""No file a user names is ever unpickled: a checkpoint whose unpickling runs a shell command, given to every entry
point by local path and by URL (a local HTTP server), must never run, and each entry point exits with a cvft error."""

from __future__ import annotations

import functools
import http.server
import os
import shlex
import threading
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from cli_kit import WorseEachEpoch, cvft_args, regression_loader

from cvft.checkpoints import SafeCheckpointIO, load_checkpoint
from cvft.cli import main
from cvft.errors import CheckpointError, CvftError
from cvft.tasks import ImageClassifier


class _RunsCode:
    """Unpickling this runs ``touch <marker>``: the shape of a crafted checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(self.marker)}",))


@pytest.fixture
def payload(tmp_path, monkeypatch) -> tuple[Path, Path]:
    """A folder of crafted files (``evil.ckpt``, ``evil.pth``, ``evil.safetensors``) and the marker they touch."""
    monkeypatch.setenv("CVFT_CACHE", str(tmp_path / "cache"))  # downloads go here, not to the user's cache
    marker = tmp_path / "PAYLOAD_RAN"
    served = tmp_path / "served"
    served.mkdir()
    content = {"state_dict": {"w": torch.zeros(1)}, "hyper_parameters": {"x": _RunsCode(marker)}, "epoch": 0}
    for name in ("evil.ckpt", "evil.pth", "evil.safetensors"):
        torch.save(content, served / name)
    return served, marker


@pytest.fixture
def server(payload):
    """``http://127.0.0.1:<port>`` serving the payload folder."""
    handler = functools.partial(_QuietHandler, directory=str(payload[0]))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_port}"
    httpd.shutdown()
    httpd.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def _location(payload, server_url: str | None, name: str) -> str:
    return f"{server_url}/{name}" if server_url else str(payload[0] / name)


def test_the_payload_runs_when_unpickled(payload):
    """The harness is real: loading the file the unsafe way does run the command."""
    served, marker = payload
    torch.load(served / "evil.ckpt", weights_only=False)
    assert marker.exists()


def _fit_base(shapes_folder: Path, weights: Path, out: Path) -> list[str]:
    return cvft_args("fit", shapes_folder, weights, out)[1:]


def _command(entry: str, location: str, shapes_folder: Path, weights: Path, out: Path) -> list[str]:
    base = _fit_base(shapes_folder, weights, out)
    if entry == "fit --ckpt_path":
        return ["fit", *base, f"--ckpt_path={location}"]
    if entry == "predict --ckpt_path":
        return ["predict", *base, f"--data.predict_root={shapes_folder / 'unlabelled'}", f"--ckpt_path={location}"]
    if entry == "validate --ckpt_path":
        return ["validate", *base, f"--ckpt_path={location}"]
    if entry == "fit --model.weights":
        return ["fit", *base, f"--model.weights={location}"]  # the last --model.weights wins
    if entry == "fit --teacher":
        return ["fit", *base, f"--teacher={location}"]
    if entry == "explain --ckpt_path":
        image = next((shapes_folder / "unlabelled").iterdir())
        return ["explain", f"--ckpt_path={location}", "--images", str(image), "--out", str(out / "explain")]
    if entry == "export --ckpt":
        return ["export", f"--ckpt={location}", f"--output={out / 'model.safetensors'}"]
    raise AssertionError(entry)


ENTRIES = [
    ("fit --ckpt_path", "evil.ckpt"),
    ("predict --ckpt_path", "evil.ckpt"),
    ("validate --ckpt_path", "evil.ckpt"),
    ("fit --model.weights", "evil.pth"),
    ("fit --teacher", "evil.ckpt"),
    ("explain --ckpt_path", "evil.ckpt"),
    ("export --ckpt", "evil.ckpt"),
]


@pytest.mark.parametrize("remote", [False, True], ids=["local", "http"])
@pytest.mark.parametrize(("entry", "name"), ENTRIES, ids=[e for e, _ in ENTRIES])
def test_cli_entry_points_never_unpickle(
    entry, name, remote, payload, server, shapes_folder, resnet_weights, tmp_path, capsys
):
    location = _location(payload, server if remote else None, name)
    with pytest.raises(SystemExit) as exit_info:
        main(_command(entry, location, shapes_folder, resnet_weights, tmp_path / "runs"))
    assert not payload[1].exists(), f"{entry} ran code from {location}"
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "error:" in err and "evil" in err, err[-2000:]


def test_weights_only_false_is_refused(payload, shapes_folder, resnet_weights, tmp_path, capsys):
    location = str(payload[0] / "evil.ckpt")
    args = [
        "fit",
        *_fit_base(shapes_folder, resnet_weights, tmp_path),
        f"--ckpt_path={location}",
        "--weights_only=false",
    ]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    assert not payload[1].exists()
    assert "--weights_only false is refused" in capsys.readouterr().err


def test_adapter_file_that_is_a_pickle_is_refused(payload, shapes_folder, resnet_weights, tmp_path, capsys):
    args = [
        "predict",
        *_fit_base(shapes_folder, resnet_weights, tmp_path),
        f"--data.predict_root={shapes_folder / 'unlabelled'}",
        f"--model.adapter={payload[0] / 'evil.safetensors'}",
    ]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    assert not payload[1].exists()
    assert "evil.safetensors" in capsys.readouterr().err


@pytest.mark.parametrize("remote", [False, True], ids=["local", "http"])
def test_python_entry_points_never_unpickle(remote, payload, server):
    location = _location(payload, server if remote else None, "evil.ckpt")
    with pytest.raises(CheckpointError, match="pickled Python objects"):
        load_checkpoint(location)
    with pytest.raises(CvftError):
        ImageClassifier.from_checkpoint(location)
    from cvft.backbones import create_backbone
    from cvft.tasks.teachers import load_teacher

    with pytest.raises(CvftError):
        create_backbone(
            "test_resnet", pretrained=False, weights=_location(payload, server if remote else None, "evil.pth")
        )
    with pytest.raises(CvftError):
        load_teacher(location)
    assert not payload[1].exists()


@pytest.mark.parametrize("remote", [False, True], ids=["local", "http"])
def test_trainer_with_safe_checkpoint_io_never_unpickles(remote, payload, server, tmp_path):
    """The plug-in a Lightning user adds: Trainer(plugins=[SafeCheckpointIO()]).fit(ckpt_path=URL or path)."""
    location = _location(payload, server if remote else None, "evil.ckpt")
    trainer = pl.Trainer(
        plugins=[SafeCheckpointIO()], max_epochs=1, logger=False, enable_checkpointing=False, default_root_dir=tmp_path
    )
    with pytest.raises(CheckpointError):
        trainer.fit(WorseEachEpoch(), regression_loader(), ckpt_path=location)
    assert not payload[1].exists()


def test_safe_checkpoint_io_writes_beside_the_target_with_normal_permissions(tmp_path):
    io_plugin = SafeCheckpointIO()
    target = tmp_path / "ckpts" / "last.ckpt"
    io_plugin.save_checkpoint({"state_dict": {"w": torch.ones(3)}}, target)
    assert sorted(p.name for p in target.parent.iterdir()) == ["last.ckpt"]
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask
    assert torch.equal(io_plugin.load_checkpoint(target)["state_dict"]["w"], torch.ones(3))
