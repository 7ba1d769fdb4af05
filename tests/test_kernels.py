"""Decode-step kernels: every path (compiled CPU, Triton under TRITON_INTERPRET=1) against the reference."""

from __future__ import annotations

import math
import os

import pytest
import torch

from leaplm.data.tasks import make_split
from leaplm.inference import kernels
from leaplm.inference.engine import Engine
from leaplm.inference.evaluate import task_prompts
from leaplm.inference.kernels.commit import CommitStats, _one_pass, commit_stats, commit_stats_reference
from leaplm.inference.kernels.verify import verify_block, verify_block_reference, verify_tree
from leaplm.models.zoo import load_model


def _logits(shape, seed, dtype=torch.float32):
    """Random logits with ties planted: rows whose two largest logits are equal, and -inf entries."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g) * 3  # [..., v]
    flat = x.view(-1, shape[-1])
    if shape[-1] > 2:
        top = flat.argmax(-1)
        tie = (top + shape[-1] // 2) % shape[-1]
        flat[::2].scatter_(1, tie[::2, None], flat[::2].gather(1, top[::2, None]))  # a tied maximum
        flat[1::3, 1] = float("-inf")  # a masked-out token
    return x.to(dtype)


SHAPES = [(3, 7), (2, 5, 1031), (1, 2, 4099)]  # odd vocabularies; 4099 spans several Triton chunks


def _assert_stats_close(got: CommitStats, want: CommitStats) -> None:
    assert torch.equal(got.token, want.token)
    for name in ("prob", "entropy", "gap"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=1e-4, atol=1e-5, msg=name)


def test_reference_commit_stats_by_hand():
    # Two equal maxima: argmax is the first, gap 0; a uniform row has entropy log v.
    logits = torch.tensor([[math.log(2.0), math.log(2.0), 0.0], [0.0, 0.0, 0.0]])
    stats = commit_stats_reference(logits)
    assert stats.token.tolist() == [0, 0]
    torch.testing.assert_close(stats.prob, torch.tensor([0.4, 1 / 3]))
    torch.testing.assert_close(stats.gap, torch.tensor([0.0, 0.0]))
    torch.testing.assert_close(stats.entropy[1], torch.tensor(math.log(3)))


@pytest.mark.parametrize("shape", SHAPES)
def test_one_pass_formulas_match_reference(shape):
    logits = _logits(shape, seed=len(shape))
    _assert_stats_close(CommitStats(*_one_pass(logits)), commit_stats_reference(logits))


def test_compiled_commit_stats_match_reference():
    with kernels.use_backend("compiled"):
        for shape in SHAPES:  # one compilation serves them all (dynamic shapes, rows flattened)
            logits = _logits(shape, seed=1)
            _assert_stats_close(commit_stats(logits), commit_stats_reference(logits))


def test_dispatch_and_reference_switch(monkeypatch):
    small, large = torch.zeros(2, 9), torch.zeros(1, kernels.COMPILED_MIN_VOCAB)
    assert (kernels.backend(small), kernels.backend(large)) == ("reference", "compiled")
    with kernels.use_backend("reference"):
        assert kernels.backend(large) == "reference"
    monkeypatch.setenv("LEAPLM_KERNELS", "reference")
    assert kernels.backend(large) == "reference"
    with pytest.raises(ValueError, match="compiled"):
        kernels.use_backend("fast").__enter__()


@pytest.mark.parametrize("device, has_triton, expected", [("cpu", False, "compiled"), ("cuda", True, "triton"),
                                                          ("cuda", False, "reference"), ("meta", True, "reference")])
def test_fused_backend_by_device(monkeypatch, device, has_triton, expected):
    monkeypatch.setattr(kernels, "triton_available", lambda: has_triton)
    assert kernels.fused_backend(torch.device(device)) == expected


def _candidates(predicted: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidates equal to the argmax up to a random first mismatch per row, and random lengths."""
    g = torch.Generator().manual_seed(seed)
    b, width = predicted.shape
    candidates = predicted[:, :-1].clone()  # [b, k]
    wrong = torch.randint(0, width, (b,), generator=g)  # == k: no mismatch
    for row in range(b):
        if wrong[row] < width - 1:
            candidates[row, wrong[row]] = (candidates[row, wrong[row]] + 1) % 7
    lengths = torch.randint(0, width, (b,), generator=g)
    return candidates, lengths


def test_verify_block_by_hand():
    logits = torch.full((2, 4, 5), -1.0)
    logits[:, 0, 3] = logits[:, 1, 1] = logits[:, 2, 4] = logits[:, 3, 2] = 1.0  # argmax 3, 1, 4, 2
    candidates = torch.tensor([[3, 1, 0], [3, 1, 4]])
    verdict = verify_block_reference(logits, candidates)
    assert verdict.accepted.tolist() == [2, 3] and verdict.next_token.tolist() == [4, 2]
    capped = verify_block_reference(logits, candidates, torch.tensor([3, 1]))
    assert capped.accepted.tolist() == [2, 1] and capped.next_token.tolist() == [4, 1]


def test_compiled_verify_block_matches_reference():
    for shape in [(4, 6, 13), (3, 3, 1031), (2, 9, 4099)]:  # k >= 2: a size-1 dimension would recompile
        logits = _logits(shape, seed=4)
        candidates, lengths = _candidates(logits.argmax(-1), seed=5)
        want = verify_block_reference(logits, candidates, lengths)
        with kernels.use_backend("compiled"):
            got = verify_block(logits, candidates, lengths)
        assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_verify_tree_by_hand():
    # Root 0 -> node 1 (token 5) -> node 3 (token 6); root -> node 2 (token 7). Argmax per node: 5, 6, 0, 9.
    logits = torch.zeros(1, 4, 10)
    for node, token in enumerate([5, 6, 0, 9]):
        logits[0, node, token] = 1.0
    tokens = torch.tensor([[1, 5, 7, 6]])
    paths = torch.tensor([[0, 2, -1], [0, 1, 3]])
    verdict = verify_tree(logits, tokens, paths)
    assert (verdict.path.item(), verdict.accepted.item(), verdict.next_token.item()) == (1, 2, 9)
    for name in ("reference", "compiled"):
        with kernels.use_backend(name):
            assert verify_tree(logits, tokens, paths) == verdict
    with pytest.raises(ValueError, match="root"):
        verify_tree(logits, tokens, torch.tensor([[1, 2]]))


# ----- Triton, interpreted on CPU --------------------------------------------------------------


@pytest.fixture(scope="module")
def triton_kernels():
    pytest.importorskip("triton", reason="Triton kernels are tested when triton is installed (pip install triton)")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("CPU tensors need TRITON_INTERPRET=1 (tests/conftest.py sets it without a GPU)")
    from leaplm.inference.kernels import triton_kernels as module

    return module


@pytest.mark.parametrize("shape", SHAPES)
def test_triton_commit_stats_match_reference(triton_kernels, shape):
    for dtype in (torch.float32, torch.float16):
        logits = _logits(shape, seed=6, dtype=dtype)
        _assert_stats_close(CommitStats(*triton_kernels.commit_stats_triton(logits)), commit_stats_reference(logits))


@pytest.mark.parametrize("shape", [(4, 6, 13), (3, 2, 1031), (2, 5, 2053)])
def test_triton_verify_block_matches_reference(triton_kernels, shape):
    logits = _logits(shape, seed=7)
    candidates, lengths = _candidates(logits.argmax(-1), seed=8)
    got = triton_kernels.verify_block_triton(logits, candidates, lengths)
    want = verify_block_reference(logits, candidates, lengths)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


# ----- Decoders on the fused paths ------------------------------------------------------------
# The embedded models have a 512-token vocabulary, below COMPILED_MIN_VOCAB, so their decoder tests
# run the reference; here the compiled paths are forced through whole decodes.


@pytest.mark.slow  # about 25 s with a warm inductor cache, a minute cold
def test_decoders_on_compiled_kernels_equal_the_reference():
    for name, decoder, settings in (("tiny-teacher", "jacobi_multiblock", {}),
                                    ("tiny-teacher-bd", "block_diffusion", dict(threshold=0.7))):
        model, tokenizer = load_model(name)
        engine = Engine(model, tokenizer)
        prompts = task_prompts(tokenizer, make_split("copy", "test", 2) + make_split("word", "test", 2))
        with kernels.use_backend("reference"):
            want = engine.generate(prompts, decoder, 24, **settings).sequences
        with kernels.use_backend("compiled"):
            assert engine.generate(prompts, decoder, 24, **settings).sequences == want, name
