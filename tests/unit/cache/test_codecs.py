"""Token codecs and lossless compressors: error against fp32 on teacher-like tokens, exact bit layouts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from umt_distill.cache.codecs import (
    COMPRESSORS,
    CodecError,
    bf16_bits_to_fp32,
    compress_bytes,
    decompress_bytes,
    fp32_to_bf16_bits,
    get_codec,
)
from umt_distill.registry import CODECS


def teacher_like_tokens(shape: tuple[int, ...], seed: int = 0, width_factor: int = 2) -> np.ndarray:
    """float32 tokens shaped like CLIP's ``ln_post`` -> ``proj`` output: heavy-tailed, with outliers.

    Hidden states are Student-t (df=3) before a LayerNorm whose gain has a few large "massive
    activation" channels, as CLIP ViTs have; a random projection to D then spreads them over every
    output channel, so tokens have a shared large component plus heavy-tailed detail.
    """
    rng = np.random.default_rng(seed)
    D = shape[-1]
    W = width_factor * D
    h = rng.standard_t(3, size=(*shape[:-1], W)).astype(np.float32)  # [..., W]
    h = (h - h.mean(-1, keepdims=True)) / np.sqrt(h.var(-1, keepdims=True) + 1e-5)
    gain = rng.uniform(0.5, 1.5, W).astype(np.float32)
    gain[rng.choice(W, 3, replace=False)] = [25.0, -18.0, 12.0]
    proj = (rng.standard_normal((W, D)) / np.sqrt(W)).astype(np.float32)
    return (h * gain) @ proj  # [..., D]


def tiny_teacher_tokens() -> np.ndarray:
    """Tokens of the tiny open_clip test teacher (random weights) on random frames: [K*T*N, D]."""
    from umt_distill.teachers.clip import ClipTeacher
    from umt_distill.teachers.configs import TINY_TEACHER, register_tiny_configs

    register_tiny_configs()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        teacher = ClipTeacher(TINY_TEACHER, pretrained=None, layers=3)
        frames = torch.randint(0, 256, (2, 4, 3, teacher.input_size, teacher.input_size), dtype=torch.uint8)
        out = teacher(frames)
    tokens = out.tokens.numpy()  # [B, K, T, N, D]
    return tokens.reshape(-1, tokens.shape[-1])


def codec_errors(codec: str, x: np.ndarray) -> dict[str, float]:
    """Elementwise relative error (values in the fp16 normal range) and per-token cosine vs fp32."""
    c = get_codec(codec)
    y = c.decode(c.encode(x))
    assert y.dtype == np.float32 and y.shape == x.shape
    normal = np.abs(x) >= 1e-4
    rel = np.abs(y - x)[normal] / np.abs(x)[normal]
    cos = (x * y).sum(-1) / (np.linalg.norm(x, axis=-1) * np.linalg.norm(y, axis=-1))
    return {"max_rel": float(rel.max()), "mean_cos": float(cos.mean()), "min_cos": float(cos.min()),
            "rel_l2": float(np.linalg.norm(y - x) / np.linalg.norm(x))}


@pytest.fixture(scope="module", params=["synthetic", "tiny_teacher"])
def tokens(request: pytest.FixtureRequest) -> np.ndarray:
    if request.param == "synthetic":
        return teacher_like_tokens((6, 4, 49, 512)).reshape(-1, 512)  # [K*T*N, D]
    return tiny_teacher_tokens()


def test_registry_lists_every_codec() -> None:
    assert {"fp32", "fp16", "bf16", "int8", "int4"} <= set(CODECS.names())
    for name in ("pca64", "pca128i4", "jpca768", "jpca1344i4"):  # a family: any rank by name
        assert name in CODECS and get_codec(name).name == name
    assert "pca<r>[i4], jpca<r>[i4]" in CODECS.describe()
    assert "pca7i4" not in CODECS and "pcax" not in CODECS
    with pytest.raises(KeyError, match="rank must be even"):
        get_codec("pca7i4")


def test_fp32_is_lossless(tokens: np.ndarray) -> None:
    c = get_codec("fp32")
    assert np.array_equal(c.decode(c.encode(tokens)), tokens)


def test_fp16_error(tokens: np.ndarray) -> None:
    err = codec_errors("fp16", tokens)
    assert err["max_rel"] <= 1e-3  # float16 has 11 significant bits: <= 2^-11 = 4.9e-4
    assert err["mean_cos"] >= 0.999999


def test_bf16_error(tokens: np.ndarray) -> None:
    err = codec_errors("bf16", tokens)
    assert err["max_rel"] <= 8e-3  # bfloat16 has 8 significant bits: <= 2^-8 = 3.9e-3
    assert err["mean_cos"] >= 0.9999


def test_int8_error(tokens: np.ndarray) -> None:
    err = codec_errors("int8", tokens)
    assert err["mean_cos"] >= 0.999
    assert err["min_cos"] >= 0.99


@pytest.mark.parametrize("codec", ["fp16", "bf16", "int8"])
def test_lossy_codecs_are_ordered_by_precision(codec: str) -> None:
    x = teacher_like_tokens((2, 4, 16, 256), seed=3)
    errs = {c: codec_errors(c, x)["rel_l2"] for c in ("fp16", "bf16", "int8")}
    assert errs["fp16"] < errs["bf16"] < errs["int8"] < 0.05
    assert errs[codec] > 0


def test_bf16_matches_torch_bit_for_bit() -> None:
    x = teacher_like_tokens((4, 64, 128), seed=1)
    # Ties (exactly half way between two bfloat16 values) with odd and even kept bits, large, tiny,
    # subnormal and negative-zero values.
    special = np.array([0x3F808000, 0x3F818000, 0x3F80FFFF, 0x00000001, 0x80000000, 0x7F7FFFFF, 0xC2F68000],
                       dtype=np.uint32).view(np.float32)
    for values in (x.ravel(), special):
        want = torch.from_numpy(values.copy()).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
        assert np.array_equal(fp32_to_bf16_bits(values), want)
        widened = torch.from_numpy(want.view(np.int16)).view(torch.bfloat16).float().numpy()
        assert np.array_equal(bf16_bits_to_fp32(want), widened)


def test_bf16_parts_are_uint16_bits() -> None:
    parts = get_codec("bf16").encode(np.array([[1.0, -2.0, 0.15625]], dtype=np.float32))
    assert parts["data"].dtype == np.uint16
    assert parts["data"].tolist() == [[0x3F80, 0xC000, 0x3E20]]


def test_int8_parts_and_zero_tokens() -> None:
    x = teacher_like_tokens((3, 5, 64), seed=2)
    x[1, 2] = 0.0  # an all-zero token must not divide by zero
    parts = get_codec("int8").encode(x)
    assert parts["q"].dtype == np.int8 and parts["q"].shape == x.shape
    assert parts["scale"].dtype == np.float32 and parts["scale"].shape == (3, 5, 1)
    assert np.abs(parts["q"]).max() == 127  # every non-zero token uses the full range
    assert parts["scale"][1, 2, 0] == 0 and not parts["q"][1, 2].any()
    y = get_codec("int8").decode(parts)
    assert np.isfinite(y).all() and not y[1, 2].any()
    np.testing.assert_allclose(parts["scale"][..., 0], np.abs(x).max(-1) / 127, rtol=1e-6)


def test_codecs_refuse_values_they_cannot_store() -> None:
    with pytest.raises(CodecError, match="float16 range"):
        get_codec("fp16").encode(np.array([1e5], dtype=np.float32))
    for name in ("fp32", "fp16", "bf16", "int8"):
        with pytest.raises(CodecError, match="NaN or inf"):
            get_codec(name).encode(np.array([1.0, np.nan], dtype=np.float32))
    with pytest.raises(CodecError, match="floating"):
        get_codec("fp32").encode(np.array([1, 2], dtype=np.int32))


@pytest.mark.parametrize("compressor", COMPRESSORS)
def test_compressors_round_trip(compressor: str) -> None:
    data = teacher_like_tokens((8, 32)).astype(np.float16).tobytes()
    packed = compress_bytes(compressor, data, itemsize=2)
    assert decompress_bytes(compressor, packed) == data
    if compressor == "zstd":
        assert packed[:4] == b"\x28\xb5\x2f\xfd"  # a standard zstd frame: `zstd -d` can read it


def test_unknown_compressor_is_named() -> None:
    with pytest.raises(ValueError, match="'lz5'"):
        compress_bytes("lz5", b"x")


@pytest.mark.parametrize("codec", ["fp32", "fp16", "bf16", "int8", "int4"])
def test_decode_torch_matches_numpy_decode_bit_for_bit(codec: str, tokens: np.ndarray) -> None:
    # The training step dequantises on the device from the stored parts; it must give exactly the
    # float32 targets the numpy reader gives (the path it replaces).
    c = get_codec(codec)
    parts = c.encode(tokens)
    want = c.decode(parts)
    got = c.decode_torch({k: torch.from_numpy(v) for k, v in parts.items()})
    assert got.dtype == torch.float32
    np.testing.assert_array_equal(got.numpy(), want)


# --------------------------------------------------------------------------------------------------
# int4


def test_int4_error(tokens: np.ndarray) -> None:
    # 15 levels per token: ~10x the int8 error, still a cosine near 0.99 on heavy-tailed tokens.
    err = codec_errors("int4", tokens)
    assert err["mean_cos"] >= 0.99
    assert err["min_cos"] >= 0.97
    assert err["rel_l2"] > codec_errors("int8", tokens)["rel_l2"]


def test_int4_packs_two_signed_nibbles_per_byte() -> None:
    x = np.array([[7.0, -7.0, 1.0, -1.0, 0.0, 3.0]], dtype=np.float32)  # max |x| = 7: scale 1
    parts = get_codec("int4").encode(x)
    assert parts["q"].dtype == np.uint8 and parts["q"].shape == (1, 3)
    # value 2i in the low nibble, 2i + 1 in the high one, two's complement: -7 = 0x9, -1 = 0xF
    assert parts["q"].tolist() == [[0x97, 0xF1, 0x30]]
    assert parts["scale"].tolist() == [[1.0]]
    np.testing.assert_array_equal(get_codec("int4").decode(parts), x)
    layout = get_codec("int4").part_layout((4, 6))
    assert layout == {"q": ("uint8", (4, 3)), "scale": ("float32", (4, 1))}
    assert get_codec("int4").nbytes((4, 6)) == 4 * 3 + 4 * 4


def test_int4_zero_tokens_and_odd_width() -> None:
    x = teacher_like_tokens((3, 64), seed=4)
    x[1] = 0.0
    parts = get_codec("int4").encode(x)
    assert parts["scale"][1, 0] == 0 and not parts["q"][1].any()
    y = get_codec("int4").decode(parts)
    assert np.isfinite(y).all() and not y[1].any()
    with pytest.raises(CodecError, match="must be even"):
        get_codec("int4").encode(np.ones((2, 5), dtype=np.float32))
    with pytest.raises(CodecError, match="NaN or inf"):
        get_codec("int4").encode(np.array([1.0, np.inf], dtype=np.float32))


# --------------------------------------------------------------------------------------------------
# pca<r>


def low_rank_tokens(K: int = 2, T: int = 3, N: int = 10, D: int = 48, rank: int = 8, seed: int = 0) -> np.ndarray:
    """Tokens [K, T, N, D] that lie (up to 1 % noise) in a rank-``rank`` affine subspace per layer."""
    rng = np.random.default_rng(seed)
    mean = rng.normal(0, 2, (K, 1, 1, D))
    dirs = rng.normal(0, 1, (K, rank, D)) * np.linspace(3, 0.5, rank)[None, :, None]
    coef = rng.normal(0, 1, (K, T, N, rank))
    x = mean + np.einsum("ktnr,krd->ktnd", coef, dirs) + rng.normal(0, 0.01, (K, T, N, D))
    return x.astype(np.float32)


def test_fit_basis_orders_whitened_directions() -> None:
    from umt_distill.cache.basis import fit_basis

    x = low_rank_tokens()  # [K, T, N, D]
    K, D = x.shape[0], x.shape[-1]
    basis = fit_basis(x.reshape(K, -1, D), 8)
    assert basis.dtype == np.float32 and basis.shape == (K, 9, D)
    np.testing.assert_allclose(basis[:, 0], x.reshape(K, -1, D).mean(1), atol=1e-5)
    norms = np.linalg.norm(basis[:, 1:], axis=-1)  # = standard deviation along each direction
    assert (np.diff(norms, axis=1) <= 1e-6).all()
    unit = basis[:, 1:] / norms[..., None]
    for k in range(K):  # orthonormal directions
        np.testing.assert_allclose(unit[k] @ unit[k].T, np.eye(8), atol=1e-5)
    # signs are fixed: refitting on the tokens in another order gives the same basis
    perm = np.random.default_rng(1).permutation(x.reshape(K, -1, D).shape[1])
    np.testing.assert_allclose(fit_basis(x.reshape(K, -1, D)[:, perm], 8), basis, rtol=1e-4, atol=1e-5)
    with pytest.raises(CodecError, match="below the teacher's D"):
        fit_basis(x.reshape(K, -1, D), D)


def test_pca_round_trip_on_low_rank_tokens() -> None:
    from umt_distill.cache.basis import fit_basis

    x = low_rank_tokens()
    K, D = x.shape[0], x.shape[-1]
    codec = get_codec("pca8").bind(fit_basis(x.reshape(K, -1, D), 8))
    parts = codec.encode(x)
    assert parts["q"].dtype == np.int8 and parts["q"].shape == (*x.shape[:-1], 8)
    assert parts["scale"].dtype == np.float32 and parts["scale"].shape == (*x.shape[:-1], 1)
    assert codec.part_layout(x.shape) == {"q": ("int8", (*x.shape[:-1], 8)), "scale": ("float32", (*x.shape[:-1], 1))}
    y = codec.decode(parts)
    assert y.dtype == np.float32 and y.shape == x.shape
    cos = (x * y).sum(-1) / (np.linalg.norm(x, axis=-1) * np.linalg.norm(y, axis=-1))
    assert cos.min() >= 0.9999
    # a leading axis (mode visible's masks, a batch) keeps the layer axis 4th from last
    y2 = codec.decode(codec.encode(np.stack([x, x])))
    np.testing.assert_allclose(y2[1], y, rtol=1e-6, atol=1e-6)
    # too few directions for the data: the error is the discarded variance, not a crash
    small = get_codec("pca4").bind(fit_basis(x.reshape(K, -1, D), 4))
    z = small.decode(small.encode(x))
    assert np.linalg.norm(z - x) > 10 * np.linalg.norm(y - x)


def test_pca_decode_torch_matches_numpy_decode() -> None:
    from umt_distill.cache.basis import fit_basis

    x = low_rank_tokens(seed=3)
    K, D = x.shape[0], x.shape[-1]
    codec = get_codec("pca8").bind(fit_basis(x.reshape(K, -1, D), 8))
    parts = codec.encode(np.stack([x, x[::-1]]))  # [B=2, K, T, N, D]
    want = codec.decode(parts)
    got = codec.decode_torch({k: torch.from_numpy(v) for k, v in parts.items()})
    assert got.dtype == torch.float32 and tuple(got.shape) == want.shape
    # the same float32 operations; only the matmul's summation order may differ between BLAS libraries
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))
    assert codec._device_basis  # the basis went to the device once and is reused
    again = codec.decode_torch({k: torch.from_numpy(v) for k, v in parts.items()})
    assert torch.equal(again, got)


def test_pca_without_basis_or_with_a_wrong_one_is_refused() -> None:
    from umt_distill.cache.basis import fit_basis

    x = low_rank_tokens()
    unbound = get_codec("pca8")
    assert unbound.needs_basis and not get_codec("int8").needs_basis
    with pytest.raises(CodecError, match="codec_for_store"):
        unbound.encode(x)
    with pytest.raises(CodecError, match="codec_for_store"):
        unbound.decode({"q": np.zeros((*x.shape[:-1], 8), np.int8), "scale": np.zeros((*x.shape[:-1], 1), np.float32)})
    basis = fit_basis(x.reshape(2, -1, 48), 8)
    with pytest.raises(CodecError, match=r"float32 \[K, 5, D\]"):
        get_codec("pca4").bind(basis)  # a rank-8 basis is not a rank-4 one
    codec = get_codec("pca8").bind(basis)
    with pytest.raises(CodecError, match="K=2"):
        codec.encode(x[:1])  # one layer, the basis has two
    with pytest.raises(CodecError, match="D=48"):
        codec.encode(np.ones((2, 3, 4, 32), np.float32))


@pytest.mark.parametrize("name", ["pca8", "pca8i4", "jpca16", "jpca16i4"])
def test_pca_variants_round_trip_and_decode_on_torch(name: str) -> None:
    from umt_distill.cache.basis import fit_basis

    x = low_rank_tokens(seed=5)  # [K=2, T, N, D=48], rank 8 per layer (16 jointly)
    K, D = x.shape[0], x.shape[-1]
    unbound = get_codec(name)
    codec = unbound.bind(fit_basis(x.reshape(K, -1, D), unbound.rank, unbound.joint))
    assert codec.basis.shape == codec.basis_shape(K, D)
    batch = np.stack([x, x[:, ::-1]])  # [B=2, K, T, N, D]
    parts = codec.encode(batch)
    assert {k: (str(v.dtype), v.shape) for k, v in parts.items()} == codec.part_layout(batch.shape)
    y = codec.decode(parts)
    assert y.dtype == np.float32 and y.shape == batch.shape and y.flags.c_contiguous
    cos = (batch * y).sum(-1) / (np.linalg.norm(batch, axis=-1) * np.linalg.norm(y, axis=-1))
    assert cos.mean() >= (0.9999 if unbound.bits == 8 else 0.995), cos.mean()  # int4: 15 levels per coefficient
    got = codec.decode_torch({k: torch.from_numpy(v) for k, v in parts.items()})
    np.testing.assert_allclose(got.numpy(), y, rtol=1e-5, atol=1e-5 * float(np.abs(y).max()))


def test_joint_basis_shares_coefficients_across_layers() -> None:
    from umt_distill.cache.basis import fit_basis

    x = low_rank_tokens(seed=6)
    K, D = x.shape[0], x.shape[-1]
    codec = get_codec("jpca16").bind(fit_basis(x.reshape(K, -1, D), 16, joint=True))
    parts = codec.encode(x)
    assert parts["q"].shape == (1, *x.shape[1:-1], 16)  # [1, T, N, r]: one code for all layers
    positions = int(np.prod(x.shape[1:-1]))  # T * N
    assert codec.nbytes(x.shape) == positions * (16 + 4)  # int8 coefficients + a float32 scale
    assert get_codec("pca16").nbytes(x.shape) == K * positions * (16 + 4)
    with pytest.raises(CodecError, match=r"\[17, K, D\]"):
        get_codec("jpca16").bind(fit_basis(x.reshape(K, -1, D), 16))  # a per-layer basis is not a joint one
    with pytest.raises(CodecError, match="below the teacher's K\\*D = 96"):
        fit_basis(x.reshape(K, -1, D), 96, joint=True)
