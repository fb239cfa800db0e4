"""config.yaml ↔ dataclasses, overrides, path resolution, and the study prompts."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine import game
from engine.config import RISKY_PROMPT, SAFE_PROMPT, Config, load_config, parse_set_arguments
from engine.errors import UserError
from helpers import ROOT


def test_repository_config_documents_exactly_the_defaults():
    cfg = load_config(ROOT / "config.yaml")
    expected = Config().to_dict()
    got = cfg.to_dict()
    assert Path(got.pop("cache_dir")) == ROOT / "cache"
    expected.pop("cache_dir")
    assert got == expected
    text = (ROOT / "config.yaml").read_text()
    # every key of every section is written (and so documented) in the file
    for section, values in expected.items():
        if isinstance(values, dict) and section != "prompts":
            for key in values:
                assert f"  {key}:" in text, f"{section}.{key} missing from config.yaml"


def test_prompts_are_the_study_prompts_exactly():
    cfg = load_config(ROOT / "config.yaml")
    assert cfg.prompts["safe"] == SAFE_PROMPT == game.safe_prompt()
    assert cfg.prompts["risky"] == RISKY_PROMPT == game.risky_prompt()
    for text in (SAFE_PROMPT, RISKY_PROMPT):
        assert text.endswith("\n\nChoice: ") and text.startswith("Slot Machine Game\n\nGame history:\n")
    assert "Current balance: $140" in SAFE_PROMPT and "1) Bet $10\n2) Stop" in SAFE_PROMPT
    assert "Round 2: Bet $100, Loss, Balance $30" in RISKY_PROMPT
    assert "Current balance: $20" in RISKY_PROMPT and "1) Bet (choose $5-$100)" in RISKY_PROMPT
    assert SAFE_PROMPT.count("\n") == 18 and RISKY_PROMPT.count("\n") == 18


def test_overrides_and_relative_paths(tmp_path):
    (tmp_path / "models" / "m").mkdir(parents=True)
    (tmp_path / "c.yaml").write_text(
        "model: {name_or_path: models/m, dtype: float16}\n"
        "data: {checkpoints_dir: ck, responses_dir: /abs/resp}\n"
        "cache_dir: out\n"
    )
    cfg = load_config(tmp_path / "c.yaml", parse_set_arguments(["pathways.n_replay=7", "model.device=cpu",
                                                                 "pathways.max_graph_layers=null"]))
    assert cfg.model.name_or_path == str(tmp_path / "models" / "m")
    assert cfg.model.dtype == "float16" and cfg.model.device == "cpu"
    assert cfg.data.checkpoints_dir == str(tmp_path / "ck") and cfg.data.responses_dir == "/abs/resp"
    assert cfg.cache == tmp_path / "out"
    assert cfg.pathways.n_replay == 7 and cfg.pathways.max_graph_layers is None
    # a hub id is left alone
    assert load_config(None).model.name_or_path == "meta-llama/Llama-3.1-8B"


@pytest.mark.parametrize(
    "text, message",
    [
        ("modle: {}\n", "unknown key(s) modle in top level"),
        ("model: {dtype: float8}\n", "model.dtype must be one of"),
        ("pathways: {n_replay: many}\n", "pathways.n_replay must be an integer"),
        ("pathways: {prompts: [safe, calm]}\n", "pathways.prompts names 'calm'"),
        ("sae: {convention: topk}\n", "sae.convention must be one of study, jumprelu, saelens"),
        ("- a list\n", "must hold a mapping"),
        ("model: [unclosed\n", "is not valid YAML"),
    ],
)
def test_bad_config_names_the_key(tmp_path, text, message):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(UserError) as err:
        load_config(p)
    assert message in str(err.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(UserError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_config_hash_changes_with_section():
    a, b = Config(), Config()
    b.pathways.n_replay = 3
    assert a.hash("model", "sae") == b.hash("model", "sae")
    assert a.hash("pathways") != b.hash("pathways")
