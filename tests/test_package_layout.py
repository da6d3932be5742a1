"""One place per decision: the registry of generator kinds, where guidance lives, the shipped configs."""
import ast
from pathlib import Path

import pytest
import yaml

import tokenpaint
from tokenpaint.resources import config_path, configs_dir
from tokenpaint.transformer import (CONFIG_CLASSES, GENERATORS, GPT, MaskedTransformer, generator_class,
                                    load_transformer_yaml, preset_config)

SRC = Path(tokenpaint.__file__).resolve().parent


def imported_modules(path: Path) -> set[str]:
    """Module names a file imports (relative imports as written, e.g. '.gpt')."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            names.add("." * node.level + (node.module or ""))
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def test_one_registry_of_generator_kinds():
    assert GENERATORS == {"gpt": GPT, "mim": MaskedTransformer}
    assert CONFIG_CLASSES == {kind: cls.config_class for kind, cls in GENERATORS.items()}
    assert {preset_config(name).kind for name in ("gpt_base", "mim_base")} == {"gpt", "mim"}
    with pytest.raises(ValueError, match=r"run/config.json: unknown generator kind 'vae'; expected one of \['gpt', 'mim'\]"):
        generator_class("vae", "run/config.json")


def test_saving_and_loading_code_does_not_import_the_models():
    """io.py is imported by the model base class: importing the models back from it would close a circle."""
    imports = imported_modules(SRC / "transformer" / "io.py")
    assert not imports & {".gpt", ".masked", ".base", ".kinds"}, imports


def test_the_kind_is_read_from_the_config_only():
    for path in SRC.rglob("*.py"):
        assert 'hasattr(model, "mask_token_id")' not in path.read_text(encoding="utf-8"), path


def test_guidance_lives_in_one_module():
    """The guidance formula, batch doubling and schedules are defined in sampling/guidance.py and nowhere else."""
    names = {"apply_guidance", "guidance_enabled", "prepare_text_pair", "split_guidance", "double_for_guidance",
             "guidance_at"}
    for path in SRC.rglob("*.py"):
        defined = {n.name for n in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
                   if isinstance(n, ast.FunctionDef)}
        if path != SRC / "sampling" / "guidance.py":
            assert not defined & names, (path, defined & names)


def test_shipped_configs_are_found_inside_the_package(tmp_path):
    from tokenpaint import demo

    assert Path(demo.CONFIG_DIR) == configs_dir() / "demo"
    for name in ("vqgan_f16_16384.yaml", "gpt_base.yaml", "gpt_large.yaml", "mim_base.yaml"):
        assert config_path(name).is_file()
    assert load_transformer_yaml(config_path("demo", "mim.yaml"))["model"]["kind"] == "mim"
    assert yaml.safe_load(config_path("demo", "vqgan.yaml").read_text())["model"]
    with pytest.raises(FileNotFoundError, match="no shipped config demo/nope.yaml"):
        config_path("demo", "nope.yaml")
