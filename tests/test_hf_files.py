"""What the Hugging Face directory families share (``models.hf_files``): reading ``config.json`` and checking the
text files and normaliser of a model description, the same way for ``hf-ctc`` and ``whisper``."""

from __future__ import annotations

import pytest

from dsnn_compress.errors import DsnnError, UsageError
from dsnn_compress.models.hf_files import BAD_META_HINT, parse_config
from dsnn_compress.models.registry import get_family


@pytest.mark.parametrize(("files", "expected"), [
    ({"config.json": '{"model_type": "whisper"}'}, {"model_type": "whisper"}),
    ({}, None),
    ({"config.json": "{"}, None),
    ({"config.json": "[1, 2]"}, None),
    ({"config.json": None}, None),
])
def test_parse_config_gives_an_object_or_none(files: dict, expected: dict | None) -> None:
    assert parse_config(files) == expected


@pytest.mark.parametrize("family", ["hf-ctc", "whisper"])
@pytest.mark.parametrize(("change", "fragment"), [
    ({"hf_files": None}, "lacks the 'hf_files' texts"),
    ({"hf_files": {"config.json": 3}}, "lacks the 'hf_files' texts"),
    ({"normalizer": 5}, "has a non-string 'normalizer'"),
    ({"normalizer": "klingon"}, "is invalid: unknown text normalizer 'klingon'"),
])
def test_a_bad_model_description_is_one_metadata_error_in_both_families(family: str, change: dict,
                                                                        fragment: str) -> None:
    meta = {"family": family, "architecture": "Wav2Vec2ForCTC", "hf_files": {"config.json": "{}"},
            "normalizer": "default", **change}
    with pytest.raises(DsnnError) as excinfo:
        get_family(family).from_metadata(meta)
    assert excinfo.value.message == f"{family} model metadata {fragment}"
    assert not isinstance(excinfo.value, UsageError)  # a damaged bundle is not a usage error (exit 1, not 2)
    assert excinfo.value.hint == BAD_META_HINT


@pytest.mark.parametrize(("family", "start_from"), [("hf-ctc", "save_pretrained directory"),
                                                    ("whisper", "Whisper model directory")])
def test_the_directory_families_cannot_create_a_model_from_scratch(family: str, start_from: str) -> None:
    with pytest.raises(UsageError, match=f"the {family} family cannot create a model from scratch") as excinfo:
        get_family(family).new(list("abc"))
    assert excinfo.value.hint.startswith("set model.init to ") and start_from in excinfo.value.hint
