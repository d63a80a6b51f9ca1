import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from tests.helpers.runs import REPO
from trainer.config import (
    ConfigError,
    help_text,
    load_config,
    micro_batch_per_rank,
    parse_overrides,
    save_config,
    section_classes,
)
from trainer.config_parsing import ConfigYamlLoader, field_docs


def write(tmp_path, name, content):
    p = tmp_path / name
    p.write_text(content)
    return p


def test_yaml_then_overrides(tmp_path):
    p = write(tmp_path, "a.yaml", "model: {flavor: 210m}\noptim: {lr: 1e-3}\n")
    cfg = load_config(
        p,
        [
            "--optim.name=adafactor",
            "--optim.lr=3e-3",
            "--optim.beta1=null",
            "--run.dir=runs/x",
            "--train.max_steps=200",
        ],
    )
    assert cfg.model.d_model == 1024 and cfg.model.n_layers == 12
    assert cfg.optim.lr == 3e-3 and cfg.optim.beta1 is None
    assert cfg.run.dir == "runs/x" and cfg.train.max_steps == 200


def test_yaml_1_1_float_strings_are_numbers(tmp_path):
    # PyYAML reads "1e-3" (no dot) as a string; a float key still takes it.
    cfg = load_config(write(tmp_path, "a.yaml", "optim:\n  lr: 1e-3\n"))
    assert cfg.optim.lr == pytest.approx(1e-3)


def test_explicit_model_keys_beat_flavor(tmp_path):
    cfg = load_config(write(tmp_path, "a.yaml", "model: {flavor: 550m, n_layers: 2}\n"))
    assert cfg.model.d_model == 1280 and cfg.model.n_layers == 2


def test_base_inheritance(tmp_path):
    write(tmp_path, "base.yaml", "train: {max_steps: 10, global_batch: 8, micro_batch: 4}\noptim: {lr: 0.1}\n")
    (tmp_path / "sub").mkdir()
    p = write(tmp_path / "sub", "child.yaml", "base: ../base.yaml\noptim: {name: adamw}\n")
    cfg = load_config(p)
    assert cfg.train.max_steps == 10 and cfg.optim.lr == 0.1


@pytest.mark.parametrize(
    "overrides,match",
    [
        (["--optim.lrr=1"], r"unknown config key optim\.lrr\. Did you mean 'lr'"),
        (["--trian.max_steps=1"], r"unknown config section 'trian'\. Did you mean 'train'"),
        (["--train.max_steps=abc"], r"train\.max_steps: expected an integer"),
        (["--train.fused_update=1"], r"train\.fused_update: expected true or false"),
        (["--optim.lr=fast"], r"optim\.lr: expected a number"),
        (["--model.flavor=huge"], r"unknown model\.flavor 'huge'"),
        (["--train.micro_batch=7"], r"must split into 1 rank\(s\) x whole micro-batches of train\.micro_batch=7"),
        (
            ["--optim.name=adamem", "--optim.rank=256"],
            r"optim\.rank=256 exceeds .*model\.d_model=128.*--optim\.rank=128",
        ),
        (["--data.seq_len=4096"], r"exceeds model\.max_seq_len"),
        (["--model.arch=gpt"], r"model\.arch='gpt' is not one of 'olmo', 'llama'"),
        (["--model.mlp_hidden=0"], r"model\.mlp_hidden must be positive or null, got 0"),
        (["--model.norm_eps=0"], r"model\.norm_eps must be positive, got 0"),
        (["--train.precision=fp16"], r"train\.precision='fp16' is not one of 'auto', 'fp32', 'bf16'"),
        (["--train.device=gpu"], r"train\.device='gpu' is not one of 'auto', 'cpu', 'cuda'"),
        (["--optim.proj_type=stdd"], r"optim\.proj_type='stdd' is not one of .*Did you mean 'std'"),
        (["--optim.momentum_style=adm"], r"optim\.momentum_style='adm' is not one of 'adam', 'hf'.*\(or null\)"),
        (["--optim.update_norm=layer"], r"optim\.update_norm='layer' is not one of"),
        (["--optim.name=adamm"], r"unknown optimizer optim\.name='adamm'.*Did you mean 'adamem'"),
        (["--optim.name=galore_adamw", "--optim.delta=0.5"], r"optim\.delta=0\.5 is not read by galore_adamw.*adamem"),
        (["--optim.name=adamw", "--optim.beta1=null"], r"optim\.beta1"),
        (["--train.fused_update=true"], r"max_grad_norm=0"),
        (["--train.max_grad_norm=-1"], r"train\.max_grad_norm=-1\.0 must be a finite number >= 0"),
        (["--train.max_grad_norm=nan"], r"train\.max_grad_norm=nan must be a finite number >= 0"),  # silently no clip
        (["--optim.lr=.inf"], r"optim\.lr=inf is out of range: it must be > 0"),
        (["--adapter.method=lora", "--adapter.rank=8", "--adapter.alpha=.inf"], r"adapter\.alpha=inf must be a finite"),
        (["--data.seq_len=0"], r"data\.seq_len=0 must be positive"),
        (["--data.num_workers=-1"], r"data\.num_workers=-1 must be >= 0"),
        (["--data.seed=-1"], r"data\.seed=-1 must be >= 0"),
        (["--run.seed=-1"], r"run\.seed=-1 must be >= 0"),
        (["--model.d_model=0"], r"model\.d_model=0 is not a positive multiple of the head dimension 64"),
        (["--train.loss_chunk_tokens=-1"], r"train\.loss_chunk_tokens=-1 must be >= 0 \(0 = the full-logits loss\)"),
        (["--train.zero_stage=4"], r"train\.zero_stage=4 is not one of 1, 2, 3"),
        (["optim.lr=1"], r"use --section\.key=value"),
        (["--train.max_steps=-1"], r"train\.max_steps=-1 must be positive$"),
        (["--train.max_steps=0"], r"train\.max_steps=0 must be positive$"),  # trained nothing: "run already complete"
        (["--train.global_batch=0"], r"train\.global_batch=0 must be positive"),
        (["--eval.interval=-5"], r"eval\.interval=-5 must be >= 0 \(0 = only at the end\)"),
        (["--log.interval=0"], r"log\.interval=0 must be positive"),
        (["--checkpoint.interval=0"], r"checkpoint\.interval=0 must be positive"),
        (["--run.dir="], r"run\.dir is empty: .*--run\.dir=runs/<name>"),
        (["--optim.name=ADAMW"], r"unknown optimizer optim\.name='ADAMW'.*Did you mean 'adamw'"),
        (["--train.precision=BF16"], r"train\.precision='BF16' is not one of .*Did you mean 'bf16'"),
        (["--optim.lR=1"], r"unknown config key optim\.lR\. Did you mean 'lr'"),
        (["--train.device=CUDA"], r"train\.device='CUDA' is not one of .*Did you mean 'cuda'"),  # case-blind
        (["--optim.lr.x=1"], r"bad override '--optim\.lr\.x=1': the key must be section\.key"),  # not optim.lr
        # YAML's true is no number and 2.5 no integer: neither may pass as 1 / 1.0 / 2.
        (["--train.zero_stage=true"], r"train\.zero_stage=True is not one of 1, 2, 3"),
        (["--optim.lr=true"], r"optim\.lr: expected a number, got True"),
        (["--train.max_steps=true"], r"train\.max_steps: expected an integer, got True"),
        (["--train.max_steps=2.5"], r"train\.max_steps: expected an integer, got 2\.5$"),
        (["--run.dir=42"], r"run\.dir: expected a string, got 42"),
        (["--scheduler.warmup_steps=-1"], r"scheduler\.warmup_steps must be >= 0"),
        (["--scheduler.final_lr_ratio=1.5"], r"scheduler\.final_lr_ratio in \[0, 1\]"),
        (["--eval.batch_size=0"], r"eval\.batch_size=0 must be positive"),
        (["--checkpoint.keep_last=0"], r"checkpoint\.keep_last must be at least 1"),
    ],
)
def test_bad_config_errors_name_the_key(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)


def test_unknown_yaml_key(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key train\.max_step\. Did you mean 'max_steps'"):
        load_config(write(tmp_path, "a.yaml", "train: {max_step: 3}\n"))


def test_a_section_that_is_no_mapping(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^config section 'optim' must be a mapping of keys, got 'adamw'$"):
        load_config(write(tmp_path, "a.yaml", "optim: adamw\n"))


def test_an_inheritance_loop_is_an_error(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", "base: b.yaml\noptim: {lr: 0.1}\n")
    write(tmp_path, "b.yaml", "base: a.yaml\n")
    with pytest.raises(ConfigError, match=f"^config inheritance loop through {re.escape(str(tmp_path / 'a.yaml'))}$"):
        load_config(tmp_path / "a.yaml")


def test_an_override_that_is_no_yaml_is_taken_as_text() -> None:
    # "@" starts no YAML scalar: the value is kept as written instead of failing with a YAML error.
    assert load_config(None, ["--run.dir=@scratch/x"]).run.dir == "@scratch/x"


def test_values_at_the_edge_of_their_range_are_accepted() -> None:
    cfg = load_config(
        None,
        [
            "--scheduler.warmup_steps=0",
            "--scheduler.final_lr_ratio=1",  # a constant lr after warmup
            "--eval.batch_size=1",
            "--checkpoint.keep_last=1",
            "--optim.name=adamem",
            "--optim.rank=128",  # = model.d_model: full rank, allowed
            "--data.seq_len=512",  # = model.max_seq_len
            "--train.max_steps=1.0e+3",  # a YAML float that is a whole number
        ],
    )
    assert (cfg.scheduler.warmup_steps, cfg.scheduler.final_lr_ratio) == (0, 1.0)
    assert (cfg.eval.batch_size, cfg.checkpoint.keep_last, cfg.optim.rank) == (1, 1, 128)
    assert (cfg.model.d_model, cfg.data.seq_len, cfg.model.max_seq_len) == (128, 512, 512)
    assert cfg.train.max_steps == 1000 and type(cfg.train.max_steps) is int


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match=rf"{tmp_path} is a directory\. Pass the path of a YAML config file in it"):
        load_config(tmp_path)
    with pytest.raises(ConfigError, match=r"empty\.yaml is empty: write its sections, or pass another file"):
        load_config(write(tmp_path, "empty.yaml", "# nothing yet\n"))
    twice = "optim: {lr: 1.0e-3}\ntrain: {max_steps: 3}\noptim: {name: adafactor}\n"  # the second replaced the first
    with pytest.raises(ConfigError, match=r"(?s)not valid YAML: found the key 'optim' twice in one mapping .*line 3"):
        load_config(write(tmp_path, "twice.yaml", twice))
    with pytest.raises(ConfigError, match=r"found the key 'lr' twice"):
        load_config(write(tmp_path, "twice_inner.yaml", "optim: {lr: 1.0e-3, lr: 3.0e-3}\n"))
    merged = "base_optim: &o {lr: 1.0e-3, name: adafactor}\n"  # a merge key's keys may be overridden
    assert yaml.load(merged + "optim: {<<: *o, lr: 3.0e-3}\n", Loader=ConfigYamlLoader)["optim"] == {
        "lr": 3.0e-3,
        "name": "adafactor",
    }
    two = "a: &a {lr: 1.0e-3}\nb: &b {name: adafactor}\noptim: {<<: *a, <<: *b}\n"  # two merge keys, as PyYAML reads
    assert yaml.load(two, Loader=ConfigYamlLoader)["optim"] == {"lr": 1.0e-3, "name": "adafactor"}
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "bad.yaml", "train: {max_steps: [\n"))


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(None, ["--optim.name=adafactor", "--optim.beta1=null", "--model.flavor=210m"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["model"]["d_model"] == 1024


def test_shipped_configs_load():
    for name, gb, steps in (("configs/210m.yaml", 1024, 8000), ("configs/550m.yaml", 2048, 8000)):
        cfg = load_config(name)
        assert cfg.train.global_batch == gb and cfg.train.max_steps == steps
        assert cfg.data.seq_len == 512 and cfg.scheduler.warmup_steps == 2500
        o = cfg.optim
        assert (o.name, o.beta1, o.beta2, o.eps, o.weight_decay) == ("adamw", 0.9, 0.95, 1e-8, 0.01)
    load_config("configs/tiny.yaml")


def test_parse_overrides_types():
    assert parse_overrides(["--a.b=1", "--a.c=true", "--d.e=x"]) == {"a": {"b": 1, "c": True}, "d": {"e": "x"}}


def test_every_key_has_a_doc_and_help_lists_it():
    text = help_text()
    for section, cls in section_classes().items():
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            assert docs.get(f.name), f"{section}.{f.name} has no doc (a string under the field)"
            assert f"--{section}.{f.name}  (" in text
            assert docs[f.name] in text
    assert "--train.precision  ('auto' | 'fp32' | 'bf16', default auto)" in text
    assert "--optim.beta1  (float or null, default 0.9)" in text


def test_the_global_batch_must_split_over_the_ranks(monkeypatch):
    overrides = ["--train.global_batch=6", "--train.micro_batch=2"]
    load_config(None, overrides)
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ConfigError, match=r"global_batch=6 must split into 4 rank\(s\) x whole micro-batches"):
        load_config(None, overrides)


@pytest.mark.parametrize(
    "path",
    # sweep and study files are not configs (tests/trainer/test_sweep_files.py, tests/study/test_study_files.py)
    sorted(p for p in (REPO / "configs").rglob("*.yaml") if not {"sweeps", "studies"} & set(p.parts)),
    ids=lambda p: str(p.relative_to(REPO / "configs")),
)
def test_every_shipped_config_passes_validation(path):
    """Including the optimizer's own rules (keys it does not read, ranges, cross-key constraints)."""
    load_config(path)


def test_a_config_written_for_one_rank_runs_on_two(monkeypatch):
    """configs/tiny.yaml has micro-batch = global batch = 8: on 2 ranks each holds 4."""
    cfg = load_config("configs/tiny.yaml")
    assert micro_batch_per_rank(cfg.train, 1) == 8
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = load_config("configs/tiny.yaml")
    assert micro_batch_per_rank(cfg.train, 2) == 4


def test_the_fast_yaml_loader_reads_every_shipped_file_as_pyyaml_does():
    """Config, sweep and study files go through libyaml's parser (ConfigYamlLoader); each must read exactly as
    PyYAML's own safe loader reads it, and so must override scalars."""
    files = sorted((REPO / "configs").rglob("*.yaml"))
    assert len(files) > 50
    for path in files:
        text = path.read_text()
        assert yaml.load(text, Loader=ConfigYamlLoader) == yaml.safe_load(text), path
    for value in ["3e-3", "1.0e-3", "null", "~", "true", "no", "[1, 2]", "0x10", "1_000", ".inf", "2024-01-01"]:
        assert yaml.load(value, Loader=ConfigYamlLoader) == yaml.safe_load(value), value


def test_every_config_value_is_a_yaml_scalar():
    """config.yaml round-trips every value unchanged, which the study's check of a run's settings relies on
    (study.results.check_run_config compares the saved file with to_dict() as they are: a tuple would load as a
    list and differ)."""
    for path in (None, "configs/210m.yaml"):
        values = load_config(path).to_dict()
        assert all(
            isinstance(v, int | float | str | bool | None) for section in values.values() for v in section.values()
        )
