"""train.engine on 2 CPU ranks (gloo): FSDP2 trains exactly like one process, for each optimizer that
runs sharded, fused or not, with clipping and gradient accumulation; its checkpoints resume on
another number of ranks; the engine table refuses what is not supported, with its reason."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from model import ModelConfig, Transformer
from optim import OptimConfig, optimizer_spec
from optim.in_backward import InBackwardOptimizer
from tests.helpers.gloo import run_ranks
from tests.helpers.runs import (
    assert_identical_runs,
    follows_reference,
    losses,
    run,
    tiny_overrides,
    train_jobs_as_rank,
)
from trainer import checkpoint as ckpt
from trainer import parallelize as parallelize_module
from trainer.config import ConfigError, TrainConfig, load_config
from trainer.ddp_fused import install_fused_comm_hook
from trainer.distributed import DistInfo, all_reduce_sum, any_rank, init_distributed
from trainer.engines import support_table_markdown
from trainer.parallelize import apply_fsdp2, grad_sync, parallelize
from trainer.run_lock import remove_stale_temp_files

# (name, overrides): every optimizer that runs under fsdp2, ordinary and fused, clipping on (the
# ordinary path's default) and off (fused), accumulation of 2 micro-batches per rank.
CASES: dict[str, dict[str, object]] = {
    "adamw": {"optim.name": "adamw"},
    "adafactor_momentum": {"optim.name": "adafactor", "optim.beta1": 0.9, "optim.clip_threshold": 1.0},
    "adafactor_accumulate": {"optim.name": "adafactor", "train.micro_batch": 1},
    "adalomo_fused": {"optim.name": "adalomo", "train.fused_update": True, "train.max_grad_norm": 0},
    "adalomo_layerwise_fused": {
        "optim.name": "adalomo",
        "optim.update_norm": "layerwise",
        "train.fused_update": True,
        "train.max_grad_norm": 0,
    },
    "adafactor_fused": {"optim.name": "adafactor", "train.fused_update": True, "train.max_grad_norm": 0},
    "galore_adamw": {"optim.name": "galore_adamw", "optim.rank": 8, "optim.update_proj_gap": 2, "optim.scale": 0.25},
    "galore_adafactor": {"optim.name": "galore_adafactor", "optim.rank": 8, "optim.update_proj_gap": 2},
    "adamem_fused": {
        "optim.name": "adamem",
        "optim.rank": 8,
        "optim.update_proj_gap": 2,
        "train.fused_update": True,
        "train.max_grad_norm": 0,
    },
}
STEPS = 4


def test_fsdp2_on_two_ranks_trains_like_one_process_and_resumes_on_another_rank_count(tmp_path, sample_tokens):
    common = {"train.max_steps": STEPS, "checkpoint.interval": 2, "eval.interval": 2}
    next_store = (str(tmp_path / f"store{i}") for i in itertools.count()).__next__  # a file store per job
    jobs = []
    for name, extra in CASES.items():
        jobs.append((next_store(), tiny_overrides(tmp_path / f"two_{name}", sample_tokens, **common, **extra)))
        jobs[-1][1].append("--train.engine=fsdp2")
    # 1 -> 2 ranks: one process trains to step 2; two fsdp2 ranks continue to STEPS.
    one_then_two = tiny_overrides(tmp_path / "one_then_two", sample_tokens, **common, **CASES["adafactor_momentum"])
    run(tmp_path, sample_tokens, "one_then_two", **{**common, **CASES["adafactor_momentum"], "train.max_steps": 2})
    jobs.append((next_store(), [*one_then_two, "--train.engine=fsdp2"]))
    # 2 -> 1: two fsdp2 ranks train to step 2; one process continues to STEPS.
    two_then_one = {**common, **CASES["galore_adamw"]}  # projectors, counters, row-split moments
    jobs.append(
        (
            next_store(),
            [*tiny_overrides(tmp_path / "two_then_one", sample_tokens, **two_then_one), "--train.max_steps=2"]
            + ["--train.engine=fsdp2"],
        )
    )
    # bf16 under FSDP2 (MixedPrecisionPolicy: bf16 compute, fp32 reduction and master weights) vs bf16 autocast.
    bf16 = {**common, **CASES["adafactor_momentum"], "train.precision": "bf16"}
    jobs.append((next_store(), [*tiny_overrides(tmp_path / "two_bf16", sample_tokens, **bf16), "--train.engine=fsdp2"]))
    # 2 -> 2 from a sharded checkpoint (fused layout, projectors): the same bits as without the stop.
    two_then_two = tiny_overrides(tmp_path / "two_then_two", sample_tokens, **common, **CASES["adamem_fused"])
    jobs.append((next_store(), [*two_then_two, "--train.engine=fsdp2", "--train.max_steps=2"]))
    jobs.append((next_store(), [*two_then_two, "--train.engine=fsdp2"]))
    # The same with torch's own AdamW, whose state FSDP2 holds as DTensors (the package's optimizers hold local
    # shards): the load must rebuild them as DTensors of the same rows.
    adamw_two_then_two = tiny_overrides(tmp_path / "adamw_two_then_two", sample_tokens, **common, **CASES["adamw"])
    jobs.append((next_store(), [*adamw_two_then_two, "--train.engine=fsdp2", "--train.max_steps=2"]))
    jobs.append((next_store(), [*adamw_two_then_two, "--train.engine=fsdp2"]))
    # DDP: fused (the comm hook) == ordinary, for AdaLomo (defined in backward) and AdamW.
    ddp = {**common, "train.max_grad_norm": 0}
    for name in ("adalomo", "adamw"):
        for fused in (False, True):
            extra = {**ddp, "optim.name": name, "train.fused_update": fused}
            jobs.append((next_store(), tiny_overrides(tmp_path / f"ddp_{name}_{fused}", sample_tokens, **extra)))
    run_ranks(train_jobs_as_rank, 2, jobs)
    for name in ("adalomo", "adamw"):
        assert_identical_runs(tmp_path / f"ddp_{name}_True", tmp_path / f"ddp_{name}_False", STEPS)
    run(tmp_path, sample_tokens, "two_then_one", **two_then_one)

    run(tmp_path, sample_tokens, "one_bf16", **bf16)
    one_bf16, two_bf16 = losses(tmp_path / "one_bf16"), losses(tmp_path / "two_bf16")
    assert sorted(one_bf16) == sorted(two_bf16) == list(range(1, STEPS + 1))
    for step, loss in one_bf16.items():  # the same curve to bf16 precision
        assert two_bf16[step] == pytest.approx(loss, rel=1e-2), step
    assert (tmp_path / "two_then_two" / "checkpoints" / "step_00000002" / "extras.pt").is_file()  # sharded
    assert_identical_runs(tmp_path / "two_then_two", tmp_path / "two_adamem_fused", STEPS)  # exact resume
    assert_identical_runs(tmp_path / "adamw_two_then_two", tmp_path / "two_adamw", STEPS)
    figures = {}
    for name, extra in CASES.items():
        run(tmp_path, sample_tokens, f"one_{name}", **common, **extra)
        figures[name] = follows_reference(tmp_path / f"two_{name}", tmp_path / f"one_{name}", STEPS)
    print("max relative parameter difference, 2 fsdp2 ranks vs 1 process:", figures)
    # fp32 summation order (a reduce-scatter of two half-batch gradients vs one sum) is amplified by Adam's
    # m / (sqrt(v) + eps) on near-zero gradients: ~1e-5 for the Adam-type optimizers, depending on thread
    # counts; the factored normalisations (AdaLomo, Adafactor without momentum) amplify far less.
    assert max(figures.values()) < 5e-5, figures
    assert max(figures[k] for k in ("adalomo_fused", "adalomo_layerwise_fused", "adafactor_fused")) < 2e-6, figures
    for resumed, reference in (("one_then_two", "one_adafactor_momentum"), ("two_then_one", "one_galore_adamw")):
        assert follows_reference(tmp_path / resumed, tmp_path / reference, STEPS) < 5e-5, resumed


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["--train.engine=deepspeed", "--optim.name=adamem"], "SVD of a partition is meaningless"),
        (["--train.engine=deepspeed", "--optim.name=adafactor"], "cut through matrices"),
        (["--train.engine=fsdp2", "--adapter.method=lora"], "run on ddp"),
        (
            ["--train.engine=fsdp2", "--optim.name=adalomo", "--optim.factorization=svd", "--optim.factor_rank=2"],
            "need the whole matrix",
        ),
        (
            ["--train.engine=fsdp2", "--optim.name=adalomo", "--optim.factorization=nmf", "--optim.factor_rank=2"],
            r"optim\.factorization=nmf \(factor_rank=2\) with train\.engine=fsdp2",
        ),
    ],
)
def test_unsupported_engine_combinations_are_refused_at_config_load(overrides, message, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # the refusals that depend on several ranks
    with pytest.raises(ConfigError, match=message):
        load_config("configs/tiny.yaml", ["--train.global_batch=8", *overrides])


def test_the_docs_table_is_the_engine_table():
    doc = (Path(__file__).resolve().parents[2] / "docs" / "engines.md").read_text()
    assert support_table_markdown() in doc, "regenerate the table in docs/engines.md from support_table_markdown()"


def test_one_process_under_fsdp2_accepts_adalomos_rank_r_ablation(monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole matrix is on the one rank: only several fsdp2 ranks refuse the rank-r factors."""
    monkeypatch.setenv("WORLD_SIZE", "1")
    overrides = ["--train.engine=fsdp2", "--optim.name=adalomo", "--optim.factorization=svd", "--optim.factor_rank=2"]
    cfg = load_config("configs/tiny.yaml", ["--train.global_batch=8", *overrides])
    assert (cfg.train.engine, cfg.optim.factorization, cfg.optim.factor_rank) == ("fsdp2", "svd", 2)


def test_the_docs_table_has_every_row_of_the_engine_table() -> None:
    """The whole table, not a prefix of it: the doc's block of `|` lines under the header equals the generated one,
    down to the fused-update row, one row per optimizer family plus header, separator and fused row."""
    doc = (Path(__file__).resolve().parents[2] / "docs" / "engines.md").read_text().splitlines()
    start = doc.index(next(line for line in doc if line.startswith("| optimizer | ddp | fsdp2 | deepspeed |")))
    block = list(itertools.takewhile(lambda line: line.startswith("|"), doc[start:]))
    assert len(block) == 2 + 5 + 1 and block[-1].startswith("| `train.fused_update` | **exact**")
    assert support_table_markdown().splitlines() == block


def test_a_sharded_save_killed_before_its_commit_leaves_no_checkpoint(tmp_path):
    """A kill before the rename leaves only a temporary directory: it is not a checkpoint, and the next
    start removes it."""
    checkpoints = tmp_path / "checkpoints"
    partial = checkpoints / "step_00000004.4242.0badcafe.tmp"
    partial.mkdir(parents=True)
    (partial / "__0_0.distcp").write_bytes(b"half")
    unfinished = checkpoints / "step_00000006"  # a final name without extras.pt is not a checkpoint either
    unfinished.mkdir()
    assert ckpt.list_checkpoints(checkpoints) == []
    assert remove_stale_temp_files(checkpoints) == [partial] and not partial.exists()


def _compiled_jobs(rank: int, world: int, jobs: list[tuple[str, list[str]]]) -> None:
    """As train_jobs_as_rank, with each block compiled by dynamo + AOT autograd (the parts of torch.compile that
    meet DDP's hooks and the fused path's post-accumulate-grad hooks) and no C++ code generation, which would
    take a minute per rank on CPU."""

    def compile_blocks(model) -> None:
        for block in model.blocks:
            block.compile(backend="aot_eager")

    parallelize_module.compile_blocks = compile_blocks
    train_jobs_as_rank(rank, world, jobs)


def test_compiled_blocks_train_under_ddp_fused_and_not(tmp_path, sample_tokens):
    common = {"train.max_steps": 3, "eval.interval": 0, "checkpoint.interval": 3, "train.compile": True}
    cases: dict[str, dict[str, object]] = {"adamw": {"optim.name": "adamw"}, "adalomo_fused": CASES["adalomo_fused"]}
    jobs = [
        (str(tmp_path / f"store_{name}"), tiny_overrides(tmp_path / f"ddp_{name}", sample_tokens, **common, **extra))
        for name, extra in cases.items()
    ]
    run_ranks(_compiled_jobs, 2, jobs)
    for name, extra in cases.items():
        run(tmp_path, sample_tokens, f"one_{name}", **{**common, "train.compile": False}, **extra)
        one, two = losses(tmp_path / f"one_{name}"), losses(tmp_path / f"ddp_{name}")
        assert sorted(two) == sorted(one) == [1, 2, 3], name
        for step in one:
            assert two[step] == pytest.approx(one[step], rel=1e-5), (name, step)


def _root_gradients_in_backward(rank: int, world: int) -> list[list[str]]:
    """Which of the root's parameters (embedding, final norm, output layer) hold an unsharded gradient when each
    block's backward starts, and after the backward, under the trainer's FSDP2 wrapping."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(d_model=64, n_layers=3, vocab_size=512, max_seq_len=32))
    apply_fsdp2(model, DistInfo(rank, world, rank, torch.device("cpu")), "fp32")
    assert isinstance(model, FSDPModule)  # fully_shard made the model's class an FSDP one
    group = model._get_fsdp_state()._fsdp_param_group  # FSDP2 internals: no public view of this
    assert group is not None
    root = group.fsdp_params
    seen: list[list[str]] = []

    def record(*_: object) -> None:
        seen.append(sorted(str(p._param_fqn) for p in root if p._unsharded_param.grad is not None))

    for block in model.blocks:
        block.register_full_backward_pre_hook(record)
    tokens = torch.randint(0, 512, (2, 17), generator=torch.Generator().manual_seed(1))
    model(tokens[:, :-1], targets=tokens[:, 1:], loss_chunk_tokens=5).backward()
    record()
    return seen


def test_fsdp2_keeps_the_output_layers_unsharded_gradient_through_the_backward():
    """What tools/bench_engines.py's fsdp2 formula counts: the root's gradients are reduce-scattered only when the
    backward ends (its input, the tokens, has no gradient to hook), so the output layer's and the final norm's
    unsharded gradients are alive while every block's backward runs."""
    for seen in run_ranks(_root_gradients_in_backward, 2):
        assert seen == [["lm_head.weight", "norm.weight"]] * 3 + [[]], seen


def _tiny_model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(d_model=64, n_layers=2, vocab_size=128, max_seq_len=16))


def _fsdp2_units_and_grad_sync(rank: int, world: int) -> bool:
    """On every rank the same tokens, so FSDP2's averaged gradient is one rank's (checked against the unwrapped
    model). FSDP2 internals (_get_fsdp_state): there is no public view of a unit's policy or parameters."""
    info = DistInfo(rank, world, rank, torch.device("cpu"))
    # grad_sync: no reduce-scatter (so no sharded .grad) after a micro-batch that is not the last; after the
    # last, the gradients are the sum over both micro-batches, as two backwards of the unwrapped model.
    model, reference = _tiny_model(), _tiny_model()
    wrapped = apply_fsdp2(model, info, "fp32")
    tokens = torch.randint(0, 128, (2, 2, 9), generator=torch.Generator().manual_seed(1))
    for micro, last in zip(tokens, (False, True), strict=True):
        with grad_sync(wrapped, last_micro_batch=last):
            wrapped(micro[:, :-1], targets=micro[:, 1:]).backward()
        reference(micro[:, :-1], targets=micro[:, 1:]).backward()
        if not last:
            assert all(p.grad is None for p in model.parameters())
    want = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        got, ref_grad = p.grad, want[name].grad
        assert isinstance(got, DTensor) and ref_grad is not None, name
        torch.testing.assert_close(got.full_tensor(), ref_grad, rtol=1e-5, atol=1e-7, msg=name)
    # Each block its own unit, the root holding the rest; bf16: bf16 parameters for compute, gradients reduced
    # in fp32 (the fp32 shards stay the master weights); fp32: torch's default policy (no casts).
    for precision in ("fp32", "bf16"):
        model = _tiny_model()
        apply_fsdp2(model, info, precision)
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if precision == "fp32":
            policy = MixedPrecisionPolicy(param_dtype=None, reduce_dtype=None)
        units = {"root": model, **{f"blocks.{i}": b for i, b in enumerate(model.blocks)}}
        for unit_name, unit in units.items():
            group = unit._get_fsdp_state()._fsdp_param_group  # type: ignore[operator]
            assert group is not None and group.mp_policy == policy, (precision, unit_name)
        root = model._get_fsdp_state()._fsdp_param_group  # type: ignore[operator]
        assert root is not None
        root_params = {id(model.embed.weight), id(model.norm.weight), id(model.lm_head.weight)}
        assert {id(p.sharded_param) for p in root.fsdp_params} == root_params
        assert all(p.dtype == torch.float32 for p in model.parameters())
    return True


def test_fsdp2_units_precision_and_gradients_unreduced_until_the_last_micro_batch() -> None:
    """In spawned ranks, not in the pytest process: a gloo group outlives destroy_process_group once fully_shard
    has run (tests/helpers/gloo.py), and could abort the interpreter's exit."""
    assert run_ranks(_fsdp2_units_and_grad_sync, 2) == [True, True]


@pytest.mark.parametrize(("engine", "world"), [("deepspeed", 2), ("ddp", 1), ("fsdp2", 1)])
def test_parallelize_adds_no_wrapper_for_deepspeed_or_one_process(engine: str, world: int) -> None:
    """deepspeed.initialize wraps the model later, and one process needs no wrapper: parallelize hands back the
    model itself, untouched (no process group exists here, which DDP and FSDP2 would need)."""
    model = _tiny_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train = TrainConfig(engine=engine)  # type: ignore[arg-type]
    assert parallelize(model, train, DistInfo(0, world, 0, torch.device("cpu"))) is model
    assert type(model) is Transformer
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name


def test_train_compile_compiles_every_block_and_nothing_else() -> None:
    """train.compile: each block's call goes through torch.compile (nn.Module.compile, lazy: nothing is traced until
    a forward), the root (embedding, final norm, output layer) is not compiled as one graph."""
    model = _tiny_model()
    assert parallelize(model, TrainConfig(compile=True), DistInfo(0, 1, 0, torch.device("cpu"))) is model
    assert all(block._compiled_call_impl is not None for block in model.blocks)
    assert model._compiled_call_impl is None
    plain = _tiny_model()
    assert parallelize(plain, TrainConfig(compile=False), DistInfo(0, 1, 0, torch.device("cpu"))) is plain
    assert all(m._compiled_call_impl is None for m in plain.modules())


LR, BETA1, BETA2, EPS = 0.1, 0.9, 0.95, 1e-8  # the fused AdamW step's; no weight decay: no group policy


def _two_layer_net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))


def _ddp_inputs(world: int) -> torch.Tensor:
    return torch.randn(world, 4, 6, generator=torch.Generator().manual_seed(1))  # rank r's batch: [r]


def _ddp_fused_adamw_step(rank: int, world: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """One fused AdamW step through trainer/ddp_fused.py's comm hook: (parameters, exp_avg), the model's order."""
    model = _two_layer_net()
    ddp = DistributedDataParallel(model)
    cfg = OptimConfig(name="adamw", lr=LR, beta1=BETA1, beta2=BETA2, eps=EPS, weight_decay=0.0)
    opt = InBackwardOptimizer(optimizer_spec(model, cfg))
    install_fused_comm_hook(ddp, opt)
    opt.arm(True)
    ddp(_ddp_inputs(world)[rank]).square().mean().backward()
    opt.step()
    state = {id(o.param_groups[0]["params"][0]): o.state for o in opt.optimizers.values()}
    params = [p.detach().clone() for p in model.parameters()]
    return params, [state[id(p)][p]["exp_avg"].clone() for p in model.parameters()]


def test_ddp_fused_updates_every_rank_from_the_mean_gradient_as_torch_adamw() -> None:
    """Reference: torch AdamW on one process, stepped from the gradient of the ranks' mean loss (DDP's mean of
    the ranks' gradients); its first moment after one step is (1 - beta1) times that gradient."""
    results = run_ranks(_ddp_fused_adamw_step, 2)
    model = _two_layer_net()
    inputs = _ddp_inputs(2)
    (sum(model(inputs[r]).square().mean() for r in range(2)) / 2).backward()
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    reference = torch.optim.AdamW(model.parameters(), lr=LR, betas=(BETA1, BETA2), eps=EPS, weight_decay=0.0)
    reference.step()
    for params, exp_avg in results:
        for p, m, expected_p, g in zip(params, exp_avg, model.parameters(), grads, strict=True):
            torch.testing.assert_close(m, (1 - BETA1) * g)
            torch.testing.assert_close(p, expected_p.detach())


def test_only_global_rank_0_is_main_on_every_node() -> None:
    """On the second node local rank 0 is global rank 2: it must not write what rank 0 writes."""
    assert DistInfo(rank=0, world_size=4, local_rank=0, device=torch.device("cpu")).is_main
    assert not DistInfo(rank=2, world_size=4, local_rank=0, device=torch.device("cpu")).is_main


def test_init_distributed_reads_torchruns_env_and_starts_gloo_on_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    started: list[tuple[str, object]] = []
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, device_id: started.append((backend, device_id)))
    info = init_distributed("cpu")
    assert info == DistInfo(rank=3, world_size=4, local_rank=1, device=torch.device("cpu"))
    assert started == [("gloo", None)]


def test_train_device_cuda_without_a_cuda_device_names_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(
        RuntimeError, match=r"^train\.device=cuda but no CUDA device is visible; use --train\.device=cpu$"
    ):
        init_distributed("cuda")


def _collectives(rank: int, world: int) -> tuple[bool, bool, float]:
    info = DistInfo(rank, world, rank, torch.device("cpu"))
    return any_rank(rank == 1, info), any_rank(False, info), all_reduce_sum(torch.tensor(rank + 1.0), info).item()


def test_any_rank_and_all_reduce_sum_over_ranks_and_in_one_process() -> None:
    assert run_ranks(_collectives, 2) == [(True, False, 3.0), (True, False, 3.0)]  # 1 + 2 on both ranks
    one = DistInfo(0, 1, 0, torch.device("cpu"))
    assert any_rank(True, one) and not any_rank(False, one) and all_reduce_sum(torch.tensor(5.0), one).item() == 5.0
