"""`iisan fetch encoders` where the Hugging Face Hub cannot be reached: one line naming the model and
what to do, exit 2, no traceback, no warning twice and no wait through huggingface_hub's retries. The
Hub's calls are replaced by stand-ins raising what huggingface_hub raises; nothing touches the network."""

from __future__ import annotations

import errno
import logging
import os
from types import SimpleNamespace

import huggingface_hub
import pytest
from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled, RepositoryNotFoundError

from iisan.experiments.encoders import unreachable

from ._cli_driver import run_forked

try:  # what huggingface_hub 2 sends its requests with; 1.x used httpx
    import httpx2 as httpx
except ImportError:  # pragma: no cover - huggingface_hub 1.x
    import httpx

NO_NAME = "[Errno -2] Name or service not known"


def connect_error() -> Exception:
    """What huggingface_hub's request raises when the Hub's name does not resolve (no network)."""
    return httpx.ConnectError(NO_NAME)


def snapshot_error() -> Exception:
    """What ``snapshot_download`` raises then: its error, made from the connection's."""
    try:
        raise connect_error()
    except httpx.ConnectError as err:
        try:
            raise LocalEntryNotFoundError(f"Got: ConnectError: {NO_NAME}\nAn error happened ...") from err
        except LocalEntryNotFoundError as wrapped:
            return wrapped


def hub_stand_in(calls, model_info=None, snapshot=None):
    """A fault for ``run_forked``: ``HfApi.model_info`` and ``snapshot_download`` replaced in the child,
    each call written to the file ``calls``. ``huggingface_hub``'s logger gets back the handler of its
    own that importing it adds (an earlier test in this process may have removed it)."""

    def record(name, behaviour):
        def call(*args, **kwargs):
            with open(calls, "a") as fh:
                fh.write(f"{name} {kwargs.get('timeout')}\n")
            return behaviour(*args, **kwargs) if behaviour else None
        return call

    def fault():
        logging.getLogger("huggingface_hub").addHandler(logging.StreamHandler())
        huggingface_hub.HfApi.model_info = record("model_info", model_info)
        huggingface_hub.snapshot_download = record("snapshot_download", snapshot)

    return fault


def raising(make):
    def call(*args, **kwargs):
        raise make()
    return call


def fetch(tmp_path, fault):
    outcome = run_forked(["fetch", "encoders", "--root", str(tmp_path / "models")], tmp_path / "s", fault=fault)
    calls = (tmp_path / "calls").read_text().splitlines() if (tmp_path / "calls").is_file() else []
    return outcome, calls


def test_an_unreachable_hub_is_one_line_naming_the_model_at_once(tmp_path):
    outcome, calls = fetch(tmp_path, hub_stand_in(tmp_path / "calls", model_info=raising(connect_error)))
    assert outcome.code == 2, outcome.describe()
    assert outcome.err.count("\n") == 1 and outcome.out == "", outcome.describe()  # nothing else, no traceback
    target = tmp_path / "models" / "bert-base-uncased"
    assert outcome.err == (
        "iisan: error: cannot reach the Hugging Face Hub for google-bert/bert-base-uncased@86b5e0934494 "
        f"(ConnectError: {NO_NAME}); run `iisan fetch encoders` where the Hub is reachable and copy the folder "
        f"it writes to {target}/ (its iisan-fetch.json is checked here), or download config.json, the tokenizer "
        "files and the safetensors weights (model*.safetensors) from https://huggingface.co/google-bert/"
        f"bert-base-uncased/tree/86b5e0934494bd15c9632b12f734a8a67f723594 into {target}/ "
        "(pretrained_models/README.md)\n")
    # one request, with huggingface_hub's own time limit for metadata, and no download that would retry it
    assert calls == [f"model_info {huggingface_hub.constants.HF_HUB_ETAG_TIMEOUT}"]
    assert sorted(os.listdir(tmp_path / "models")) == []


def test_offline_mode_is_named_and_nothing_is_sent(tmp_path):
    """``HF_HUB_OFFLINE=1``: huggingface_hub's own request refuses to go out (the real ``model_info``)."""

    def fault():
        huggingface_hub.constants.HF_HUB_OFFLINE = True  # as HF_HUB_OFFLINE=1 sets it on import
        hub_stand_in(tmp_path / "calls", model_info=huggingface_hub.HfApi.model_info)()

    outcome, calls = fetch(tmp_path, fault)
    assert outcome.code == 2 and outcome.err.count("\n") == 1, outcome.describe()
    assert outcome.err.startswith("iisan: error: cannot reach the Hugging Face Hub for google-bert/bert-base-uncased"
                                  "@86b5e0934494 (HF_HUB_OFFLINE is set, huggingface_hub's offline mode: unset it "
                                  "where the Hub is reachable); run `iisan fetch encoders` where"), outcome.err
    assert calls == [f"model_info {huggingface_hub.constants.HF_HUB_ETAG_TIMEOUT}"]


def test_a_connection_lost_during_the_download_is_said_once(tmp_path):
    """The Hub answered, then the download failed after huggingface_hub's retries: its warnings come out
    once each (they came twice: through its own handler and ours), and the error in one line."""

    def snapshot(*args, **kwargs):
        logging.getLogger("huggingface_hub.utils._http").warning("Retrying in 1s [Retry 1/5].")
        raise snapshot_error()

    answered = lambda self, repo_id, **kwargs: SimpleNamespace(sha=kwargs["revision"])  # noqa: E731
    outcome, calls = fetch(tmp_path, hub_stand_in(tmp_path / "calls", model_info=answered, snapshot=snapshot))
    assert outcome.code == 2, outcome.describe()
    assert outcome.err.count("Retrying in 1s") == 1, outcome.describe()
    assert "Traceback" not in outcome.err
    assert outcome.last_line.startswith("iisan: error: cannot reach the Hugging Face Hub for "
                                        f"google-bert/bert-base-uncased@86b5e0934494 (ConnectError: {NO_NAME}); ")
    assert [c.split()[0] for c in calls] == ["model_info", "snapshot_download"]


@pytest.mark.parametrize("err,why", [
    (connect_error(), f"ConnectError: {NO_NAME}"),
    (snapshot_error(), f"ConnectError: {NO_NAME}"),
    (httpx.ConnectTimeout("timed out"), "ConnectTimeout: timed out"),
    (OfflineModeIsEnabled("Cannot reach https://huggingface.co/api/models/x: offline mode is enabled."),
     "HF_HUB_OFFLINE is set, huggingface_hub's offline mode: unset it where the Hub is reachable"),
    (ConnectionError("[Errno 101] Network is unreachable"), "ConnectionError: [Errno 101] Network is unreachable"),
])
def test_what_counts_as_an_unreachable_hub(err, why):
    assert unreachable(err) == why


def test_other_failures_are_not_taken_for_an_unreachable_hub():
    assert unreachable(OSError(errno.ENOSPC, "No space left on device")) is None
    assert unreachable(ValueError("not a Hub id")) is None
    missing = RepositoryNotFoundError.__new__(RepositoryNotFoundError)  # its constructor wants a response
    Exception.__init__(missing, "404 Client Error: Repository Not Found")
    assert unreachable(missing) is None


def test_offline_mode_names_the_variable_that_set_it(monkeypatch):
    """TRANSFORMERS_OFFLINE=1 also puts huggingface_hub offline: the line named HF_HUB_OFFLINE, which was unset."""
    err = OfflineModeIsEnabled("offline mode is enabled.")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    assert unreachable(err) == ("TRANSFORMERS_OFFLINE is set, huggingface_hub's offline mode: unset it where the "
                                "Hub is reachable")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert unreachable(err).startswith("HF_HUB_OFFLINE and TRANSFORMERS_OFFLINE are set, huggingface_hub's offline "
                                       "mode: unset them")
