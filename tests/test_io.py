import os

import pytest
import torch

from advcli import keys
from advcli.errors import InputError
from advcli.io import atomic_path, load_model, save_model


def _payload(mode="confounder"):
    return {"format": keys.MODEL_FORMAT, "format_version": keys.FORMAT_VERSION, "version": "x",
            "mode": mode, "config": {}, "genes": ["a"], "encoding": {},
            "state": {"w": torch.ones(2)}, "history": {}}


def test_atomic_path_creates_folders_and_leaves_nothing_on_error(tmp_path):
    target = tmp_path / "a" / "b" / "out.txt"
    with atomic_path(target) as tmp:
        tmp.write_text("ok")
    assert target.read_text() == "ok"
    assert oct(target.stat().st_mode & 0o777) != oct(0o600)
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("partial")
            raise RuntimeError("boom")
    assert target.read_text() == "ok"  # the old file is untouched
    assert os.listdir(target.parent) == ["out.txt"]  # no temporary left behind


def test_model_roundtrip_with_weights_only(tmp_path):
    save_model(_payload(), tmp_path / "m.pt")
    loaded = load_model(tmp_path / "m.pt", mode="confounder")
    assert torch.equal(loaded["state"]["w"], torch.ones(2))
    assert torch.load(tmp_path / "m.pt", weights_only=True)["mode"] == "confounder"


def test_bad_model_files(tmp_path):
    save_model(_payload(), tmp_path / "m.pt")
    with pytest.raises(InputError, match="one of mode integrate is needed"):
        load_model(tmp_path / "m.pt", mode="integrate")
    data = (tmp_path / "m.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="not a readable advcli model"):
        load_model(tmp_path / "cut.pt")
    (tmp_path / "junk.pt").write_bytes(b"\x00garbage" * 50)
    with pytest.raises(InputError, match="not a readable advcli model"):
        load_model(tmp_path / "junk.pt")
    torch.save({"weights": torch.ones(1)}, tmp_path / "other.pt")
    with pytest.raises(InputError, match="not an advcli model"):
        load_model(tmp_path / "other.pt")
    incomplete = _payload()
    del incomplete["genes"]
    torch.save(incomplete, tmp_path / "inc.pt")
    with pytest.raises(InputError, match="lacks genes"):
        load_model(tmp_path / "inc.pt")
    with pytest.raises(InputError, match="does not exist"):
        load_model(tmp_path / "missing.pt")


class Evil:
    pass


def test_pickled_objects_are_refused(tmp_path):
    payload = _payload()
    payload["config"] = Evil()
    torch.save(payload, tmp_path / "evil.pt")
    with pytest.raises(InputError, match="weights_only"):
        load_model(tmp_path / "evil.pt")


def test_a_signal_during_an_atomic_write_aborts_it(tmp_path):
    """h5py can swallow KeyboardInterrupt in its callbacks; the signal is held and raised
    before the rename, so an interrupted write never looks finished."""
    import signal

    target = tmp_path / "out.txt"
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target) as tmp:
            tmp.write_text("partial")
            signal.raise_signal(signal.SIGINT)
            tmp.write_text("complete")  # the write itself goes on to the end
    assert not target.exists() and list(tmp_path.iterdir()) == []
