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


@pytest.mark.parametrize(
    "text, message",
    [
        ("pathways: {n_replay: -1}\n", "config pathways.n_replay must be 0 or more, got -1"),
        ("audit: {run_gap_days: -0.5}\n", "config audit.run_gap_days must be 0 or more, got -0.5"),
        ("audit: {max_examples_per_kind: -3}\n", "config audit.max_examples_per_kind must be 0 or more, got -3"),
        ("pathways: {chunk_size: 0}\n", "config pathways.chunk_size must be at least 1, got 0"),
        ("app: {port: 70000}\n", "config app.port must be between 1 and 65535, got 70000"),
        ("audit: {min_bet: 50, max_bet: 10}\n", "audit.min_bet (50) is above audit.max_bet (10)"),
        # digits of other scripts: int() reads them, the config does not
        ("pathways: {n_replay: '\u0661\u0662'}\n", "pathways.n_replay must be an integer (ASCII digits), got '\u0661\u0662'"),
        ("pathways: {n_replay: '\uff11'}\n", "must be an integer (ASCII digits)"),
        ("pathways: {n_replay: 1000000000000000000000000000000}\n", "pathways.n_replay is too large: a 100-bit integer, the limit is 64-bit"),
        ("pathways: {coverage: .nan}\n", "pathways.coverage must be a finite number, got nan"),
        ("audit: {run_gap_days: 1e999}\n", "audit.run_gap_days must be a finite number"),
        ("prompts: {safe: \"a\\udcffb\"}\n", "config prompts.safe holds an invalid character '\\udcff' at position 1"),
        ("model: 3\n", "config model must be a mapping, got int 3"),
        ("sae: {folder_template: 'L{layer}-{width}'}\n", "sae.folder_template 'L{layer}-{width}' is not a valid template"),
        ("sae: {folder_template: '../{layer}'}\n", "must be a folder name inside sae.source"),
        ("'[' : 1\n1: 2\n", "unknown key(s) 1, [ in top level"),
        pytest.param("pathways: {n_replay: " + "9" * 5000 + "}\n", "is not valid YAML: Exceeds the limit (4300 digits)",
                     id="5000-digit-int"),
        pytest.param("a: " + "[" * 10000 + "\n", "is nested more than 100 brackets deep (line 1)", id="10000-deep"),
        ("42\n", "must hold a mapping at the top level, not a int"),
        ("model: {dtype: bfloat16\n", "is not valid YAML: expected ',' or '}', but got '<stream end>' at line 2, column 1"),
    ],
)
def test_bad_values_one_line_naming_file_and_key(tmp_path, text, message):
    p = tmp_path / "bad.yaml"
    p.write_text(text, encoding="utf-8")
    with pytest.raises(UserError) as err:
        load_config(p)
    assert message in str(err.value)
    assert str(p) in str(err.value) and "\n" not in str(err.value)


def test_bad_bytes_name_the_offset(tmp_path):
    p = tmp_path / "latin1.yaml"
    p.write_bytes("cache_dir: out\n# caf\u00e9\n".encode("latin-1"))
    with pytest.raises(UserError) as err:
        load_config(p)
    assert str(err.value) == f"config file {p} is not UTF-8 text: byte 0xe9 at line 2 (offset 20); save it as UTF-8"
    p.write_bytes(b"\xef\xbb\xbfcache_dir: out\n")  # a BOM is fine
    assert load_config(p).cache == tmp_path / "out"


def test_yaml_dates_and_set_values(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("data: {since: 2024-01-31}\n")
    assert load_config(p).data.since == "2024-01-31"
    with pytest.raises(UserError, match=r"config pathways.n_replay must be 0 or more, got -2 \(in .*c.yaml or --set\)"):
        load_config(p, parse_set_arguments(["pathways.n_replay=-2"]))
    with pytest.raises(UserError, match=r"\(from --set\)$"):
        load_config(None, parse_set_arguments(["audit.workers=0"]))
