"""OVSegmentor: registry, config, encoders, forward_train gradients (stage 1 and 2), MEC padding, determinism,
local timm checkpoint loading, text model resolution without downloads."""

import copy
import dataclasses
import socket

import pytest
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer

import ovseg_core
from ovseg_core import OVSegConfig, create_model, list_models
from ovseg_core.losses import colour_affinity_loss, unclaimed_group_loss
from ovseg_core.models.text import TextModelNotFoundError, load_text_backbone

B = 4


def make_batch(model, batch_size: int = B, stage: int = 1, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    tok = model.tokenizer
    size = model.image_size
    captions = ["a dog runs on the beach", "two people sit on a bench near a bus", "a red car", "a cat on a sofa"]
    captions = (captions * batch_size)[:batch_size]
    questions = [c.replace("dog", "[MASK]").replace("people", "[MASK]").replace("car", "[MASK]")
                 .replace("cat", "[MASK]") for c in captions]
    answers = ["a photo of a dog", "a photo of people and bus", "a photo of a car", "a photo of a cat"]
    answers = (answers * batch_size)[:batch_size]

    def enc(texts):
        t = tok(texts, padding="max_length", truncation=True, max_length=16, return_tensors="pt")
        return t["input_ids"], t["attention_mask"]

    batch = {"image": torch.randn(batch_size, 3, size, size, generator=gen)}
    batch["input_ids"], batch["attention_mask"] = enc(captions)
    batch["question_ids"], batch["question_mask"] = enc(questions)
    batch["answer_ids"], batch["answer_mask"] = enc(answers)
    batch["has_entity"] = torch.ones(batch_size, dtype=torch.bool)
    batch["has_entity"][-1] = False
    if stage == 2:
        batch["partner_image"] = torch.randn(batch_size, 3, size, size, generator=gen)
        batch["partner_valid"] = torch.ones(batch_size, dtype=torch.bool)
        batch["partner_valid"][0] = False
        batch["shared_ids"], batch["shared_mask"] = enc(["a photo of a dog."] * batch_size)
    return batch


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return create_model("tiny", text_pretrained=False)


def test_registry_lists_presets_and_rejects_unknown():
    assert {"tiny", "vit_s", "vit_b"} <= set(list_models())
    assert ovseg_core.get_model_config("vit_s").embed_dim == 384
    assert ovseg_core.get_model_config("vit_b").embed_dim == 768
    with pytest.raises(ValueError, match="unknown model"):
        create_model("vit_huge")
    with pytest.raises(ValueError, match="unknown config overrides"):
        create_model("tiny", not_a_field=1)


def test_config_is_validated_frozen_and_round_trips(tmp_path):
    cfg = ovseg_core.get_model_config("tiny", num_group_tokens=16)
    assert cfg.num_group_tokens == 16
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.embed_dim = 3
    for bad in ({"image_size": 60}, {"num_groups": 40}, {"embed_dim": 190}, {"group_ratio": 1.0},
                {"text_trainable_layers": -1}, {"depths": (2,)}):
        with pytest.raises(ValueError):
            dataclasses.replace(cfg, **bad)
    path = cfg.save_json(tmp_path / "cfg.json")
    assert OVSegConfig.load_json(path) == cfg


def test_encode_shapes_and_soft_assignment(tiny):
    tiny.eval()
    cfg = tiny.cfg
    grid = cfg.image_size // cfg.patch_size
    with torch.no_grad():
        out = tiny.encode_image(torch.randn(3, 3, cfg.image_size, cfg.image_size))
        assert out.image_emb.shape == (3, cfg.embed_dim_out)
        assert out.group_emb.shape == (3, cfg.num_groups, cfg.embed_dim_out)
        assert out.assign.shape == (3, cfg.num_groups, grid, grid)
        assert torch.allclose(out.image_emb.norm(dim=-1), torch.ones(3), atol=1e-5)
        assert torch.allclose(out.group_emb.norm(dim=-1), torch.ones(3, cfg.num_groups), atol=1e-5)
        assert torch.allclose(out.assign.sum(1), torch.ones(3, grid, grid), atol=1e-5)
        assert out.assign.min() > 0  # soft in eval mode
        # a non-square, larger input (sliding windows) works via position-embedding resampling
        big = tiny.encode_image(torch.randn(1, 3, 2 * cfg.image_size, cfg.image_size))
        assert big.assign.shape == (1, cfg.num_groups, 2 * grid, grid)
        tok = tiny.tokenize(["a dog", "people on a bus"])
        emb = tiny.encode_text(tok["input_ids"], tok["attention_mask"])
        assert emb.shape == (2, cfg.embed_dim_out)
        assert torch.allclose(tiny.encode_text_strings(["a dog", "people on a bus"]), emb, atol=1e-5)
    assert tiny.num_groups == cfg.num_groups and tiny.patch_size == cfg.patch_size


def test_hard_assignment_in_train_mode_is_one_hot_with_gradients(tiny):
    tiny.train()
    tiny.zero_grad()
    out = tiny.encode_image(torch.randn(2, 3, tiny.image_size, tiny.image_size))
    assert set(out.assign.detach().unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(out.assign.detach().sum(1), torch.ones_like(out.assign[:, 0]))
    (out.assign * torch.randn_like(out.assign)).sum().backward()
    assert tiny.visual.grouping.assign.q_proj.weight.grad.abs().sum() > 0
    tiny.zero_grad()


def test_stage1_every_trainable_parameter_gets_a_gradient(tiny):
    tiny.train()
    tiny.zero_grad()
    out = tiny.forward_train(make_batch(tiny), stage=1)
    assert set(out) == {"loss", "itc", "mec", "mask"}
    assert torch.isfinite(out["loss"]) and out["mask"].item() == 0.0
    assert torch.allclose(out["loss"], out["itc"] + tiny.cfg.mec_weight * out["mec"])
    out["loss"].backward()
    no_grad = [n for n, p in tiny.named_parameters() if p.requires_grad and (p.grad is None or p.grad.abs().sum() == 0)]
    assert no_grad == []
    # documented frozen parameters: tiny trains only the top `text_trainable_layers` text layers
    frozen = [n for n, p in tiny.named_parameters() if not p.requires_grad]
    top = tiny.text.num_layers - tiny.cfg.text_trainable_layers
    assert frozen and all(n.startswith("text.model.") for n in frozen)
    trainable_layers = {int(n.split(".")[4]) for n, p in tiny.named_parameters()
                        if p.requires_grad and n.startswith("text.model.encoder.layer.")}
    assert trainable_layers == set(range(top, tiny.text.num_layers))
    tiny.zero_grad()


def test_stage2_mask_loss_reaches_online_image_encoder():
    torch.manual_seed(0)
    model = create_model("tiny", text_pretrained=False, group_ratio=0.5)
    batch = make_batch(model, stage=2)
    with pytest.raises(RuntimeError, match="init_momentum_teacher"):
        model.forward_train(batch, stage=2)
    model.init_momentum_teacher()
    model.freeze_text_encoder()
    model.train()
    assert not model.visual_teacher.training and not model.text.model.training
    out = model.forward_train(batch, stage=2)
    assert out["mask"].item() > 0
    assert model.cfg.mask_weight == 1.6  # the release's effective weight on the mean Dice
    assert torch.allclose(out["loss"], out["itc"] + out["mec"] + model.cfg.mask_weight * out["mask"])
    visual = dict(model.visual.named_parameters())
    grads = torch.autograd.grad(out["mask"], list(visual.values()), allow_unused=True, retain_graph=True)
    got = {n for (n, _), g in zip(visual.items(), grads) if g is not None and g.abs().sum() > 0}
    assert "grouping.assign.q_proj.weight" in got and "blocks1.0.attn.qkv.weight" in got
    assert "patch_embed.proj.weight" in got
    out["loss"].backward()
    assert all(p.grad is None for p in model.visual_teacher.parameters())
    assert all(p.grad is None for p in model.text.model.parameters())
    # EMA: the teacher moves towards the online encoder
    with torch.no_grad():
        model.visual.pos_embed.add_(1.0)
    before = (model.visual_teacher.pos_embed - model.visual.pos_embed).abs().mean()
    model.momentum_update(0.9)
    after = (model.visual_teacher.pos_embed - model.visual.pos_embed).abs().mean()
    assert torch.isclose(after, 0.9 * before, rtol=1e-4)


def test_mec_output_ignores_padded_question_tokens(tiny):
    tiny.eval()
    batch = make_batch(tiny)
    ids, mask = batch["question_ids"], batch["question_mask"]
    assert (mask == 0).any()
    changed = ids.clone()
    changed[mask == 0] = 2023  # an ordinary word id where there should be [PAD]

    def mec(question_ids):
        with torch.no_grad():
            feats = tiny.visual.forward_features(batch["image"])
            return tiny.mec_head(feats.groups, tiny.text(question_ids, mask), mask)

    assert torch.allclose(mec(ids), mec(changed), atol=1e-5)
    # sanity: the same change is visible when the padding is (wrongly) treated as real words
    with torch.no_grad():
        feats = tiny.visual.forward_features(batch["image"])
        ones = torch.ones_like(mask)
        a = tiny.mec_head(feats.groups, tiny.text(ids, ones), ones)
        b = tiny.mec_head(feats.groups, tiny.text(changed, ones), ones)
    assert not torch.allclose(a, b, atol=1e-4)


def test_forward_train_deterministic_under_seed(tiny):
    batch = make_batch(tiny)
    tiny.train()
    results = []
    for _ in range(2):
        torch.manual_seed(123)
        with torch.no_grad():
            results.append({k: v.item() for k, v in tiny.forward_train(batch, stage=1).items()})
    assert results[0] == results[1]


@pytest.mark.parametrize("grid_src", [8, 4])
def test_visual_init_from_local_timm_checkpoint(tmp_path, grid_src):
    cfg = ovseg_core.get_model_config("tiny")
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=grid_src * cfg.patch_size, patch_size=cfg.patch_size, embed_dim=cfg.embed_dim,
                            depth=sum(cfg.depths), num_heads=cfg.num_heads, qkv_bias=True, num_classes=0)
    path = tmp_path / "dino_like.pth"
    torch.save(vit.state_dict(), path)
    model = create_model("tiny", text_pretrained=False, visual_init=str(path))
    ours = model.visual.state_dict()
    theirs = vit.state_dict()
    d1 = cfg.depths[0]
    for i in range(sum(cfg.depths)):
        dst = f"blocks1.{i}" if i < d1 else f"blocks2.{i - d1}"
        for leaf in ("norm1.weight", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "mlp.fc1.weight",
                     "mlp.fc2.bias", "norm2.bias"):
            assert torch.equal(ours[f"{dst}.{leaf}"], theirs[f"blocks.{i}.{leaf}"]), (dst, leaf)
    assert torch.equal(ours["patch_embed.proj.weight"], theirs["patch_embed.proj.weight"])
    assert torch.equal(ours["norm.weight"], theirs["norm.weight"])
    expected_pos = resample_abs_pos_embed(theirs["pos_embed"], [cfg.grid_size] * 2, old_size=[grid_src] * 2,
                                          num_prefix_tokens=1)[:, 1:]
    assert torch.allclose(ours["pos_embed"], expected_pos, atol=1e-6)
    if grid_src == cfg.grid_size:
        assert torch.equal(ours["pos_embed"], theirs["pos_embed"][:, 1:])  # cls position dropped, nothing resampled
    report = model.visual_init_report
    assert "cls_token" in report["unused"] and "group_token" in report["missing"]


def test_visual_init_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="visual_init"):
        create_model("tiny", text_pretrained=False, visual_init=str(tmp_path / "nope.pth"))


def test_missing_bert_weights_fail_clearly_without_network(monkeypatch, tmp_path):
    def no_network(*args, **kwargs):
        raise AssertionError("a network connection was attempted")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # even when the env would allow it, nothing is fetched
    for name in (str(tmp_path / "bert-base-uncased"), "bert-base-uncased"):
        with pytest.raises(TextModelNotFoundError, match="not available locally"):
            load_text_backbone(name, pretrained=True)
    with pytest.raises(TextModelNotFoundError, match="bert-base-uncased"):
        create_model("tiny", text_model="bert-base-uncased")


def test_real_minilm_weights_load_offline():
    from safetensors.torch import load_file

    from ovseg_core.models.text import minilm_path

    model = create_model("tiny", text_num_layers=3)  # text_pretrained=True: the bundled MiniLM-L6, first 3 layers
    ref = load_file(f"{minilm_path()}/model.safetensors")
    key = next(k for k in ref if k.endswith("embeddings.word_embeddings.weight"))
    assert torch.equal(model.text.model.embeddings.word_embeddings.weight, ref[key])
    assert model.text.num_layers == 3
    last = f"encoder.layer.{model.text.num_layers - 1}.output.dense.weight"
    assert torch.equal(model.text.model.get_parameter(last), ref[next(k for k in ref if k.endswith(last))])
    model.eval()
    with torch.no_grad():
        emb = model.encode_text_strings(["a dog on the beach", "a bowl of soup", "people on a bus"])
    assert emb.shape == (3, model.cfg.embed_dim_out)
    assert model.tokenizer("[MASK]")["input_ids"][1] == model.tokenizer.mask_token_id


def test_half_precision_checkpoint_loads_as_fp32_master_weights(tmp_path):
    """A text encoder saved in fp16 (how many hub copies are stored) trains with fp32 parameters: autocast gives the
    mixed precision, and AdamW steps on fp16 parameters would round small updates away."""
    import shutil

    from safetensors.torch import load_file, save_file

    from ovseg_core.models.text import minilm_path

    folder = tmp_path / "minilm-fp16"
    shutil.copytree(minilm_path(), folder)
    weights = load_file(str(folder / "model.safetensors"))
    save_file({k: v.half() for k, v in weights.items()}, str(folder / "model.safetensors"))
    model, _ = load_text_backbone(str(folder), pretrained=True)
    dtypes = {p.dtype for p in model.parameters()}
    assert dtypes == {torch.float32}
    key = next(k for k in weights if k.endswith("embeddings.word_embeddings.weight"))
    assert torch.equal(model.embeddings.word_embeddings.weight, weights[key].half().float())


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vit_s", "vit_b"])
def test_full_presets_build_and_encode(name):
    model = create_model(name, text_pretrained=False).eval()
    with torch.no_grad():
        out = model.encode_image(torch.randn(1, 3, 224, 224))
        text = model.encode_text_strings(["a photo of a dog."])
    assert out.assign.shape == (1, 8, 14, 14) and text.shape == (1, 256)
    assert out.group_emb.shape == (1, 8, 256)


def test_only_pooled_image_features_update_the_projector_batchnorm():
    """Group embeddings in training must not move the projector's running statistics (they are used at inference
    on groups, and were trained on pooled features only)."""
    torch.manual_seed(0)
    model = create_model("tiny", text_pretrained=False).train()
    images = torch.randn(4, 3, model.image_size, model.image_size)
    torch.manual_seed(1)  # the same Gumbel/drop-path draws in both passes
    feats = model.visual.forward_features(images)
    reference = copy.deepcopy(model.image_proj)
    reference(feats.groups.mean(dim=1).detach())  # what the pooled features alone do to the statistics
    before = model.image_proj.bn.running_mean.clone()
    torch.manual_seed(1)
    model._encode_image(images)
    assert not torch.equal(model.image_proj.bn.running_mean, before)
    torch.testing.assert_close(model.image_proj.bn.running_mean, reference.bn.running_mean)
    torch.testing.assert_close(model.image_proj.bn.running_var, reference.bn.running_var)
    assert model.image_proj.bn.training  # restored after the frozen pass


def test_entity_prompt_loss_trains_groups_image_and_text_projectors():
    torch.manual_seed(0)
    model = create_model("tiny", text_pretrained=False, entity_prompt_weight=0.5).train()
    classes = model.entity_classes
    assert len(classes) == 73 and "people" in classes
    # the prompts are buffers the checkpoint does not carry (rebuilt from the vocabulary)
    assert "entity_prompt_ids" not in model.state_dict()
    batch = make_batch(model)
    targets = torch.zeros(B, len(classes))
    for row, names in enumerate((["dog"], ["people", "bus"], ["car"], [])):
        for name in names:
            targets[row, classes.index(name)] = 1.0
    with pytest.raises(KeyError, match="entity_targets"):
        model.forward_train(batch, stage=1)
    out = model.forward_train({**batch, "entity_targets": targets}, stage=1)
    assert torch.allclose(out["loss"], out["itc"] + model.cfg.mec_weight * out["mec"] + 0.5 * out["entity"])
    model.zero_grad()
    out["entity"].backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert any(n.startswith("visual.") for n in grads)
    assert any(n.startswith("image_proj.") for n in grads) and any(n.startswith("text_proj.") for n in grads)
    assert not any(n.startswith("mec_head.") for n in grads)
    with pytest.raises(ValueError, match="entity_targets has 5 classes"):
        model.entity_loss(model.encode_image(batch["image"]), torch.zeros(B, 5), model.scale())



def test_unclaimed_group_term_adds_to_the_entity_loss_and_needs_it():
    torch.manual_seed(0)
    model = create_model("tiny", text_pretrained=False, entity_prompt_weight=1.0).eval()
    batch = make_batch(model)
    targets = torch.zeros(B, len(model.entity_classes))
    targets[0, model.entity_classes.index("dog")] = 1.0
    image_out = model.encode_image(batch["image"])
    plain = model.entity_loss(image_out, targets, model.scale())
    object.__setattr__(model.cfg, "unclaimed_group_weight", 2.0)
    with_term = model.entity_loss(image_out, targets, model.scale())
    group_log_probs = F.log_softmax(model.scale() * image_out.group_emb @ _prompt_embeddings(model).t(), dim=-1)
    expected = plain + 2.0 * unclaimed_group_loss(group_log_probs, targets)
    assert with_term > plain and torch.allclose(with_term, expected)
    with pytest.raises(ValueError, match="needs entity_prompt_weight"):
        create_model("tiny", text_pretrained=False, unclaimed_group_weight=1.0)



def test_colour_affinity_term_adds_to_the_loss_and_trains_the_assignment():
    torch.manual_seed(0)
    model = create_model("tiny", text_pretrained=False, colour_affinity_weight=0.5, patch_size=4, embed_dim=96,
                         num_heads=3)
    batch = make_batch(model)
    out = model.forward_train(batch, stage=1)
    expected = colour_affinity_loss(model.visual.forward_features(batch["image"]).grouping.soft_assign
                                    .reshape(B, -1, 16, 16), batch["image"], 0.6)
    assert torch.allclose(out["affinity"], expected, atol=1e-5)
    assert torch.allclose(out["loss"], out["itc"] + out["mec"] + 0.5 * out["affinity"])
    model.zero_grad()
    out["affinity"].backward()
    assign_grad = model.visual.grouping.assign.k_proj.weight.grad
    assert assign_grad is not None and assign_grad.abs().sum() > 0
    assert model.mec_head.parameters().__next__().grad is None  # only the image encoder's grouping path
    assert "affinity" not in create_model("tiny", text_pretrained=False).forward_train(make_batch(model), stage=1)
    with pytest.raises(ValueError, match="colour_affinity"):
        create_model("tiny", text_pretrained=False, colour_affinity_sigma=0.0)

def _prompt_embeddings(model):
    from ovseg_core.layers.mlp import batchnorm_frozen

    with torch.no_grad(), batchnorm_frozen(model.text_proj):
        states = model.text(model.entity_prompt_ids, model.entity_prompt_mask)[:, 0]
        return F.normalize(model.text_proj(states), dim=-1)


def test_entity_logit_adjustment_adds_the_log_prior_seen_in_training():
    torch.manual_seed(0)
    model = create_model("tiny", text_pretrained=False, entity_prompt_weight=1.0).train()
    model.text.eval()  # no dropout in the prompts, so the hand computation below sees the same ones
    classes = model.entity_classes
    targets = torch.zeros(B, len(classes))
    for row, name in enumerate(("people", "people", "people", "dog")):
        targets[row, classes.index(name)] = 1.0
    batch = make_batch(model)
    torch.manual_seed(3)
    image_out = model.encode_image(batch["image"])
    plain = model.entity_loss(image_out, targets, model.scale())
    assert model.entity_seen.sum() == 0  # off: nothing counted
    object.__setattr__(model.cfg, "entity_logit_adjust", 1.0)
    adjusted = model.entity_loss(image_out, targets, model.scale())
    counts = model.entity_seen.clone()
    assert counts[classes.index("people")] == 3 and counts[classes.index("dog")] == 1 and counts.sum() == 4
    prior = ((counts + 1) / (counts + 1).sum()).log().float()
    prompts = _prompt_embeddings(model)
    image_term = -(F.log_softmax(model.scale() * image_out.image_emb @ prompts.t() + prior, -1) * targets).sum(-1)
    logits = model.scale() * image_out.group_emb @ prompts.t()
    best = F.log_softmax(logits, -1).argmax(dim=1, keepdim=True)  # each class's most sure group, unadjusted
    group_term = -(F.log_softmax(logits + prior, -1).gather(1, best).squeeze(1) * targets).sum(-1)
    torch.testing.assert_close(adjusted, (0.5 * (image_term + group_term)).mean())
    assert adjusted != plain
    model.eval()
    model.entity_loss(image_out, targets, model.scale())
    torch.testing.assert_close(model.entity_seen, counts)  # eval calls read the counts without adding to them
    with pytest.raises(ValueError, match="needs entity_prompt_weight"):
        create_model("tiny", text_pretrained=False, entity_logit_adjust=1.0)
    with pytest.raises(ValueError, match="entity_logit_adjust must be >= 0"):
        create_model("tiny", text_pretrained=False, entity_prompt_weight=1.0, entity_logit_adjust=-1.0)


def test_conv_patch_embedding_option_trains_and_survives_a_checkpoint(tmp_path):
    from ovseg_core.models.checkpoint import load_model_from_checkpoint, save_checkpoint
    torch.manual_seed(0)
    model = create_model("tiny", text_pretrained=False, patch_size=4, embed_dim=96, num_heads=3, patch_embed="conv")
    assert isinstance(model.visual.patch_embed.proj, torch.nn.Sequential)
    assert isinstance(create_model("tiny", text_pretrained=False).visual.patch_embed.proj, torch.nn.Conv2d)
    model.train()
    out = model.forward_train(make_batch(model), stage=1)
    out["loss"].backward()
    stem = [p for n, p in model.named_parameters() if n.startswith("visual.patch_embed.proj.")]
    assert len(stem) == 8 and all(p.grad is not None and p.grad.abs().sum() > 0 for p in stem)
    model.eval()
    images = torch.randn(2, 3, 96, 64)  # sliding windows are larger than the training size
    path = save_checkpoint(tmp_path / "ckpt.pt", model=model, step=1, train_config={"preset": "tiny"})
    loaded = load_model_from_checkpoint(path)
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(images).assign, model.encode_image(images).assign)
    cfg = model.cfg
    for bad in ({"patch_size": 6, "image_size": 60, "embed_dim": 96}, {"embed_dim": 102, "num_heads": 3},
                {"patch_embed": "convnext"}, {"visual_init": str(path)}):
        with pytest.raises(ValueError, match="patch_embed"):
            dataclasses.replace(cfg, **bad)


def test_entity_counts_are_saved_with_the_weights_and_old_checkpoints_load_without_them():
    torch.manual_seed(0)
    model = create_model("tiny", text_pretrained=False, entity_prompt_weight=1.0, entity_logit_adjust=1.0).train()
    targets = torch.zeros(B, len(model.entity_classes))
    targets[:, model.entity_classes.index("dog")] = 1.0
    model.entity_loss(model.encode_image(make_batch(model)["image"]), targets, model.scale())
    state = model.state_dict()
    assert state["entity_seen"][model.entity_classes.index("dog")] == B  # a resumed run goes on counting from here
    fresh = create_model("tiny", text_pretrained=False, entity_prompt_weight=1.0, entity_logit_adjust=1.0)
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh.entity_seen, model.entity_seen)
    old = {k: v for k, v in state.items() if k != "entity_seen"}  # saved before the counts were
    fresh.load_state_dict(old)
    assert fresh.entity_seen.sum() == 0
