"""ClipTeacher against open_clip itself: tiny real open_clip models, no network, no mocks.

References are computed independently of the teacher's block walk: forward hooks on open_clip's own
forward (`encode_image`) for tokens, `nn.MultiheadAttention(need_weights=True)` or open_clip's explicit
softmax path for the attention, and open_clip's `encode_image` for the pooled embedding.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from umt_distill.registry import TEACHERS
from umt_distill.teachers.clip import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ClipTeacher,
    TeacherError,
    legacy_pool,
    select_layer_indices,
)
from umt_distill.teachers.configs import (
    TINY_CONFIGS,
    TINY_TEACHER,
    TINY_TEACHER_P14,
    register_model_config,
    register_tiny_configs,
)

register_tiny_configs()


def make_clip(name: str, seed: int = 1) -> torch.nn.Module:
    """A full open_clip CLIP (both towers) with seeded random weights, in eval mode."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.create_model(name, pretrained=None)
    return model.eval()


def make_frames(batch: int, time: int, size: tuple[int, int], seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, time, 3, *size), dtype=torch.uint8, generator=gen)  # [B, T, 3, H, W]


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    """The tiny CLIP and a file holding its full (both towers) open_clip state dict."""
    model = make_clip(TINY_TEACHER)
    path = tmp_path_factory.mktemp("weights") / "tiny_clip.pt"
    torch.save(model.state_dict(), path)
    return model, path


@pytest.fixture(scope="module")
def teacher(tiny_clip: tuple[torch.nn.Module, Path]) -> ClipTeacher:
    return ClipTeacher(TINY_TEACHER, pretrained=str(tiny_clip[1]), layers=3)


def hooked_block_outputs(visual: torch.nn.Module, pixels: torch.Tensor, encode) -> dict[int, torch.Tensor]:
    """Outputs of every block during open_clip's own forward, batch first ``[F, 1+N, C]``."""
    outputs: dict[int, torch.Tensor] = {}
    batch_first = getattr(visual.transformer, "batch_first", False)
    handles = [
        block.register_forward_hook(
            lambda mod, args, out, i=i: outputs.__setitem__(i, out if batch_first else out.transpose(0, 1))
        )
        for i, block in enumerate(visual.transformer.resblocks)
    ]
    try:
        with torch.no_grad():
            encode(pixels)
    finally:
        for handle in handles:
            handle.remove()
    return outputs


def last_block_input(visual: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    captured = {}
    block = visual.transformer.resblocks[-1]
    handle = block.register_forward_pre_hook(lambda mod, args: captured.setdefault("x", args[0]))
    try:
        with torch.no_grad():
            visual(pixels)
    finally:
        handle.remove()
    x = captured["x"]
    return x if getattr(visual.transformer, "batch_first", False) else x.transpose(0, 1)  # [F, 1+N, C]


# ----------------------------------------------------------------------------------------- outputs


@pytest.mark.parametrize("size", [(64, 64), (48, 80)], ids=["native", "resized"])
def test_pooled_equals_open_clip_encode_image(teacher, tiny_clip, size):
    model, _ = tiny_clip
    frames = make_frames(2, 3, size)
    out = teacher(frames)
    assert out.pooled.shape == (2, 3, 32) and out.pooled.dtype == torch.float32
    pixels = teacher.preprocess(frames)  # [6, 3, 64, 64]
    with torch.no_grad():
        reference = model.encode_image(pixels)  # [6, 32]
    assert (out.pooled.reshape(6, 32) - reference).abs().max().item() <= 1e-5


def test_tokens_are_last_k_blocks_ascending_after_ln_post_and_proj(teacher, tiny_clip):
    model, _ = tiny_clip
    assert teacher.layer_indices == [1, 2, 3]
    frames = make_frames(2, 3, (64, 64), seed=3)
    out = teacher(frames)
    assert out.tokens.shape == (2, 3, 3, 16, 32)  # [B, K, T, N, D]
    pixels = teacher.preprocess(frames)
    outputs = hooked_block_outputs(model.visual, pixels, model.encode_image)
    visual = model.visual
    for k, block in enumerate([1, 2, 3]):
        with torch.no_grad():
            reference = visual.ln_post(outputs[block][:, 1:]) @ visual.proj  # [6, N, D]
        got = out.tokens[:, k].reshape(6, 16, 32)
        assert (got - reference).abs().max().item() <= 1e-5, f"block {block}"
    # distinct layers really differ (the ordering check above would be vacuous otherwise)
    assert not torch.allclose(out.tokens[:, 0], out.tokens[:, 2])


@pytest.mark.parametrize(
    ("layers", "interval", "expected"),
    [(2, 2, [1, 3]), (3, 1.5, [0, 2, 3]), (1, 1, [3]), (4, 1, [0, 1, 2, 3])],
)
def test_layer_interval_selects_blocks(tiny_clip, layers, interval, expected):
    model, path = tiny_clip
    teacher = ClipTeacher(TINY_TEACHER, pretrained=str(path), layers=layers, layer_interval=interval)
    assert teacher.layer_indices == expected
    assert teacher.describe()["layer_indices"] == expected
    frames = make_frames(1, 2, (64, 64), seed=4)
    out = teacher(frames)
    assert out.tokens.shape[1] == layers
    outputs = hooked_block_outputs(model.visual, teacher.preprocess(frames), model.encode_image)
    for k, block in enumerate(expected):
        with torch.no_grad():
            reference = model.visual.ln_post(outputs[block][:, 1:]) @ model.visual.proj
        assert (out.tokens[0, k] - reference).abs().max().item() <= 1e-5


def test_layer_selection_rejects_impossible_requests():
    assert select_layer_indices(12, 6, 1) == [6, 7, 8, 9, 10, 11]  # UMT ViT-B/16
    assert select_layer_indices(24, 6, 1) == list(range(18, 24))  # UMT ViT-L/14
    with pytest.raises(TeacherError, match="distinct blocks"):
        select_layer_indices(4, 6, 1)
    with pytest.raises(TeacherError, match="distinct blocks"):
        select_layer_indices(12, 3, 0.5)  # int(0.5) == int(0): block 11 twice
    with pytest.raises(TeacherError, match=">= 1"):
        select_layer_indices(12, 0)


def test_attention_equals_multihead_attention_weights(teacher, tiny_clip):
    model, _ = tiny_clip
    frames = make_frames(2, 2, (64, 64), seed=5)
    out = teacher(frames)
    assert out.attn.shape == (2, 2, 16)
    x = last_block_input(model.visual, teacher.preprocess(frames))  # [4, 17, C]
    block = model.visual.transformer.resblocks[-1]
    mha = block.attn
    with torch.no_grad():
        h = block.ln_1(x)
        if not mha.batch_first:
            h = h.transpose(0, 1)
        _, weights = mha(h, h, h, need_weights=True, average_attn_weights=True)  # [4, 17, 17]
    reference = weights[:, 0, 1:]  # CLS query over the patch keys
    assert (out.attn.reshape(4, 16) - reference).abs().max().item() <= 1e-6
    assert (out.attn >= 0).all()
    sums = out.attn.sum(-1)
    assert (sums < 1).all() and (sums > 0.5).all()


def test_model_config_json_with_qk_norm_attention_blocks(tmp_path, monkeypatch):
    """A JSON config (open_clip format) is registered at runtime; open_clip's custom Attention works."""
    config = json.loads(json.dumps(TINY_CONFIGS[TINY_TEACHER]))
    config["vision_cfg"]["qk_norm"] = True  # CustomResidualAttentionBlock with LayerNorm on q and k
    path = tmp_path / "custom.json"
    path.write_text(json.dumps(config))
    name = "umt-test-json-qk-norm"
    teacher = ClipTeacher(name, model_config=str(path), layers=2)
    assert name in open_clip.list_models()
    assert teacher.describe()["model_config"] == str(path)

    frames = make_frames(1, 2, (64, 64), seed=6)
    out = teacher(frames)
    pixels = teacher.preprocess(frames)
    with torch.no_grad():
        assert (out.pooled[0] - teacher.visual(pixels)).abs().max().item() <= 1e-5

    # reference: the q and k open_clip's own block hands to SDPA, turned into explicit probabilities
    recorded = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        recorded.append((q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(dim=-1))  # [F, H, L, L]
        return sdpa(q, k, v, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    with torch.no_grad():
        teacher.visual(pixels)
    monkeypatch.undo()
    assert len(recorded) == 4  # one per block
    reference = recorded[-1].mean(dim=1)[:, 0, 1:]  # last block, head average, CLS row, patch keys
    assert (out.attn[0] - reference).abs().max().item() <= 1e-6


def test_scaled_cosine_attention_is_rejected(tmp_path):
    config = json.loads(json.dumps(TINY_CONFIGS[TINY_TEACHER]))
    config["vision_cfg"]["scaled_cosine_attn"] = True
    path = tmp_path / "cosine.json"
    path.write_text(json.dumps(config))
    with pytest.raises(TeacherError, match="scaled_cosine_attn"):
        ClipTeacher("umt-test-json-cosine", model_config=str(path), layers=1)


@pytest.mark.parametrize("pooling", [{"pool_type": "avg"}, {"final_ln_after_pool": True}])
def test_other_open_clip_poolings_match(tmp_path, pooling):
    config = json.loads(json.dumps(TINY_CONFIGS[TINY_TEACHER]))
    config["vision_cfg"].update(pooling)
    path = tmp_path / "pool.json"
    path.write_text(json.dumps(config))
    teacher = ClipTeacher(f"umt-test-json-{next(iter(pooling))}", model_config=str(path), layers=1)
    frames = make_frames(1, 2, (64, 64), seed=7)
    out = teacher(frames)
    pixels = teacher.preprocess(frames)
    with torch.no_grad():
        assert (out.pooled[0] - teacher.visual(pixels)).abs().max().item() <= 1e-5
        # the fallback kept for open_clip < 3.0 agrees with the tower's own _pool
        x = last_block_input(teacher.visual, pixels)
        final = teacher.visual.transformer.resblocks[-1](x)
        assert torch.allclose(legacy_pool(teacher.visual, final), teacher.visual._pool(final)[0])


# ---------------------------------------------------------------------------------- preprocessing


@pytest.mark.parametrize("size", [(64, 64), (40, 72)])
def test_clip_and_imagenet_normalisation_match_hand_computation(tiny_clip, size):
    _, path = tiny_clip
    clip_norm = ClipTeacher(TINY_TEACHER, pretrained=str(path), layers=1, normalize="clip")
    imagenet = ClipTeacher(TINY_TEACHER, pretrained=str(path), layers=1, normalize="imagenet")
    assert clip_norm.mean == open_clip.OPENAI_DATASET_MEAN and clip_norm.std == open_clip.OPENAI_DATASET_STD
    assert imagenet.mean == IMAGENET_MEAN and imagenet.std == IMAGENET_STD
    frames = make_frames(1, 2, size, seed=8)
    pixels = frames.reshape(2, 3, *size).float() / 255
    if size != (64, 64):
        pixels = F.interpolate(pixels, size=(64, 64), mode="bicubic", align_corners=False)
    for teacher, (mean, std) in [
        (clip_norm, ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))),
        (imagenet, ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))),
    ]:
        hand = (pixels - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
        assert (teacher.preprocess(frames) - hand).abs().max().item() <= 1e-5
    assert not torch.allclose(clip_norm(frames).pooled, imagenet(frames).pooled)
    assert clip_norm.describe()["normalize"] == "clip" and imagenet.describe()["mean"] == list(IMAGENET_MEAN)


def test_rejects_frames_that_are_not_uint8_views(teacher):
    with pytest.raises(ValueError, match=r"uint8 frames \[B, T, 3, H, W\]"):
        teacher(torch.zeros(1, 2, 3, 64, 64))
    with pytest.raises(ValueError, match="uint8 frames"):
        teacher(torch.zeros(2, 3, 64, 64, dtype=torch.uint8))


# ------------------------------------------------------------------------- resolution and weights


@pytest.fixture(scope="module")
def p14_clip(tmp_path_factory) -> tuple[torch.nn.Module, Path]:
    model = make_clip(TINY_TEACHER_P14, seed=2)
    path = tmp_path_factory.mktemp("weights") / "p14.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return model, path


def test_positional_embedding_interpolated_like_umt_l(p14_clip):
    """The tiny L/14 teacher at 56 px (4x4) run at 42 px (3x3) mirrors CLIP-L/14 224 -> 196."""
    model, path = p14_clip
    native = ClipTeacher(TINY_TEACHER_P14, pretrained=str(path), layers=2)
    assert native.input_size == 56 and native.grid == (4, 4)
    teacher = ClipTeacher(TINY_TEACHER_P14, pretrained=str(path), layers=2, input_size=42)
    original = model.visual.positional_embedding.detach()  # [17, 64]
    table = teacher.visual.positional_embedding.detach()
    assert table.shape == (10, 64)
    assert torch.equal(table[0], original[0])  # CLS row kept
    grid = original[1:].reshape(1, 4, 4, 64).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(3, 3), mode="bicubic", align_corners=False)
    assert torch.allclose(table[1:], expected.permute(0, 2, 3, 1).reshape(9, 64), atol=1e-7)
    assert not table.requires_grad
    assert teacher.grid == (3, 3) and teacher.num_patches == 9 and teacher.input_size == 42
    assert tuple(teacher.visual.grid_size) == (3, 3) and tuple(teacher.visual.image_size) == (42, 42)
    assert teacher.describe()["grid"] == [3, 3] and teacher.describe()["N"] == 9

    frames = make_frames(2, 2, (56, 56), seed=9)  # the view is resized to the teacher's 42 px
    out = teacher(frames)
    assert out.tokens.shape == (2, 2, 2, 9, 32) and out.attn.shape == (2, 2, 9)
    pixels = teacher.preprocess(frames)
    assert pixels.shape == (4, 3, 42, 42)
    with torch.no_grad():
        reference = teacher.visual(pixels)  # open_clip's own forward at the new size
    assert (out.pooled.reshape(4, 32) - reference).abs().max().item() <= 1e-5


def test_input_size_must_be_a_multiple_of_the_patch(p14_clip):
    with pytest.raises(TeacherError, match="multiple of the patch size"):
        ClipTeacher(TINY_TEACHER_P14, pretrained=str(p14_clip[1]), layers=1, input_size=40)


@pytest.mark.parametrize("fmt", ["pt", "safetensors", "umt_conv3d"])
def test_local_weights_file_round_trip(teacher, tmp_path, fmt):
    """Visual-only state dicts (UMT's teacher file layout, also with its Conv3d stem) load back exactly."""
    state = {k: v.clone().contiguous() for k, v in teacher.visual.state_dict().items()}
    if fmt == "umt_conv3d":
        state["conv1.weight"] = state["conv1.weight"].unsqueeze(2)  # [C, 3, 1, p, p]
    path = tmp_path / ("visual.safetensors" if fmt == "safetensors" else "visual.pth")
    save_file(state, str(path)) if fmt == "safetensors" else torch.save(state, path)
    loaded = ClipTeacher(TINY_TEACHER, pretrained=str(path), layers=3)
    assert loaded.weights_digest == teacher.weights_digest
    frames = make_frames(1, 2, (64, 64), seed=10)
    a, b = teacher(frames), loaded(frames)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.attn, b.attn) and torch.equal(a.pooled, b.pooled)


def test_weights_at_another_resolution_are_adopted_then_interpolated_once(p14_clip, tmp_path):
    _, path = p14_clip
    at_42 = ClipTeacher(TINY_TEACHER_P14, pretrained=str(path), layers=2, input_size=42)
    saved = tmp_path / "p14_at_42.pt"
    torch.save(at_42.visual.state_dict(), saved)  # 3x3 table in a file for the 4x4 config
    reloaded = ClipTeacher(TINY_TEACHER_P14, pretrained=str(saved), layers=2)
    assert reloaded.input_size == 42 and reloaded.grid == (3, 3)
    assert reloaded.weights_digest == at_42.weights_digest
    frames = make_frames(1, 2, (42, 42), seed=11)
    assert torch.equal(reloaded(frames).tokens, at_42(frames).tokens)


def test_weights_digest_tracks_weights_and_random_init_is_deterministic(teacher):
    state = torch.get_rng_state()
    first = ClipTeacher(TINY_TEACHER, layers=1)
    second = ClipTeacher(TINY_TEACHER, layers=1)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is untouched
    assert first.weights_digest == second.weights_digest
    assert len(first.weights_digest) == 64 and first.weights_digest != teacher.weights_digest
    description = first.describe()
    assert json.loads(json.dumps(description)) == description
    assert {"name", "pretrained", "layers", "layer_indices", "input_size", "normalize", "mean", "std",
            "interpolation", "weights_digest", "D", "N", "grid"} <= set(description)


def test_teacher_is_frozen(teacher):
    assert not teacher.training and not teacher.visual.training
    assert all(not p.requires_grad for p in teacher.parameters())
    teacher.train()
    assert not teacher.training and not any(m.training for m in teacher.modules())
    out = teacher(make_frames(1, 2, (64, 64)))
    for tensor in (out.tokens, out.attn, out.pooled):
        assert not tensor.requires_grad
        assert not tensor.is_inference()  # usable next to autograd tensors in online training


def test_registered_as_open_clip():
    assert TEACHERS.get("open_clip") is ClipTeacher


def test_precision_falls_back_to_fp32_off_cuda(tiny_clip):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        teacher = ClipTeacher(TINY_TEACHER, pretrained=str(tiny_clip[1]), layers=1, precision="bf16")
    assert any("runs in fp32" in str(w.message) for w in caught)
    assert teacher.precision == "fp32" and teacher.describe()["precision"] == "fp32"
    with pytest.raises(TeacherError, match="precision"):
        ClipTeacher(TINY_TEACHER, layers=1, precision="fp8")


# ------------------------------------------------------------------------------------------ errors


def test_unknown_model_name_lists_close_names():
    with pytest.raises(TeacherError, match=r"unknown open_clip model 'ViT-B-61'.*'ViT-B-16'"):
        ClipTeacher("ViT-B-61")
    with pytest.raises(TeacherError, match="unknown open_clip model"):
        ClipTeacher("ViT-B-61", pretrained="openai")  # caught before any download


def test_missing_weights_file_and_unknown_tag(tmp_path):
    missing = tmp_path / "nope" / "vit_b16.pth"
    with pytest.raises(FileNotFoundError, match="vit_b16.pth"):
        ClipTeacher(TINY_TEACHER, pretrained=str(missing))
    with pytest.raises(TeacherError, match=r"not-a-tag.*tags: .*openai"):
        ClipTeacher("ViT-B-16", pretrained="not-a-tag")  # tag lookup only: no network


def test_weights_that_do_not_fit_the_model_name_the_file(p14_clip):
    with pytest.raises(TeacherError, match=r"p14\.safetensors: weights do not fit"):
        ClipTeacher(TINY_TEACHER, pretrained=str(p14_clip[1]))


def test_config_registration_refuses_to_shadow_a_different_model(tmp_path):
    with pytest.raises(ValueError, match="already registered"):
        register_model_config("ViT-B-16", TINY_CONFIGS[TINY_TEACHER])
    register_tiny_configs()  # idempotent
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"embed_dim": 8}))
    with pytest.raises(ValueError, match=r"bad\.json.*vision_cfg"):
        ClipTeacher("umt-test-bad", model_config=str(bad))


def test_tiny_teachers_register_themselves_on_first_use():
    open_clip.factory._MODEL_CONFIGS.pop(TINY_TEACHER, None)
    assert TINY_TEACHER not in open_clip.list_models()
    teacher = ClipTeacher(TINY_TEACHER, layers=1)  # e.g. named by a recipe in a fresh process
    assert TINY_TEACHER in open_clip.list_models() and teacher.grid == (4, 4)


# A GELU twin of the tiny teacher: what open_clip's plain "ViT-B-16" config is to OpenAI's weights.
TINY_GELU = "umt-test-tiny-gelu"


def _quick_gelu_blocks(visual: torch.nn.Module) -> list[bool]:
    return [isinstance(block.mlp.gelu, open_clip.transformer.QuickGELU) for block in visual.transformer.resblocks]


def test_openai_visual_file_with_a_gelu_config_runs_quick_gelu(teacher, tmp_path):
    """UMT's vit_b16.pth (OpenAI's visual tower, QuickGELU) named with a GELU config must not run GELU."""
    register_model_config(TINY_GELU, {**TINY_CONFIGS[TINY_TEACHER], "quick_gelu": False})
    state = {k: v.clone().contiguous() for k, v in teacher.visual.state_dict().items()}  # visual-only layout
    path = tmp_path / "vit_tiny.pth"
    torch.save(state, path)
    with pytest.warns(UserWarning, match=f"QuickGELU.*{TINY_GELU}-quickgelu"):
        loaded = ClipTeacher(TINY_GELU, pretrained=str(path), layers=3)
    assert all(_quick_gelu_blocks(loaded.visual))
    frames = make_frames(1, 2, (64, 64), seed=11)
    a, b = teacher(frames), loaded(frames)  # the QuickGELU reference with the same weights
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.attn, b.attn) and torch.equal(a.pooled, b.pooled)


def test_full_checkpoint_keeps_the_configs_activation(tmp_path):
    """A full open_clip checkpoint ('visual.' prefix) may be GELU-trained: the config decides, silently."""
    register_model_config(TINY_GELU, {**TINY_CONFIGS[TINY_TEACHER], "quick_gelu": False})
    path = tmp_path / "full.pt"
    torch.save(make_clip(TINY_GELU).state_dict(), path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = ClipTeacher(TINY_GELU, pretrained=str(path), layers=1)
    assert not any(_quick_gelu_blocks(loaded.visual))


def test_default_normalization_is_umts_imagenet(tiny_clip):
    teacher = ClipTeacher(TINY_TEACHER, pretrained=str(tiny_clip[1]), layers=1)
    assert teacher.normalize == "imagenet" and teacher.mean == IMAGENET_MEAN and teacher.std == IMAGENET_STD
    from umt_distill.config import TeacherConfig

    assert TeacherConfig().normalize == teacher.normalize  # recipes and the class agree


def test_model_config_under_a_builtin_name_names_the_fix(tmp_path):
    path = tmp_path / "my_vit.json"
    path.write_text(json.dumps(TINY_CONFIGS[TINY_TEACHER]))
    with pytest.raises(TeacherError, match="teacher.name=my_vit"):
        ClipTeacher("ViT-B-16", model_config=str(path), layers=1)  # TeacherConfig's default name
    assert ClipTeacher("my_vit", model_config=str(path), layers=1).name == "my_vit"
