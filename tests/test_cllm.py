"""CLLM: the consistency loss against hand-computed cases and a dense per-position reference, the
counted columns, label smoothing, rollouts (sharding, merge, reuse, recollection), the reference
collector of the rollout bench, the recipe through the trainer, and the errors for bad input."""

from __future__ import annotations

import functools
import json
import math
import random
import threading
from pathlib import Path

import datasets
import pytest
import torch
import torch.nn.functional as F

from leaplm.bench.rollout import bench_prompts, reference_trajectories
from leaplm.cli import main
from leaplm.config import ConfigError, DataConfig
from leaplm.data.sft import IGNORE_INDEX
from leaplm.inference.decoders.jacobi import collect_jacobi_trajectories
from leaplm.inference.engine import Engine
from leaplm.losses.causal_lm import causal_lm_loss_sum
from leaplm.losses.consistency import (
    ar_labels,
    block_batch,
    block_logits,
    consistency_loss_sum,
    counted_columns,
    soft_cross_entropy_sum,
)
from leaplm.models.zoo import load_model
from leaplm.train import cllm
from leaplm.train import rollouts as rollouts_module
from leaplm.train.recipes import NOISE_SEED, load_config
from leaplm.train.rollouts import (
    RolloutError,
    RolloutPrompt,
    choose_prompts,
    collect_jacobi_rollouts,
    current_rollouts,
    load_rollouts,
)
from leaplm.train.trainer import train

from conftest import SMALL_ROLLOUT_RUN

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "cllm" / "tiny_teacher.yaml"


@pytest.fixture(scope="module")
def teacher():
    """The embedded teacher, loaded once; tests that train copy it."""
    model, tokenizer = load_model("tiny-teacher")
    return model.eval(), tokenizer


# ----- Loss ---------------------------------------------------------------------------------


def test_soft_cross_entropy_hand_computed():
    # Column 0: student q = (1/4, 3/4), teacher p = (1/2, 1/2); column 1 is not counted.
    student = torch.tensor([[[0.0, math.log(3)], [5.0, -5.0]]])
    teacher = torch.tensor([[[0.0, 0.0], [-5.0, 5.0]]])
    counted = torch.tensor([[True, False]])
    expected = -(0.5 * math.log(0.25) + 0.5 * math.log(0.75))
    assert soft_cross_entropy_sum(student, teacher, counted).item() == pytest.approx(expected, rel=1e-6)
    # Equal distributions: the soft CE is the entropy, and the gradient is zero.
    student = torch.tensor([[[0.3, -1.2, 2.0]]], requires_grad=True)
    soft_cross_entropy_sum(student, student.detach().clone(), torch.tensor([[True]])).backward()
    assert student.grad.abs().max() < 1e-6


def test_counted_columns_start_after_the_first_difference():
    fixed = torch.tensor([[1, 2, 3, 4, 5]] * 5)
    states = torch.tensor([
        [1, 2, 9, 4, 5],  # first difference at token 2: columns 3, 4 see it
        [9, 2, 3, 4, 5],  # at token 0: columns 1..4
        [1, 2, 3, 4, 5],  # the fixed point itself: nothing
        [1, 2, 3, 4, 9],  # only the last token differs: no column of the block sees it
        [1, 9, 3, 7, 7],  # block of 3 tokens: differences past its end do not count
    ])
    lengths = torch.tensor([5, 5, 5, 5, 3])
    assert counted_columns(states, fixed, lengths).int().tolist() == [
        [0, 0, 0, 1, 1],
        [0, 1, 1, 1, 1],
        [0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0],
        [0, 0, 1, 0, 0],
    ]


def test_block_batch_aligns_blocks_and_positions():
    rows = block_batch([[7, 8, 9], [5]], [[1, 2], [3, 4, 6]], jacobi_block_size=4, pad_token_id=0)
    assert rows.input_ids.tolist() == [[7, 8, 9, 1, 2, 0, 0], [0, 0, 5, 3, 4, 6, 0]]
    assert rows.attention_mask.tolist() == [[1, 1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1, 0]]
    assert rows.position_ids.tolist() == [[0, 1, 2, 3, 4, 0, 0], [0, 0, 0, 1, 2, 3, 0]]
    assert rows.blocks.tolist() == [[1, 2, 0, 0], [3, 4, 6, 0]] and rows.lengths.tolist() == [2, 3]
    assert ar_labels(rows.blocks, rows.lengths).tolist() == [[IGNORE_INDEX, 1, 2, IGNORE_INDEX, IGNORE_INDEX],
                                                             [IGNORE_INDEX, 3, 4, 6, IGNORE_INDEX]]
    with pytest.raises(ValueError, match="blocks must hold 1..4 tokens"):
        block_batch([[1]], [[1, 2, 3, 4, 5]], 4, 0)
    with pytest.raises(ValueError, match="at least one token"):
        block_batch([[]], [[1]], 4, 0)


def _trajectory_rows(teacher):
    """Three blocks of the teacher's own trajectories: contexts of different lengths, one short block."""
    model, tokenizer = teacher
    prompts = bench_prompts(tokenizer, 3)
    rows = collect_jacobi_trajectories(Engine(model, tokenizer), prompts, jacobi_block_size=8, max_new_tokens=24)
    several = [r for r in rows if len(r["states"]) >= 3]
    short = [r for r in rows if len(r["fixed_point"]) < 8]
    picked = several[:2] + short[:1]
    assert len(picked) == 3 and len({len(r["prompt_ids"]) + len(r["prefix_ids"]) for r in picked}) > 1
    return picked


def test_global_and_local_losses_match_a_dense_per_position_reference(teacher):
    """Batched, padded block logits give the soft CE a loop over positions gives, each prefix fed alone."""
    model, tokenizer = teacher
    rows = _trajectory_rows(teacher)
    contexts = [r["prompt_ids"] + r["prefix_ids"] for r in rows]

    def next_logits(tokens: list[int]) -> torch.Tensor:
        return model(torch.tensor([tokens])).logits[0, -1]  # [v]

    for name, teacher_of in (("global", lambda r: r["states"][-1]), ("local", lambda r: r["states"][1])):
        students, targets = [r["states"][0] for r in rows], [teacher_of(r) for r in rows]
        with torch.no_grad():
            s_rows = block_batch(contexts, students, 8, tokenizer.pad_token_id)
            t_rows = block_batch(contexts, targets, 8, tokenizer.pad_token_id)
            total, count = consistency_loss_sum(block_logits(model, s_rows), block_logits(model, t_rows),
                                                s_rows.blocks, t_rows.blocks, s_rows.lengths)
            expected, expected_count = 0.0, 0
            for context, state, target in zip(contexts, students, targets):
                first = next((i for i, (a, b) in enumerate(zip(state, target)) if a != b), len(state))
                for i in range(first + 1, len(target)):  # the prediction of token i sees the difference
                    p = next_logits(context + target[:i]).softmax(-1)
                    expected -= (p * next_logits(context + state[:i]).log_softmax(-1)).sum().item()
                    expected_count += 1
        assert count.item() == expected_count > 0, name
        assert total.item() == pytest.approx(expected, rel=1e-4), name

    # The AR term on the fixed points: each block token from its context and the block before it.
    fixed = [r["fixed_point"] for r in rows]
    with torch.no_grad():
        f_rows = block_batch(contexts, fixed, 8, tokenizer.pad_token_id)
        ar = causal_lm_loss_sum(block_logits(model, f_rows), ar_labels(f_rows.blocks, f_rows.lengths), 0.1)
        dense = sum(F.cross_entropy(model(torch.tensor([c + f])).logits[0, len(c) - 1:-1], torch.tensor(f),
                                    reduction="sum", label_smoothing=0.1).item() for c, f in zip(contexts, fixed))
    assert ar.item() == pytest.approx(dense, rel=1e-4)


def test_label_smoothing_mixes_in_the_uniform_distribution():
    logits = torch.randn(2, 4, 7, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([[IGNORE_INDEX, 3, 1, IGNORE_INDEX], [IGNORE_INDEX, 0, 6, 2]])
    log_p = logits[:, :-1].log_softmax(-1)  # [2, 3, 7]
    targets = labels[:, 1:]
    kept = targets != IGNORE_INDEX
    nll = -log_p.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)[kept].sum()
    uniform = -log_p.mean(-1)[kept].sum()
    assert causal_lm_loss_sum(logits, labels).item() == pytest.approx(nll.item(), rel=1e-6)
    assert causal_lm_loss_sum(logits, labels, 0.1).item() == pytest.approx((0.9 * nll + 0.1 * uniform).item(), rel=1e-6)


def test_pick_consistency_pair():
    states = [[1, 1], [2, 1], [2, 2], [3, 2]]
    for seed in range(20):
        student, target = cllm.pick_consistency_pair(states, "global", random.Random(seed))
        assert student in states[:-1] and target == states[-1]
        student, target = cllm.pick_consistency_pair(states, "local", random.Random(seed))
        assert target == states[states.index(student) + 1]
    assert cllm.pick_consistency_pair([[4, 4]], "global", random.Random(0)) == ([4, 4], [4, 4])


# ----- Rollouts -----------------------------------------------------------------------------


class ThreadRank:
    """One rank of an accelerate world, played by a thread; the barrier is shared by the world."""

    def __init__(self, rank: int, barrier: threading.Barrier):
        self.process_index, self.num_processes, self.is_main_process = rank, barrier.parties, rank == 0
        self.barrier = barrier

    def wait_for_everyone(self) -> None:
        self.barrier.wait(timeout=30)


def run_ranks(world: int, fn) -> list:
    """``fn(accelerator)`` on every rank of a ``world``-thread world; each rank's result (or error)."""
    barrier, results = threading.Barrier(world), [None] * world

    def run(rank: int) -> None:
        try:
            results[rank] = fn(ThreadRank(rank, barrier))
        except Exception as err:  # noqa: BLE001 - handed to the test (a rank left waiting times out)
            results[rank] = err

    threads = [threading.Thread(target=run, args=(rank,)) for rank in range(world)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def _prompts(tokenizer) -> list[RolloutPrompt]:
    data = DataConfig(tasks=["copy", "sort", "arith"], train_per_task=2)
    return choose_prompts(data, tokenizer, max_prompts=5, max_new_tokens=32, seed=0)


def test_choose_prompts(teacher):
    _, tokenizer = teacher
    prompts = _prompts(tokenizer)
    assert len(prompts) == 5 and {p.task for p in prompts} <= {"copy", "sort", "arith"}
    assert all(p.reference and p.ids[-1] != tokenizer.eos_token_id for p in prompts)
    assert prompts == _prompts(tokenizer)  # seeded
    with pytest.raises(RolloutError, match="leaves room"):
        choose_prompts(DataConfig(tasks=["copy"], train_per_task=2, max_length=40), tokenizer, 0, 32, 0)


def test_rollouts_shard_merge_reuse_and_recollect(teacher, tmp_path, monkeypatch):
    model, tokenizer = teacher
    prompts = _prompts(tokenizer)
    settings = dict(model_id={"name": "tiny-teacher"}, jacobi_block_size=8, max_new_tokens=32, progress=False)
    single = collect_jacobi_rollouts(model, tokenizer, prompts, tmp_path / "one", **settings)
    # Two ranks: each decodes its slice, rank 0 merges; both return the merged dataset.
    sharded, other = run_ranks(2, lambda acc: collect_jacobi_rollouts(model, tokenizer, prompts, tmp_path / "two",
                                                                      accelerator=acc, **settings))
    assert sharded == other and sharded.name == single.name  # the key ignores how the work was split
    one, two = load_rollouts(single), load_rollouts(sharded)
    for column in ("prompt_index", "prompt_ids", "prefix_ids", "block_index", "fixed_point", "task", "correct"):
        assert one[column] == two[column], column
    assert sorted(set(two["prompt_index"])) == list(range(5)) and two["prompt_index"] == sorted(two["prompt_index"])
    assert all(s[-1] == f for s, f in zip(two["states"], two["fixed_point"]))
    # The teacher answers these tasks right, but arith's worked answers do not fit 32 tokens.
    assert all(c is (t != "arith") for c, t in zip(two["correct"], two["task"])) and "arith" in two["task"]
    assert not list((tmp_path / "two").glob("*.shards")) and current_rollouts(tmp_path / "two") == sharded

    # Same settings: reused without decoding anything.
    def fail(*args, **kwargs):
        raise AssertionError("rollouts were collected again")

    monkeypatch.setattr(rollouts_module, "collect_jacobi_trajectories", fail)
    assert collect_jacobi_rollouts(model, tokenizer, prompts, tmp_path / "one", **settings) == single
    monkeypatch.undo()
    # Other settings or prompts: collected again, next to the first.
    other_block = collect_jacobi_rollouts(model, tokenizer, prompts, tmp_path / "one", **{**settings, "jacobi_block_size": 4})
    other_prompts = collect_jacobi_rollouts(model, tokenizer, prompts[:3], tmp_path / "one", **settings)
    assert len({single, other_block, other_prompts}) == 3
    assert set(load_rollouts(other_prompts)["prompt_index"]) == {0, 1, 2}
    assert max(len(f) for f in load_rollouts(other_block)["fixed_point"]) == 4
    assert current_rollouts(tmp_path / "one") == other_prompts

    # More ranks than prompts: rank 0 has none and saves no shard; the merge still holds them all.
    ranks = run_ranks(3, lambda acc: collect_jacobi_rollouts(model, tokenizer, prompts[:2], tmp_path / "three",
                                                             accelerator=acc, **settings))
    assert ranks[0] == ranks[1] == ranks[2]
    expected = [f for f, i in zip(one["fixed_point"], one["prompt_index"]) if i < 2]
    assert load_rollouts(ranks[0])["fixed_point"] == expected
    with pytest.raises(RolloutError, match="no prompts to roll out"):
        collect_jacobi_rollouts(model, tokenizer, [], tmp_path / "none", **settings)


def test_load_rollouts_errors(tmp_path):
    with pytest.raises(RolloutError, match="not a saved rollout dataset"):
        load_rollouts(tmp_path / "nothing")
    with pytest.raises(RolloutError, match="no rollouts in"):
        current_rollouts(tmp_path)
    datasets.Dataset.from_list([{"prompt_ids": [1], "states": [[2]]}]).save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(RolloutError, match=r"lacks columns \['prompt_index', 'prefix_ids'"):
        load_rollouts(tmp_path / "bad")
    row = dict(prompt_index=0, prompt_ids=[1], prefix_ids=[], block_index=0, states=[[2]], fixed_point=[2],
               task="copy", correct=False)
    datasets.Dataset.from_list([row, {**row, "task": "", "correct": None}],
                               features=rollouts_module.FEATURES).save_to_disk(str(tmp_path / "graded"))
    assert len(load_rollouts(tmp_path / "graded", drop_wrong=True)) == 1  # answers without a checker stay
    datasets.Dataset.from_list([row], features=rollouts_module.FEATURES).save_to_disk(str(tmp_path / "wrong"))
    with pytest.raises(RolloutError, match="fails its task's checker"):
        load_rollouts(tmp_path / "wrong", drop_wrong=True)


# ----- Rollout bench ------------------------------------------------------------------------


def test_reference_collector_finds_our_fixed_points(lively_tiny):
    model, tokenizer = lively_tiny("qwen2")
    engine = Engine(model, tokenizer)
    prompts = bench_prompts(tokenizer, 3)
    ours = collect_jacobi_trajectories(engine, prompts, jacobi_block_size=4, max_new_tokens=14)
    for index, prompt in enumerate(prompts):
        rows, forwards = reference_trajectories(engine, prompt, 4, 14, random.Random(index))
        assert [r["fixed_point"] for r in rows] == [r["fixed_point"] for r in ours if r["prompt_index"] == index]
        assert all(r["states"][-1] == r["fixed_point"] for r in rows)
        assert forwards == sum(len(r["states"]) for r in rows)  # one forward per state, the last verifies
    assert max(len(r["states"]) for r in ours) >= 3


def test_bench_rollout_command(tmp_path):
    main(["bench-rollout", "tiny-teacher", "--n", "3", "--jacobi-block-size", "8", "--max-new-tokens", "24",
          "--batch-sizes", "2,1", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "rollout_bench.json").read_text())
    assert [r["collector"] for r in rows] == ["ours", "ours", "reference"]
    assert all(r["same_fixed_points"] and r["trajectories"] == rows[0]["trajectories"] > 0 for r in rows)
    assert [r["settings"]["batch_size"] for r in rows] == [2, 1, 1]
    assert "bench-rollout tiny-teacher --n 3" in (tmp_path / "rollout_bench.md").read_text()


# ----- Recipe -------------------------------------------------------------------------------

SMALL = [*SMALL_ROLLOUT_RUN, "rollout.max_prompts=6", "method.jacobi_block_size=8", "train.micro_batch_size=4", "export.dir=null"]


def test_recipe_trains_through_the_trainer_and_reuses_its_rollouts(tmp_path, monkeypatch):
    cfg = load_config(CONFIG, [*SMALL, f"output_dir={tmp_path}", "train.max_steps=3"])
    result = train(cfg)
    assert len(result.losses) == 3 and all(math.isfinite(x) for x in result.losses)
    assert (tmp_path / "checkpoints" / "step-000003" / "model" / "model.safetensors").is_file()
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(m["consistency"] > 0 and m["ar"] > 0 and 0 < m["counted"] < 1 for m in metrics)
    assert len(list((tmp_path / "rollouts").glob("*/settings.json"))) == 1

    monkeypatch.setattr(rollouts_module, "collect_jacobi_trajectories", lambda *a, **k: pytest.fail("recollected"))
    train(load_config(CONFIG, [*SMALL, f"output_dir={tmp_path}", "train.max_steps=3", "train.resume_from=latest"]))


@pytest.mark.parametrize("consistency", ["global", "local"])
def test_loss_falls_on_a_fixed_batch(tmp_path, consistency):
    cfg = load_config(CONFIG, [*SMALL, f"output_dir={tmp_path}", f"method.consistency={consistency}"])
    model, tokenizer = load_model("tiny-teacher")
    rows = _trajectory_rows((model, tokenizer))
    samples = [{**r, NOISE_SEED: i} for i, r in enumerate(rows)]
    batch = {**cllm.build_collator(cfg, tokenizer)(samples), "step": 0}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    losses = []
    for _ in range(8):
        total, metrics = cllm.loss(model, batch, cfg)
        (total / batch["n_targets"]).backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(metrics["consistency"])
    assert losses[-1] < 0.5 * losses[0], losses


# ----- Config errors ------------------------------------------------------------------------


@pytest.mark.parametrize("override,message", [
    ("method.consistency=both", "method.consistency must be one of global, local"),
    ("method.jacobi_block_size=1", "method.jacobi_block_size must be >= 2"),
    ("method.init=random", "method.init must be one of prompt, pad, repeat"),
    ("method.label_smoothing=1.0", r"method.label_smoothing must be in \[0, 1\)"),
    ("method.ar_weight=-1", "method.ar_weight must be >= 0"),
    ("rollout.max_prompts=-2", "rollout.max_prompts must be >= 0"),
    ("method.blocksize=8", "unknown config key 'method.blocksize'; valid keys in method: jacobi_block_size"),
])
def test_method_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(CONFIG, [override])


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "cllm").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_pass_the_section_rules(path):
    cllm.check_sections(load_config(path))


@pytest.mark.parametrize("override,message", [
    ("rollout.decoder=ar", "set rollout.decoder=jacobi"),
    ("rollout.temperature=0.7", "needs greedy rollouts"),
    ("rollout.max_new_tokens=8", "shorter than one Jacobi block"),
    ("data.max_length=96", "leaves no room for a prompt"),
    ("data.packing=true", "data.packing and train.group_by_length do not apply"),
])
def test_section_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        cllm.check_sections(load_config(CONFIG, [override]))


def test_rollouts_decode_one_batch_at_a_time_each_seeded_by_its_place():
    """The bar moves per batch, a batch's draws depend on where it starts, not on the display, and
    batches group prompts of similar length; the rows come back in prompt order, each with its answer."""
    from types import SimpleNamespace

    calls = []

    def decode(engine, ids, seed):
        calls.append((ids, seed))
        return [{"prompt_index": i, "answer": row} for i, row in enumerate(ids)], dict(enumerate(ids))

    lengths = [3, 1, 4, 1, 5]
    prompts = [RolloutPrompt([i] * n) for i, n in enumerate(lengths)]
    rows = rollouts_module._collect_slice(SimpleNamespace(tokenizer=None), prompts, 0, 5, decode=decode, seed=10,
                                          batch_size=2, progress=False)
    assert calls == [([[1], [3]], 10), ([[0] * 3, [2] * 4], 12), ([[4] * 5], 14)]
    assert [r["prompt_index"] for r in rows] == [0, 1, 2, 3, 4]
    assert [r["answer"] for r in rows] == [p.ids for p in prompts]


def test_an_interrupted_collection_resumes_at_its_first_undecoded_batch(tmp_path):
    """Batches decoded before a stop are read back, not decoded again; a batch with other prompts
    or another seed is not mistaken for a saved one."""
    from types import SimpleNamespace

    calls = []

    def decode(engine, ids, seed):
        calls.append(seed)
        if len(calls) == 3:
            raise KeyboardInterrupt  # stopped while decoding the third batch
        return [{"prompt_index": i, "prompt_ids": row} for i, row in enumerate(ids)], dict(enumerate(ids))

    features = datasets.Features({"prompt_index": datasets.Value("int64"),
                                  "prompt_ids": datasets.Sequence(datasets.Value("int32")),
                                  "task": datasets.Value("string"), "correct": datasets.Value("bool")})
    store = rollouts_module._BatchStore(tmp_path / "batches", features)
    prompts = [RolloutPrompt([i] * (i + 1)) for i in range(6)]
    collect = functools.partial(rollouts_module._collect_slice, SimpleNamespace(tokenizer=None), prompts, 0, 6,
                                decode=decode, batch_size=2, progress=False, done=store)
    with pytest.raises(KeyboardInterrupt):
        collect(seed=10)
    assert calls == [10, 12, 14] and len(list(store.root.iterdir())) == 2
    rows = collect(seed=10)
    assert calls == [10, 12, 14, 14]  # only the third batch decoded again
    assert [(r["prompt_index"], r["prompt_ids"]) for r in rows] == [(i, [i] * (i + 1)) for i in range(6)]
    collect(seed=20)  # another seed: every batch decoded anew
    assert calls[4:] == [20, 22, 24]
