"""The registry's declarations and `validate_optim_config`: every optimizer declares exactly the
OptimConfig keys its builder reads; unknown names, ignored keys, out-of-range values, invalid
choices and cross-key conflicts are errors naming the key and the fix. (That every shipped config
and sweep passes, through load_config, is tests/trainer/test_config.py's and test_sweep_files.py's.)"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch

from optim import REGISTRY, OptimConfig, optimizer_keys, optimizer_spec, register, validate_optim_config
from optim.config import CHOICES
from optim.param_groups import is_lowrank_target
from optim.registry import OPTIM_KEYS, REGISTRATIONS
from optim.validation import RANGES, readers_of
from tests.helpers.tiny_lm import tiny_model


class RecordingConfig(OptimConfig):
    """An OptimConfig that records which of its fields are read."""

    read: set[str]

    def __getattribute__(self, key: str) -> Any:
        if key in OPTIM_KEYS:
            object.__getattribute__(self, "read").add(key)
        return object.__getattribute__(self, key)


def recorded(cfg: OptimConfig) -> RecordingConfig:
    rec = RecordingConfig(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(OptimConfig)})
    rec.read = set()
    return rec


def unchecked_config(name: str, **values: Any) -> OptimConfig:
    """An OptimConfig with values its annotations may not allow: what validation receives from a file."""
    return OptimConfig(name=name, **values)


# Values that switch the builders' branches (None vs set, momentum on / off), so every read is seen.
BRANCHES: list[dict[str, Any]] = [
    dict(),
    dict(beta1=None),
    dict(clip_threshold=0.5, beta2_decay=-0.8, momentum_style="hf"),
    dict(lowrank_base_momentum=False, fused=True),
]


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_declared_keys_are_the_keys_the_builder_reads(name):
    model = tiny_model()
    declared = REGISTRATIONS[name].reads
    seen: set[str] = set()
    for branch in BRANCHES:
        cfg = recorded(OptimConfig(name=name, **branch))
        try:
            REGISTRY[name](model, cfg)
        except ValueError:  # a branch this optimizer refuses (beta1 null for AdamW): its reads still count
            pass
        seen |= cfg.read
    seen.discard("name")  # implied (error messages name the optimizer)
    assert seen == declared, f"undeclared: {sorted(seen - declared)}, declared but unread: {sorted(declared - seen)}"
    assert optimizer_keys(name) == declared | {"name"}
    check = REGISTRATIONS[name].check
    if check is not None:  # a check reads only declared keys
        for branch in BRANCHES:
            cfg = recorded(OptimConfig(name=name, **branch))
            try:
                check(cfg)
            except ValueError:
                pass
            assert cfg.read - {"name"} <= declared


def test_every_shipped_default_validates():
    for name in REGISTRY:
        validate_optim_config(OptimConfig(name=name))


def test_unknown_name_suggests_the_nearest():
    with pytest.raises(ValueError, match=r"optim.name='galore_adamww'\. Did you mean 'galore_adamw'\? Registered: \["):
        validate_optim_config(OptimConfig(name="galore_adamww"))
    with pytest.raises(ValueError, match="Did you mean 'adamem'"):
        optimizer_spec(tiny_model(), OptimConfig(name="adamen"))


def test_unread_non_default_key_names_its_readers():
    with pytest.raises(ValueError) as e:
        validate_optim_config(OptimConfig(name="galore_adamw", delta=0.5))
    assert str(e.value) == (
        "optim.delta=0.5 is not read by galore_adamw; it is read by: adamem. "
        "Remove it (default 1.0) or pick one of those optimizers"
    )
    with pytest.raises(
        ValueError,
        match=r"optim.rank=8 is not read by adalomo; it is read by: adamem, galore_adafactor, "
        r"galore_adamw\.",
    ):
        validate_optim_config(OptimConfig(name="adalomo", rank=8))
    # A key set to its default is fine whoever reads it.
    validate_optim_config(OptimConfig(name="adamw", rank=128, update_norm="grouped"))


def test_several_problems_are_reported_together():
    with pytest.raises(
        ValueError,
        match=r"^3 problems in the optim config section:\n- optim.lr=0.0 .*\n- optim.eps=-1.0 .*"
        r"\n- optim.factorization='nmf2' .*",
    ):
        validate_optim_config(unchecked_config("adalomo", lr=0.0, eps=-1.0, factorization="nmf2"))


def _reader(key: str) -> str:
    readers = readers_of(key)
    assert readers, key
    return "adalomo" if "adalomo" in readers else readers[0]


BAD_VALUES: dict[str, list[Any]] = {
    "lr": [0.0, -1e-3, float("nan"), float("inf")],
    "beta1": [1.0, -0.1],
    "beta2": [0.0, 1.0],
    "eps": [-1e-8],
    "weight_decay": [-0.1],
    "beta2_decay": [0.0, 0.5],
    "eps1": [0.0],
    "eps2": [-1e-3],
    "clip_threshold": [0.0, -1.0, float("inf")],
    "rank": [0, True],
    "update_proj_gap": [0],
    "scale": [0.0],
    "delta": [-0.5],
    "factor_rank": [0, True],
    "factor_iters": [0],
}
GOOD_EDGES: dict[str, list[Any]] = {
    "beta1": [0.0, None],
    "eps": [0.0],
    "weight_decay": [0.0],
    "eps2": [0.0],
    "delta": [0.0],
    "beta2_decay": [None, -0.5],
    "clip_threshold": [None, 2.0],
}


def test_every_range_rule_is_tested():
    assert set(BAD_VALUES) == set(RANGES)


@pytest.mark.parametrize("key,value", [(k, v) for k, vs in BAD_VALUES.items() for v in vs])
def test_out_of_range_value_is_an_error(key, value):
    name = "adafactor" if key == "beta1" else _reader(key)  # adalomo ignores beta1
    cfg = unchecked_config(name, **{key: value})
    with pytest.raises(
        ValueError, match=rf"^optim.{key}={value!r} is out of range: it must be .* \(e.g. --optim.{key}="
    ):
        validate_optim_config(cfg)


@pytest.mark.parametrize("key,value", [(k, v) for k, vs in GOOD_EDGES.items() for v in vs])
def test_range_edges_are_valid(key, value):
    name = "adafactor" if key == "beta1" else _reader(key)
    validate_optim_config(unchecked_config(name, **{key: value}))


@pytest.mark.parametrize("key", sorted(CHOICES))
def test_invalid_choice_is_an_error_with_the_choices(key):
    cfg = unchecked_config(_reader(key), **{key: "bogus"})
    with pytest.raises(ValueError, match=rf"optim.{key}='bogus' is not one of {', '.join(CHOICES[key])}"):
        validate_optim_config(cfg)
    for value in CHOICES[key]:
        validate_optim_config(unchecked_config(_reader(key), **{key: value}))


def test_close_choice_is_suggested():
    with pytest.raises(ValueError, match="Did you mean 'layerwise'"):
        validate_optim_config(unchecked_config("adalomo", update_norm="layer_wise"))


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (
            dict(name="adafactor", beta2=0.99, beta2_decay=-0.8),
            r"optim\.beta2=0\.99 has no effect with optim\.beta2_decay",
        ),
        (dict(name="adamem", beta2=0.99, beta2_decay=-0.8), r"optim\.beta2=0\.99 has no effect"),
        (dict(name="adafactor", warmup_init=True), r"optim\.warmup_init=True has no effect with optim\.relative_step"),
        (
            dict(name="adalomo", update_norm="none", clip_threshold=0.5),
            r"optim\.clip_threshold=0\.5 has no effect with optim\.update_norm='none'.*--optim\.update_norm=grouped",
        ),
    ],
)
def test_a_key_another_key_switches_off_is_an_error(overrides, match):
    with pytest.raises(ValueError, match=match):
        validate_optim_config(OptimConfig(**overrides))


def test_keys_that_take_effect_together_pass():
    validate_optim_config(OptimConfig(name="adafactor", beta2_decay=-0.8))  # beta2 at its default
    validate_optim_config(OptimConfig(name="adafactor", warmup_init=True, relative_step=True))
    validate_optim_config(OptimConfig(name="adalomo", update_norm="layerwise", clip_threshold=0.5))
    validate_optim_config(OptimConfig(name="adalomo", beta2_decay=-0.5))  # adalomo reads no beta2


@pytest.mark.parametrize("name", ["adamw", "galore_adamw"])
def test_adam_style_optimizers_need_a_float_beta1(name):
    with pytest.raises(ValueError, match=rf"^{name} needs optim.beta1 \(a float in \[0, 1\)\).*--optim.beta1=0.9"):
        validate_optim_config(OptimConfig(name=name, beta1=None))
    with pytest.raises(ValueError, match="needs optim.beta1"):  # the builder path refuses it too
        optimizer_spec(tiny_model(), OptimConfig(name=name, beta1=None))
    validate_optim_config(OptimConfig(name="adafactor", beta1=None))  # no momentum: fine for Adafactor


def test_a_switched_off_key_is_not_reported_on_top_of_an_invalid_value() -> None:
    """beta2_decay=0.5 is out of range: that alone is reported, not also "beta2 has no effect with beta2_decay=0.5"
    (whose fix, a constant beta2, may not be what the user meant)."""
    with pytest.raises(ValueError) as e:
        validate_optim_config(OptimConfig(name="adafactor", beta2=0.99, beta2_decay=0.5))
    assert str(e.value) == (
        "optim.beta2_decay=0.5 is out of range: it must be < 0, or null for a constant beta2 "
        "(e.g. --optim.beta2_decay=-0.8)"
    )


@pytest.mark.parametrize("name", ["adamw", "galore_adamw"])
def test_adam_style_optimizers_accept_beta1_zero(name: str) -> None:
    """beta1 = 0.0 (in [0, 1): momentum off by value) is valid; only null is refused."""
    validate_optim_config(OptimConfig(name=name, beta1=0.0))
    spec = optimizer_spec(tiny_model(), OptimConfig(name=name, beta1=0.0))
    assert spec.build() is not None


def test_invalid_choice_of_a_nullable_key_says_null_is_allowed() -> None:
    with pytest.raises(ValueError) as e:
        validate_optim_config(unchecked_config("adafactor", momentum_style="bogus"))
    assert str(e.value) == (
        "optim.momentum_style='bogus' is not one of adam, hf (or null). Set --optim.momentum_style to one of them"
    )
    validate_optim_config(OptimConfig(name="adafactor", momentum_style=None))


def test_registered_checks_run_in_optimizer_spec():
    model = tiny_model()
    with pytest.raises(ValueError, match="optim.variant must be one of"):
        optimizer_spec(model, unchecked_config("adamem", variant="variant3"))
    with pytest.raises(ValueError, match="AdaLomo needs clip_threshold > 0 .* --optim.update_norm=none"):
        optimizer_spec(model, OptimConfig(name="adalomo", clip_threshold=0.0))
    with pytest.raises(ValueError, match="AdaLomo needs beta2_decay < 0"):
        optimizer_spec(model, OptimConfig(name="adalomo", beta2_decay=0.5))


def test_register_refuses_unknown_keys_and_duplicates():
    with pytest.raises(ValueError, match=r"declares unknown OptimConfig keys \['lrr'\]"):
        register("test_typo", reads=("lr", "lrr"))
    with pytest.raises(ValueError, match="registered twice"):
        register("adamw", reads=("lr",))(REGISTRY["adamw"])


@pytest.mark.parametrize("name", ["galore_adamw", "galore_adafactor", "adamem"])
@pytest.mark.parametrize("decay_norm_weights", [False, True])
def test_lowrank_builders_decay_norm_weights_only_when_asked(name, decay_norm_weights):
    """optim.param_groups: weight decay for every 2-D weight (low-rank or not); LayerNorm weights (1-D)
    undecayed unless decay_norm_weights. Closed form per parameter, from its name and dimension."""
    from optim import optimizer_spec
    from tests.helpers.tiny_lm import tiny_model

    model = tiny_model()
    cfg = OptimConfig(name=name, weight_decay=0.1, decay_norm_weights=decay_norm_weights, lowrank_targets="blocks")
    spec = optimizer_spec(model, cfg)
    got = {n: g["weight_decay"] for g in spec.param_groups for n in g["names"]}
    params = dict(model.named_parameters())
    assert set(got) == set(params)
    for n, p in params.items():
        assert got[n] == (0.1 if p.dim() == 2 or decay_norm_weights else 0.0), n


def test_unknown_name_in_another_case_suggests_the_registered_spelling() -> None:
    with pytest.raises(ValueError, match=r"optim.name='ADAMW'\. Did you mean 'adamw'\?"):
        optimizer_spec(tiny_model(), OptimConfig(name="ADAMW"))


def test_spec_build_passes_the_configured_hyperparameters_to_the_optimizer() -> None:
    cfg = OptimConfig(name="adamw", lr=3e-3, beta1=0.8, beta2=0.99, eps=1e-7)
    opt = optimizer_spec(tiny_model(), cfg).build()
    assert isinstance(opt, torch.optim.AdamW)
    assert (opt.defaults["lr"], opt.defaults["betas"], opt.defaults["eps"]) == (3e-3, (0.8, 0.99), 1e-7)
    assert all(g["lr"] == 3e-3 and g["betas"] == (0.8, 0.99) for g in opt.param_groups)


def test_lowrank_targets_all_takes_every_matrix_and_blocks_only_the_block_matrices() -> None:
    assert is_lowrank_target("embedding", 2, "all") and is_lowrank_target("output", 2, "all")
    assert not is_lowrank_target("embedding", 2, "blocks") and is_lowrank_target("block_matrix", 2, "blocks")
    assert not is_lowrank_target("norm", 1, "all")


def test_an_unknown_lowrank_target_is_an_error_naming_the_choices() -> None:
    """A misspelt target (an OptimConfig built in code skips the config loader's check) is refused, not read as all."""
    with pytest.raises(ValueError, match=r"^optim.lowrank_targets must be one of \('blocks', 'all'\), got 'block'$"):
        is_lowrank_target("embedding", 2, "block")
