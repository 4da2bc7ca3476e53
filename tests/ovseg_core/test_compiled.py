"""The compiled training step (ovseg_core.train.compiled): inductor on CPU gives eager's losses and gradients.

The parity test compiles the `tiny` step with 1+1 vision blocks and 2 text layers (the same layer types as tiny;
fewer copies keep the cold inductor compile, which runs gcc per kernel, to about a minute on the 2-core CI box).
`fallback_random` makes inductor draw Gumbel noise and dropout with eager's generator, so both runs see the same
noise and differences are float rounding only. The first run of this file on a machine pays the cold compile;
inductor caches it (TORCHINDUCTOR_CACHE_DIR) for later runs.
"""
from __future__ import annotations

import random

import pytest
import torch

from ovseg_core import create_model
from ovseg_core.train.compiled import (
    TEXT_BUCKETS,
    bucket_length,
    build_train_step,
    compile_enabled,
    compile_mode,
    pad_text_to_buckets,
)


def _text(tokenizer, texts: list[str], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=width, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def _batch(model, batch_size: int = 6, seed: int = 0) -> dict[str, torch.Tensor]:
    rng = random.Random(seed)
    words = ["dog", "cat", "sofa", "red car", "bowl of fruit", "tree", "house", "people"]
    captions = [f"a photo of a {rng.choice(words)} next to a {rng.choice(words)} in the {rng.choice(words)}"
                for _ in range(batch_size)]
    ids, mask = _text(model.tokenizer, captions, 23)  # odd widths: the step pads them up to a bucket
    q_ids, q_mask = _text(model.tokenizer, [c.replace("dog", "[MASK]") for c in captions], 21)
    a_ids, a_mask = _text(model.tokenizer, [f"a photo of a {rng.choice(words)}" for _ in captions], 9)
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.randn(batch_size, 3, model.image_size, model.image_size, generator=g),
            "input_ids": ids, "attention_mask": mask, "question_ids": q_ids, "question_mask": q_mask,
            "answer_ids": a_ids, "answer_mask": a_mask,
            "has_entity": torch.tensor([i % 3 != 1 for i in range(batch_size)])}  # some rows without an entity


def _losses_and_grads(model, step, batch, seed: int) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = step(batch, 1)
    out["loss"].backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return {k: float(v.detach()) for k, v in out.items()}, grads


@pytest.mark.slow  # cold inductor compile: ~2.5 CPU-minutes (gcc per kernel); seconds once cached
def test_compiled_tiny_step_matches_eager_losses_and_gradients():
    import torch._dynamo
    import torch._inductor.config as inductor_config

    torch.manual_seed(0)
    model = create_model("tiny", depths=(1, 1), text_num_layers=2).train()
    batch = _batch(model)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    with inductor_config.patch(fallback_random=True):
        compiled = build_train_step(model, "on", torch.device("cpu"))
        assert compiled is not model
        losses_c, grads_c = _losses_and_grads(model, compiled, batch, seed=7)
    # eager on the bucket-padded batch: dropout draws one number per text position, so only equal widths draw
    # equal masks (that padding itself changes nothing is test_bucket_padding_changes_no_loss)
    padded = pad_text_to_buckets(batch)
    losses_e, grads_e = _losses_and_grads(model, model, padded, seed=7)
    losses_e2, _ = _losses_and_grads(model, model, padded, seed=8)

    # the whole stage-1 forward + losses is one graph: no break (the masked contrastive mean has fixed shapes)
    assert sum(torch._dynamo.utils.counters["graph_break"].values()) == 0
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1
    for key in ("loss", "itc", "mec"):
        assert losses_c[key] == pytest.approx(losses_e[key], rel=1e-5, abs=1e-6), key
    assert losses_e2["loss"] != pytest.approx(losses_e["loss"], rel=1e-6)  # the noise does matter: seeds differ

    assert set(grads_c) == set(grads_e) and len(grads_e) > 50
    scale = max(g.abs().max().item() for g in grads_e.values())
    for name, g in grads_e.items():
        # relative to the largest gradient: some gradients are analytically zero (a bias before a normalisation)
        # and are pure rounding noise in both runs
        torch.testing.assert_close(grads_c[name], g, rtol=1e-3, atol=1e-4 * scale, msg=name)
    total = torch.cat([g.flatten() for g in grads_e.values()])
    diff = torch.cat([(grads_c[n] - g).flatten() for n, g in grads_e.items()])
    assert diff.norm() / total.norm() < 1e-4


def test_bucket_padding_changes_no_loss():
    torch.manual_seed(0)
    model = create_model("tiny", depths=(1, 1), text_num_layers=2).eval()  # eval: no noise, exact comparison
    batch = _batch(model, batch_size=4)
    padded = pad_text_to_buckets(batch)
    assert padded["input_ids"].shape[1] == 32 and padded["answer_ids"].shape[1] == 16
    assert padded["attention_mask"][:, 23:].sum() == 0
    with torch.no_grad():
        a, b = model.forward_train(batch, 1), model.forward_train(padded, 1)
    for key in ("loss", "itc", "mec"):
        assert float(a[key]) == pytest.approx(float(b[key]), rel=1e-5), key


def test_compile_switch_and_buckets():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not compile_enabled("auto", cpu) and compile_enabled("auto", cuda)
    assert compile_enabled("on", cpu) and not compile_enabled("off", cuda)
    with pytest.raises(ValueError, match="compile must be one of"):
        compile_enabled("yes", cpu)
    assert compile_mode(cuda, 1) == "reduce-overhead" and compile_mode(cuda, 8) == "default"
    assert [bucket_length(w) for w in (1, 16, 17, 77, 200)] == [16, 16, 32, 80, 200]
    assert list(TEXT_BUCKETS) == sorted(TEXT_BUCKETS)
    module = torch.nn.Identity()
    assert build_train_step(module, "off", cpu) is module  # eager: untouched, nothing padded
