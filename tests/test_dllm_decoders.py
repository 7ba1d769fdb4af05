"""The distillation decoders' options of ``block_diffusion``: CD4LM's capped threshold, Learn2PD's
filter rule, end-of-text fill, and the filter's reference-guided labels."""

import torch

from leaplm.inference.decoders.block_diffusion import fill_after_stop, select_commits
from leaplm.inference.engine import Engine
from leaplm.models.unmask_filter import UnmaskFilter, UnmaskFilterConfig
from leaplm.train.learn2pd import reference_guided_examples

from tests.test_block_diffusion_decoder import MAX_NEW, converted, never_stopping, prompts_of


def test_max_per_step_caps_the_threshold_rule_cd4lm():
    confidence = torch.tensor([[0.96, 0.99, 0.5, 0.97], [0.2, 0.3, 0.1, 0.25]])
    everything = torch.ones(2, 4, dtype=torch.bool)
    capped = select_commits(confidence, None, everything, "threshold", threshold=0.95, max_per_step=2)
    assert capped.tolist() == [[False, True, False, True], [False, True, False, False]]  # top 2; at least 1
    free = select_commits(confidence, None, everything, "threshold", threshold=0.95)
    assert free.tolist()[0] == [True, True, False, True]


def test_filter_rule_sees_closed_slots_as_one_and_keeps_the_best():
    seen = []

    def identity(confidence):
        seen.append(confidence.clone())
        return confidence

    confidence = torch.tensor([[0.9, 0.5, 0.85, 0.7]])
    open_slots = torch.tensor([[True, True, False, True]])
    chosen = select_commits(confidence, None, open_slots, "filter", unmask_filter=identity, accept=0.8)
    assert torch.equal(seen[0], torch.tensor([[0.9, 0.5, 1.0, 0.7]]))
    assert chosen.tolist() == [[True, False, False, False]]  # 0.85 is closed
    nothing = select_commits(confidence, None, open_slots, "filter", unmask_filter=identity, accept=0.99)
    assert nothing.tolist() == [[True, False, False, False]]  # none accepted: the most confident


def test_fill_after_stop():
    model, tokenizer = converted("llama", 4)
    engine = Engine(model, tokenizer, stop_token_ids=[9])
    block = torch.tensor([[5, 7, 9, 8], [9, 1, 2, 3], [1, 2, 3, 4]])
    committed = torch.tensor([[True, False, True, False], [False, True, False, False], [True] * 4])
    fill_after_stop(engine, block, committed, 0)
    assert block.tolist() == [[5, 7, 9, 0], [9, 1, 2, 3], [1, 2, 3, 4]]  # row 1's stop is not committed
    assert committed.tolist() == [[True, False, True, True], [False, True, False, False], [True] * 4]


def test_filter_rule_end_to_end(tmp_path):
    block_size = 4
    model, tokenizer = converted("llama", block_size)
    prompts = prompts_of(tokenizer)
    UnmaskFilter(UnmaskFilterConfig(width=block_size - 1, hidden=8)).save_pretrained(tmp_path / "filter")
    engine = never_stopping(model, tokenizer)

    def run(**settings):
        return engine.generate(prompts, "block_diffusion", MAX_NEW, **settings).sequences

    # accept 0: every open slot passes (a block per step, as top_k = block); accept 1: only the best.
    assert run(rule="filter", unmask_filter=str(tmp_path / "filter"), accept=0.0) == run(rule="top_k", top_k=block_size)
    assert run(rule="filter", unmask_filter=str(tmp_path / "filter"), accept=1.0) == run(rule="threshold", threshold=1.0)


def test_eos_fill_keeps_the_answer_before_the_stop():
    model, tokenizer = converted("llama", 4)
    prompts = prompts_of(tokenizer)
    free = never_stopping(model, tokenizer).generate(prompts, "block_diffusion", MAX_NEW, threshold=1.0).sequences
    stop = free[0][5]
    engine = Engine(model, tokenizer, stop_token_ids=[stop])
    plain = engine.generate(prompts, "block_diffusion", MAX_NEW, threshold=1.0)
    filled = engine.generate(prompts, "block_diffusion", MAX_NEW, threshold=1.0, eos_fill=True)
    assert any(stop in s for s in plain.sequences)
    for seq in filled.sequences:  # a row ends at its first stop; nothing after it is returned
        assert stop not in seq[:-1] and (seq[-1] == stop or len(seq) == MAX_NEW)
    # The fill commits the slots after a stop, so a block with one needs no step for them.
    assert filled.stats.sequence_forwards <= plain.stats.sequence_forwards + len(prompts)


def test_reference_guided_examples_label_only_open_slots():
    block_size = 4
    model, tokenizer = converted("llama", block_size)
    prompts = prompts_of(tokenizer)
    answers = never_stopping(model, tokenizer).generate(prompts, "block_diffusion", 10, threshold=1.0).sequences
    confidence, label, opened = reference_guided_examples(model, prompts, answers, batch_size=2)
    assert confidence.shape == label.shape == opened.shape and confidence.shape[1] == block_size - 1
    assert (confidence[~opened] == 1).all() and (label[~opened] == 0).all()
    assert ((confidence > 0) & (confidence <= 1)).all()
    # The model's own one-token-per-step answer: the first step of each block has every slot open,
    # and each step commits at least one slot, so a block takes 1 to 3 steps.
    n_blocks = sum(-(-len(a) // block_size) for a in answers)
    assert n_blocks <= len(label) <= n_blocks * (block_size - 1)
    assert label.sum() >= 1
