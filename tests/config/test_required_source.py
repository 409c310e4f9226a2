"""`data=text_files` without `data.source=...` is a one-line error naming the key and the fix; it used to train on the
bundled Shakespeare silently (the preset's `???` merged onto the schema's default)."""

import pytest

from mhc_train.config import ConfigError, load_config


def test_text_files_without_a_source_is_a_one_line_error():
    with pytest.raises(ConfigError) as e:
        load_config(["data=text_files"])
    message = str(e.value)
    assert "\n" not in message and "data.source is not set" in message and "data.source=<" in message, message


def test_text_files_with_a_source_loads(tmp_path):
    assert load_config(["data=text_files", f"data.source={tmp_path}"]).data.source == str(tmp_path)
