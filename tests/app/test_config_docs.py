"""Each setting declared once: `kto-loop run`'s flags, the aligner's flags, the two dataclasses and the generated
docs/configuration.md agree, and no setting's default is written in two places."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import re
from pathlib import Path

import pytest

from aligner import cli as aligner_cli
from aligner.config import SETTINGS, TrainConfig, flag
from app.cli import build_parser, main
from app.cli.config import REGENERATE, _shown, markdown, sections
from app.config import Config, _env, config_from

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "configuration.md"
CONFIG_FIELDS = {f.name: f for f in dataclasses.fields(Config)}
# The same name in both dataclasses for two different settings: the app's cap on the snapshot a run exports vs the
# aligner's cap within a snapshot; the model directory, which the aligner requires and the app derives from --home.
SAME_NAME_OTHER_SETTING = {"max_examples", "model_dir"}


def _page_rows(part: str) -> dict[str, list[str]]:
    """First flag of each table row → its cells, in the page's start-up part or its aligner part."""
    text = PAGE.read_text().split("## The aligner")[0 if part == "app" else 1]
    rows = {}
    for line in text.splitlines():
        if line.startswith("| `--"):
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
            rows[re.match(r"`(--[\w-]+)`", cells[0]).group(1)] = cells
    return rows


def _leaf(command: str) -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[command]


def test_committed_page_is_the_generated_one():
    assert PAGE.read_text() == markdown(), f"docs/configuration.md is stale: regenerate it with `{REGENERATE}`"


def test_every_start_up_setting_has_one_flag_env_var_and_default_in_run_help_and_page():
    run = _leaf("run")
    rows = _page_rows("app")
    assert set(rows) == {"--" + n.replace("_", "-") for n in CONFIG_FIELDS}
    defaults = config_from(None, environ={})
    for name, f in CONFIG_FIELDS.items():
        action = run._option_string_actions["--" + name.replace("_", "-")]
        assert action.default is argparse.SUPPRESS  # no "(default: None)"; env vars still apply
        assert f"env {_env(name)}; default {f.default!r}" in action.help.replace("%%", "%")
        cells = rows["--" + name.replace("_", "-")]
        assert cells[1].startswith(f"`{_env(name)}`") and cells[2] == _shown(f.default), name
        if f.default is not None and not isinstance(f.default, Path):
            assert getattr(defaults, name) == f.default, name
    own = {o for a in run._actions for o in a.option_strings} - {"-h", "--help"}
    assert own == {"--" + n.replace("_", "-") for n in CONFIG_FIELDS}, "every flag of `run` is a declared setting"


def test_every_aligner_setting_has_its_flag_default_and_page_row_from_the_dataclass():
    parser = aligner_cli.build_parser()
    rows = _page_rows("aligner")
    assert set(rows) == {flag(n) for n in SETTINGS}
    for name, f in SETTINGS.items():
        action = parser._option_string_actions[flag(name)]
        assert action.dest == name
        if f.default is dataclasses.MISSING:
            assert action.required and rows[flag(name)][1] == "required"
        else:
            assert action.default == f.default and not action.required, name
            assert rows[flag(name)][1] == _shown(f.default), name
        if f.metadata["choices"]:
            assert tuple(action.choices) == f.metadata["choices"]
    dests = {a.dest for a in parser._actions} - {"help", "progress_json"}
    assert dests == set(SETTINGS), "every aligner flag but --progress-json is a TrainConfig field"


def _class_defaults(path: Path, cls: str) -> dict[str, ast.expr]:
    tree = ast.parse(path.read_text())
    body = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls).body
    return {n.target.id: n.value for n in body if isinstance(n, ast.AnnAssign) and n.value is not None}


def _literals(node: ast.expr) -> list[object]:
    """The literal numbers and strings a default expression is built from (its help text excluded)."""
    if isinstance(node, ast.Call):
        node = node.args[0] if node.args else None
    return [n.value for n in ast.walk(node) if isinstance(n, ast.Constant)] if node is not None else []


def test_no_setting_has_two_declarations_of_its_default():
    app_decl = _class_defaults(ROOT / "app" / "config.py", "Config")
    shared = set(CONFIG_FIELDS) & set(SETTINGS) - SAME_NAME_OTHER_SETTING
    assert {"beta", "lora_rank", "anchor_max_tokens", "first_lora_layer"} <= shared
    for name in shared:
        f = CONFIG_FIELDS[name]
        assert f.metadata.get("aligner") == name, f"{name}: the app must take the aligner's declaration"
        assert f.default == SETTINGS[name].default and f.metadata["help"] == SETTINGS[name].metadata["help"]
        assert not _literals(app_decl[name]) or _literals(app_decl[name]) == [name], \
            f"app/config.py retypes the default of {name}"
    # a forwarded setting has one name: the app's flag and env var are the aligner's flag name
    forwarded = {n: f.metadata["aligner"] for n, f in CONFIG_FIELDS.items() if f.metadata.get("aligner")}
    assert forwarded == {n: n for n in shared}
    assert "anchor_tokens" not in CONFIG_FIELDS
    # the vLLM server's rank limit is the one the aligner checks adapters against
    assert _literals(app_decl["vllm_max_lora_rank"]) == ["max_lora_rank"]
    assert CONFIG_FIELDS["vllm_max_lora_rank"].default == SETTINGS["max_lora_rank"].default
    # the aligner's command lines declare no default of their own
    for path in (ROOT / "aligner" / "cli.py", ROOT / "app" / "cli" / "align.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument":
                assert not any(k.arg == "default" for k in node.keywords), f"{path}:{node.lineno} has a default"
                assert all(not isinstance(a, ast.Constant) or a.value in ("--progress-json", "--now", "--no-wait")
                           for a in node.args), f"{path}:{node.lineno} declares a flag outside TrainConfig"


def _same(shown: str, declared: object) -> bool:
    try:
        return float(shown) == float(declared)
    except (TypeError, ValueError):
        return shown == str(declared)


@pytest.mark.parametrize("doc", ["README.md", "docs/performance.md"])
def test_hand_written_settings_tables_quote_the_declared_defaults(doc):
    """A table row naming flags and backquoted defaults (`--a` / `--b` | `1` / `2`) must say what is declared."""
    checked = 0
    for line in (ROOT / doc).read_text().splitlines():
        cells = [c.strip() for c in line.split("|")[1:-1]]
        flags = re.findall(r"(the aligner's )?`--([\w-]+)`", cells[0]) if cells else []
        if len(cells) < 3 or not flags:
            continue
        defaults = [d.strip() for d in cells[2 if doc == "README.md" else 1].split(" / ")]
        if len(flags) != len(defaults):
            continue
        for (aligner, name), shown in zip(flags, defaults, strict=True):
            key = name.replace("-", "_")
            f = SETTINGS.get(key) if aligner or ("the aligner's" in cells[0] and key not in CONFIG_FIELDS) \
                else CONFIG_FIELDS.get(key)
            assert f is not None, f"{doc}: --{name} is no declared setting"
            if re.fullmatch(r"`[^`]*`", shown):
                assert _same(shown.strip("`"), f.default), f"{doc}: --{name} shown as {shown}, declared {f.default!r}"
                checked += 1
    assert checked >= 3
    if doc == "README.md":
        assert "](docs/configuration.md)" in (ROOT / doc).read_text()


def test_sections_cover_every_field_once():
    for cls in (Config, TrainConfig):
        names = [f.name for _, _, fs in sections(cls) for f in fs]
        assert names == [f.name for f in dataclasses.fields(cls)]
    assert [t for t, _, _ in sections(Config)][:2] == ["Where things live", "Network"]


def _help(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as e:
        main(list(argv))
    assert e.value.code == 0
    return capsys.readouterr().out


def test_align_help_shows_the_aligners_flags_not_the_shared_ones(capsys):
    text = _help(capsys, "align", "--help")
    for name in SETTINGS:
        assert flag(name) in text, name
    assert "(default: None)" not in text
    for app_only in ("--vllm-port", "--admin-password", "--schedule-cron", "--home"):
        assert app_only not in text.split("kto-loop's start-up settings")[0], app_only
    assert len(text.splitlines()) < 200
    assert "(default: None)" not in _help(capsys, "run", "--help")


def test_no_command_help_says_default_none():
    from app.cli import _leaf_parsers

    for leaf in _leaf_parsers(build_parser()):
        text = leaf.format_help()
        assert "(default: None)" not in text and "(default: False)" not in text, leaf.prog


def test_kto_loop_align_trains_with_its_flags_the_home_model_and_the_apps_forwarded_settings(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(aligner_cli, "train", lambda values, progress_json=False: calls.append(values) or 0)
    monkeypatch.setenv("KTO_LOOP_BETA", "0.2")
    monkeypatch.setenv("KTO_LOOP_ANCHOR_MAX_TOKENS", "16")
    assert main(["align", "--home", str(tmp_path), "--snapshot", "s.parquet", "--out", "o", "--epochs", "2"]) == 0
    assert main(["align", "--snapshot", "s.parquet", "--out", "o", "--beta", "0.3", "--model-dir", "m"]) == 0
    first, second = calls
    assert first["model_dir"] == str(tmp_path / "models" / "SmolLM2-135M-Instruct")
    assert (first["beta"], first["anchor_max_tokens"], first["epochs"]) == (0.2, 16, 2)
    assert (second["beta"], second["model_dir"]) == (0.3, "m")  # the flag beats the env var
    cfg = TrainConfig(**first)
    assert cfg.lr == SETTINGS["lr"].default and cfg.snapshot == "s.parquet"


def test_kto_loop_align_refuses_what_it_cannot_do(capsys):
    assert main(["align", "--out", "o"]) == 2
    assert "--snapshot needed" in capsys.readouterr().err
    assert main(["align", "--now", "--epochs", "2"]) == 2  # refused before any app or server is contacted
    assert "--epochs apply to the aligner alone" in capsys.readouterr().err


def test_kto_loop_align_now_takes_shared_flags_as_the_apps_settings(tmp_path):
    args = build_parser().parse_args(["align", "--now", "--beta", "0.3", "--model-dir", str(tmp_path),
                                      "--home", str(tmp_path)])
    cfg = config_from(args, environ={"KTO_LOOP_BETA": "0.2"})
    assert (cfg.beta, cfg.model_dir, cfg.home) == (0.3, tmp_path, tmp_path)


def test_anchor_length_has_one_name_and_the_older_env_var_still_reads():
    assert config_from(None, {"KTO_LOOP_ANCHOR_TOKENS": "16"}).anchor_max_tokens == 16
    both = {"KTO_LOOP_ANCHOR_TOKENS": "16", "KTO_LOOP_ANCHOR_MAX_TOKENS": "8"}
    assert config_from(None, both).anchor_max_tokens == 8
    with pytest.raises(SystemExit, match=r"anchor_max_tokens must be in \[1, 512\], got 513"):
        config_from(None, {"KTO_LOOP_ANCHOR_MAX_TOKENS": "513"})
    with pytest.raises(SystemExit, match=r"beta must be > 0, got 0.0"):  # the aligner's declared range
        config_from(None, {"KTO_LOOP_BETA": "0"})


def test_config_command_prints_the_resolved_settings_and_the_page(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("KTO_LOOP_ADMIN_PASSWORD", "s3cret")
    assert main(["config", "--home", str(tmp_path), "--beta", "0.25"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert (shown["beta"], shown["home"], shown["admin_password"]) == (0.25, str(tmp_path), "***")
    assert main(["config", "--markdown", "--beta", "0.25"]) == 0
    assert capsys.readouterr().out == markdown()  # declarations only: no flag or env var leaks into the page


def test_the_realigners_defaults_are_the_declared_ones():
    import inspect

    from app.loop.realign import Realigner

    tree = ast.parse((ROOT / "app" / "loop" / "realign.py").read_text())
    realigner = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Realigner")
    init = next(n for n in realigner.body if isinstance(n, ast.FunctionDef) and n.name == "__init__")
    declared = {"lora_rank": "lora_rank", "beta": "beta", "anchor_weight": "anchor_weight",
                "anchor_max_tokens": "anchor_max_tokens", "first_lora_layer": "first_lora_layer",
                "lr_generation_decay": "lr_generation_decay", "min_gain": "promote_min_gain",
                "max_examples": "max_examples", "mode": "align_mode"}
    params = inspect.signature(Realigner.__init__).parameters
    assert set(declared) <= set(params), "the Realigner names each setting as it is declared"
    for arg, node in zip(init.args.kwonlyargs, init.args.kw_defaults, strict=True):
        if arg.arg in declared:
            assert not isinstance(node, ast.Constant), f"Realigner retypes the default of {arg.arg}"
            assert params[arg.arg].default == CONFIG_FIELDS[declared[arg.arg]].default, arg.arg


def test_kto_loop_align_trains_a_real_adapter(tmp_path, tiny_model_dir, capsys):
    from tests.aligner.support import synthetic_rows, write_snapshot

    snap = write_snapshot(tmp_path / "s.parquet", synthetic_rows(10, 8, seed=1))
    out = tmp_path / "v1"
    assert main(["align", "--snapshot", str(snap), "--out", str(out), "--model-dir", str(tiny_model_dir),
                 "--max-length", "128", "--batch-size", "4", "--max-steps", "1", "--checkpoints", "0",
                 "--beta", "0.2", "--progress-json"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["beta"] == 0.2 and manifest["hyperparameters"]["max_steps"] == 1
    assert '"event": "done"' in capsys.readouterr().out


def test_operator_settings_default_to_the_start_up_settings():
    from app.operator_settings import OperatorSettings

    body = _class_defaults(ROOT / "app" / "operator_settings.py", "OperatorSettings")
    seeded = {"interval_minutes": "schedule_interval_minutes", "cron": "schedule_cron",
              "min_new_ratings": "min_new_ratings", "max_examples": "max_examples", "system_prompt": "system_prompt"}
    for name, setting in seeded.items():
        assert not isinstance(body[name], ast.Constant), f"OperatorSettings retypes the default of {name}"
        assert getattr(OperatorSettings(), name) == CONFIG_FIELDS[setting].default
