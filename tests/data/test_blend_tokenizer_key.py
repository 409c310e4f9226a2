"""The blend's trained tokenizer is keyed on its sources' text, not only their names: editing a source's text trains a
new tokenizer in another directory, unchanged text reuses the first. The training itself is stubbed (a file per
call): what is tested is which directory the blend picks and when it trains."""

from mhc_train.config import DataConfig
from mhc_train.config.schema import BlendSourceConfig
from mhc_train.data import blend


def test_changing_a_source_s_text_changes_the_blend_tokenizer(tmp_path, monkeypatch):
    trained = []

    def fake_train(lines, prefix, vocab_size, max_chars, seed=0):
        trained.append(list(lines))
        prefix.parent.mkdir(parents=True, exist_ok=True)
        model = prefix.with_suffix(".model")
        model.write_text(f"tokenizer {len(trained)}")
        return model

    monkeypatch.setattr(blend, "train_tokenizer", fake_train)
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("the first source\nsays this\n")
    b.write_text("the second source\nsays that\n")
    entries = [BlendSourceConfig(source=str(a)), BlendSourceConfig(source=str(b))]
    cfg = DataConfig(out_dir=str(tmp_path / "out"), vocab_size=64, blend=entries, txt_per_line=True)

    first = blend.blend_tokenizer(cfg, blend.blend_parts(cfg))
    assert blend.blend_tokenizer(cfg, blend.blend_parts(cfg)) == first and len(trained) == 1  # same text: reused

    a.write_text("other words entirely\nin the same file\n")
    second = blend.blend_tokenizer(cfg, blend.blend_parts(cfg))
    assert second != first and len(trained) == 2, (first, second)  # the edited text trained its own tokenizer
    assert any("other words entirely" in line for line in trained[1]), trained[1]
