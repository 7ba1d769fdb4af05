"""The config system: every shipped YAML loads, precedence, value parsing and the error messages."""

from __future__ import annotations

import dataclasses
import re
import sys
import types
from pathlib import Path

import pytest
import yaml

from leaplm.config import Config, ConfigError, parse_config, parse_override
from leaplm.inference.engine import check_config_decoders
from leaplm.train import recipes
from leaplm.train.recipes import load_config

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted((REPO / "configs").rglob("*.yaml"))


def test_configs_directory_is_found_recursively():
    # configs/<recipe>/<model>.yaml lives one level down: a non-recursive glob would find nothing
    # and the parametrized test below would pass vacuously.
    assert REPO / "configs" / "pretrain" / "tiny_teacher.yaml" in SHIPPED


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(REPO / "configs")))
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    raw = yaml.safe_load(path.read_text())
    assert cfg.recipe == raw.get("recipe", "pretrain")
    assert dataclasses.is_dataclass(cfg.method)  # validated against the recipe's method config
    check_config_decoders(cfg)  # its eval and rollout decoders exist and take its settings


def write_yaml(tmp_path: Path, tree: dict) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def test_defaults_then_yaml_then_overrides(tmp_path):
    path = write_yaml(tmp_path, {
        "train": {"lr": 1e-3, "max_steps": 50},
        "data": {"max_length": 128},
        "model": {"init": {"architecture": "llama", "hidden_size": 64}},
    })
    cfg = load_config(path, ["train.lr=5e-4", "model.init.hidden_size=32"])
    assert cfg.train.lr == 5e-4  # override beats YAML
    assert cfg.train.max_steps == 50 and cfg.data.max_length == 128  # YAML beats defaults
    assert cfg.train.micro_batch_size == Config().train.micro_batch_size  # untouched default
    # Overriding one nested key keeps its YAML siblings instead of resetting them.
    assert cfg.model.init == {"architecture": "llama", "hidden_size": 32}


@pytest.mark.parametrize(
    "text, value",
    [
        ("train.lr=3e-4", 3e-4),  # YAML 1.1 would read this as a string
        ("train.lr=1e5", 1e5),
        ("train.lr=1.5E-3", 1.5e-3),
        ("train.max_steps=20", 20),
        ("logging.wandb=true", True),
        ("logging.wandb=False", False),
        ("train.mixed_precision=no", "no"),  # YAML 1.1 would read this as False
        ("export.dir=null", None),
        ("export.dir=", None),
        ("eval.tasks=[copy, sort]", ["copy", "sort"]),
        ("train.betas=[0.9, 1e-2]", [0.9, 0.01]),
        ("output_dir=runs/v1.2e", "runs/v1.2e"),
    ],
)
def test_override_values_are_parsed(text, value):
    keys, parsed = parse_override(text)
    assert keys == text.split("=", 1)[0].split(".")
    assert parsed == value and type(parsed) is type(value)


def test_parsed_overrides_reach_the_config():
    cfg = load_config(None, ["train.lr=3e-4", "train.betas=[0.9, 0.99]", "eval.tasks=[copy]", "export.dir=null",
                             "train.mixed_precision=no", "train.max_grad_norm=1"])
    assert (cfg.train.lr, cfg.train.betas, cfg.eval.tasks) == (3e-4, [0.9, 0.99], ["copy"])
    assert cfg.export.dir is None and cfg.train.mixed_precision == "no"
    assert type(cfg.train.max_grad_norm) is float  # an int where a float is expected is widened


def test_yaml_files_read_scientific_notation_and_no_like_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  lr: 3e-4\n  mixed_precision: no\n")
    cfg = load_config(path)
    assert cfg.train.lr == 3e-4 and cfg.train.mixed_precision == "no"


@pytest.mark.parametrize("text", ["train.lr", "--train.lr=3e-4"])
def test_malformed_override_shows_the_expected_form(text):
    with pytest.raises(ConfigError, match=r"section\.key=value"):
        load_config(None, [text])


def field_names(obj) -> list[str]:
    return [f.name for f in dataclasses.fields(obj)]


@pytest.mark.parametrize(
    "override, shown, valid",
    [
        ("trian.lr=1", "'trian'", field_names(Config)),
        ("train.lrr=1", "'train.lrr'", field_names(Config().train)),
        ("model.lora.rank=8", "'model.lora.rank'", field_names(Config().model.lora)),
    ],
)
def test_unknown_key_lists_the_valid_keys(override, shown, valid):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    message = str(err.value)
    assert f"unknown config key {shown}" in message
    listed = message.split("valid keys", 1)[1].split(":", 1)[1]
    assert [k.strip() for k in listed.split(",")] == valid


def test_unknown_key_in_a_yaml_file_is_an_error_too(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'data.max_len'; valid keys in data: source, "):
        load_config(write_yaml(tmp_path, {"data": {"max_len": 64}}))


# A recipe with method options, registered for these tests only: `method` is validated against
# the method config of whichever recipe the config names.
@dataclasses.dataclass
class FakeMethod:
    block_size: int = 4
    mask_schedule: str = "linear"

    def __post_init__(self):
        if self.block_size < 1:
            raise ConfigError(f"method.block_size must be >= 1, got {self.block_size}")


@pytest.fixture
def fake_recipe(monkeypatch):
    module = types.ModuleType("leaplm_test_fake_recipe")
    module.RECIPE = recipes.Recipe(
        name="fake", description="test", method_config=FakeMethod,
        build_model=None, build_dataset=None, build_collator=None, loss=None, decoder=lambda cfg: ("ar", {}),
    )
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(recipes.RECIPE_MODULES, "fake", module.__name__)
    return "fake"


def test_method_section_is_validated_against_the_recipe(fake_recipe):
    cfg = load_config(None, [f"recipe={fake_recipe}", "method.block_size=8"])
    assert cfg.method == FakeMethod(block_size=8)
    with pytest.raises(ConfigError, match=r"unknown config key 'method.block'; valid keys in method: block_size, mask_schedule$"):
        load_config(None, [f"recipe={fake_recipe}", "method.block=8"])
    with pytest.raises(ConfigError, match=r"method.block_size: expected int, got str 'big'"):
        load_config(None, [f"recipe={fake_recipe}", "method.block_size=big"])
    with pytest.raises(ConfigError, match=r"method.block_size must be >= 1, got 0"):
        load_config(None, [f"recipe={fake_recipe}", "method.block_size=0"])


def test_unknown_method_key_lists_the_recipes_options():
    with pytest.raises(ConfigError, match=r"unknown config key 'method.block_size'; valid keys in method: \(none\)"):
        load_config(None, ["method.block_size=4"])


def test_unknown_recipe_lists_the_available_ones():
    with pytest.raises(ConfigError, match=r"recipe: unknown recipe 'nope'; available: pretrain"):
        load_config(None, ["recipe=nope"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.max_steps=abc", r"train.max_steps: expected int, got str 'abc'"),
        ("train.max_steps=true", r"train.max_steps: expected int, got True"),
        ("train.max_steps=2.5", r"train.max_steps: expected int, got float 2.5"),
        ("model.lora.r=x", r"model.lora.r: expected int, got str 'x'"),
        ("eval.tasks=copy", r"eval.tasks: expected a list, got 'copy'"),
        ("train.betas=[0.9, high]", r"train.betas\[1\]: expected float, got str 'high'"),
        ("export.dir=5", r"export.dir: expected str, got int 5"),
        ("model.init=5", r"model.init: expected a mapping, got 5"),
        ("train=5", r"train: expected a mapping of \['attention', 'betas', 'fused_loss', 'grad_accum'"),
    ],
)
def test_wrong_type_names_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


@pytest.mark.parametrize(
    "override, choices",
    [
        ("data.overlong=skip", "['drop', 'truncate', 'error']"),
        ("train.lr_schedule=step", "['cosine', 'linear', 'constant']"),
        ("model.dtype=fp8", "['float32', 'bfloat16', 'float16']"),
        ("train.mixed_precision=fp32", "['no', 'bf16', 'fp16']"),
    ],
)
def test_literal_fields_list_their_choices(override, choices):
    key, value = override.split("=")
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert str(err.value) == f"{key}: {value!r} is not one of {choices}"


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.max_length=4", "data.max_length must be >= 8, got 4"),
        ("train.grad_accum=0", "train.grad_accum must be >= 1, got 0"),
        ("train.micro_batch_size=-1", "train.micro_batch_size must be >= 1, got -1"),
        ("train.lr=0", "train.lr must be > 0, got 0.0"),
        ("train.betas=[0.9]", "train.betas needs two values, got [0.9]"),
        ("model.lora.r=-2", "model.lora.r must be >= 0 (0 disables LoRA), got -2"),
    ],
)
def test_cross_field_rules_of_each_section(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert str(err.value) == message


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["eval.decoder=nosuch"],
         "eval.decoder: unknown decoder 'nosuch'; available: ar, block_diffusion, clover, eagle3, "),
        (["eval.decoder_settings={threshold: 1.5}"],
         "eval.decoder_settings: decoder 'ar' has no setting 'threshold'; its settings: temperature, top_k, top_p, seed, "),
        (["eval.decoder=block_diffusion", "eval.decoder_settings={threshold: 1.5}"],
         "eval.decoder_settings: threshold must be in (0, 1] "),
        (["eval.decoder=block_diffusion", "eval.decoder_settings={block_size: 8, sub_block_size: 3}"],
         "eval.decoder_settings: sub_block_size=3 does not divide block_size=8; choose one of 1, 2, 4, 8"),
        (["eval.decoder=speculative"], "eval.decoder_settings: speculative needs a draft model: set draft to "),
        (["rollout.decoder=nosuch"], "rollout.decoder: unknown decoder 'nosuch'; available: ar, "),
        (["rollout.decoder=jacobi", "rollout.decoder_settings={init: random}"],
         "rollout.decoder_settings: unknown init 'random'; choose one of prompt, pad, repeat, lookup"),
        (["rollout.decoder_settings={temperature: high}"], "rollout.decoder_settings: temperature must be >= 0"),
        (["eval.decoder=block_diffusion", "eval.decoder_settings={eos_fill: 1}"],
         "eval.decoder_settings: decoder 'block_diffusion'.eos_fill: expected bool, got int 1"),
    ],
    ids=["unknown-decoder", "another-decoders-setting", "threshold-range", "sub-block-size", "no-draft-model",
         "unknown-rollout-decoder", "jacobi-init", "temperature-type", "typed-setting"],
)
def test_decoders_and_their_settings_are_checked_when_the_config_loads(tmp_path, overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"output_dir={tmp_path / 'run'}", *overrides])
    assert str(err.value).startswith(message)
    # the recipe-agnostic parse passes; it leaves eval.decoder to the recipe, so it is named here (pretrain's)
    raw = parse_config(None, [f"output_dir={tmp_path / 'run'}", "eval.decoder=ar", *overrides])
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_config_decoders(raw)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("recipe, overrides, decoder", [
    ("pretrain", [], ("ar", {})),
    ("draft_heads", [], ("medusa", {})),
    ("draft_heads", ["method.variant=hydra_pp"], ("hydra", {})),
    ("cllm", ["method.jacobi_block_size=8"], ("jacobi", {"jacobi_block_size": 8})),
    ("jacobi_forcing", [], ("jacobi_multiblock", {"jacobi_block_size": 16})),
    ("ar2bd", ["method.block_size=8"], ("block_diffusion", {"block_size": 8})),
    ("cd4lm", [], ("block_diffusion", {"threshold": 0.95, "max_per_step": 32})),
    ("learn2pd", [], ("block_diffusion", {"rule": "filter", "eos_fill": True})),
    # settings given without a decoder go over the recipe's; a named decoder is kept as it is
    ("cd4lm", ["eval.decoder_settings={threshold: 0.8}"], ("block_diffusion", {"threshold": 0.8, "max_per_step": 32})),
    ("draft_heads", ["eval.decoder=ar"], ("ar", {})),
])
def test_eval_decoder_defaults_to_the_recipes_own(recipe, overrides, decoder):
    cfg = load_config(None, [f"recipe={recipe}", *overrides])
    assert (cfg.eval.decoder, cfg.eval.decoder_settings) == decoder


def test_settings_a_decoder_takes_pass():
    check_config_decoders(load_config(None, ["eval.decoder=block_diffusion", "rollout.decoder=jacobi",
                                             "eval.decoder_settings={threshold: 0.9, sub_block_size: 8}",
                                             "rollout.decoder_settings={jacobi_block_size: 16, init: lookup}"]))


@pytest.mark.parametrize("overrides, message", [
    (["eval.decoder_args={}"], "config key 'eval.decoder_args' was renamed to 'eval.decoder_settings'"),
    (["rollout.decoder_args={}"], "config key 'rollout.decoder_args' was renamed to 'rollout.decoder_settings'"),
    (["recipe=cllm", "method.block_size=8"], "config key 'method.block_size' was renamed to 'method.jacobi_block_size'"),
    (["recipe=jacobi_forcing", "method.stages=[{block_size: 8, max_steps: 1}]"],
     "config key 'method.stages[0].block_size' was renamed to 'method.stages[0].jacobi_block_size'"),
    (["recipe=jacobi_forcing", "method.temperature=2.0"],
     "config key 'method.temperature' was renamed to 'method.distill_temperature'"),
    (["recipe=dparallel", "method.temperature=0.5"],
     "config key 'method.temperature' was renamed to 'method.entropy_temperature'"),
    (["recipe=cd4lm", "method.temperature=2.0"], "config key 'method.temperature' was renamed to 'method.kl_temperature'"),
    (["recipe=acceptance_head", "method.temperature=0.0"],
     "config key 'method.temperature' was renamed to 'method.draft_temperature'"),
    (["recipe=draft_heads", "method.block_size=8"],
     "config key 'method.block_size' was renamed to 'method.rollout_block_size'"),
])
def test_a_renamed_key_is_refused_with_its_new_name(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert str(err.value) == message


def test_a_renamed_decoder_setting_is_refused_with_its_new_name():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["eval.decoder=jacobi", "eval.decoder_settings={block_size: 8}"])
    assert str(err.value) == ("eval.decoder_settings: decoder 'jacobi': the setting 'block_size' was renamed to "
                              "'jacobi_block_size'")


@pytest.mark.parametrize("text", ["{block_size:8}", "{threshold: 0.9, block_size:8}"])
def test_key_colon_value_without_a_space_is_refused_with_the_fix(tmp_path, text):
    # YAML's flow syntax reads {block_size:8} as the key "block_size:8" with no value.
    message = "eval.decoder_settings: YAML reads {block_size:8} as the key 'block_size:8' with no value; " \
              "write `{block_size: 8}` with a space after the colon"
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"eval.decoder_settings={text}"])
    assert str(err.value) == message
    path = tmp_path / "run.yaml"
    path.write_text(f"eval:\n  decoder: block_diffusion\n  decoder_settings: {text}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == message


def test_missing_file_and_non_mapping_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "absent.yaml")
    path = tmp_path / "list.yaml"
    path.write_text("- train\n- data\n")
    with pytest.raises(ConfigError, match="the top level must be a mapping of sections"):
        load_config(path)


@pytest.mark.parametrize("source", [None, REPO / "configs" / "pretrain" / "tiny_teacher.yaml"], ids=["defaults", "teacher"])
def test_saved_config_round_trips(tmp_path, source):
    cfg = load_config(source, ["train.lr=3e-4", "train.mixed_precision=no", "eval.tasks=[copy, story]",
                               "model.lora.r=8", "export.dir=null", "data.overlong=truncate"])
    cfg.save(tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg
    assert again.to_dict() == cfg.to_dict()


def test_each_decoders_settings_are_a_typed_dataclass_of_its_signature():
    from leaplm.inference.engine import DECODERS, decoder_setting_names, decoder_settings_type

    for name in DECODERS:
        fields = {f.name: f for f in dataclasses.fields(decoder_settings_type(name))}
        assert list(fields) == decoder_setting_names(name)
    settings = decoder_settings_type("block_diffusion")
    assert settings().threshold == 0.9 and settings(threshold=0.5).threshold == 0.5
    with pytest.raises(ConfigError, match="verify"):  # not a block_diffusion setting: the engine names it
        check_config_decoders(parse_config(None, ["eval.decoder=jacobi", "eval.decoder_settings={verify: true}"]))
