"""Recipes: strict keys and types, overrides, every shipped YAML loads."""

from __future__ import annotations

import pytest

from umt_distill.config import (
    Recipe,
    RecipeError,
    check_parts,
    list_recipe_files,
    load_recipe,
    parse_override,
    recipe_to_yaml,
)


def test_defaults_are_umt_b16_settings() -> None:
    r = load_recipe(None)
    assert r.views.num_frames == 8 and r.views.size == 224
    assert r.views.scales == (1.0, 0.875, 0.75, 0.66)
    assert r.teacher.layers == 6 and r.teacher.normalize == "imagenet"
    assert r.mask.ratio == 0.8 and r.optim.betas == (0.9, 0.95)


def test_overrides_parse_yaml_values() -> None:
    r = load_recipe(None, ["cache.codec=int8", "optim.betas=[0.9, 0.99]", "train.max_steps=30", "teacher.pretrained=null"])
    assert r.cache.codec == "int8"
    assert r.optim.betas == (0.9, 0.99)
    assert r.train.max_steps == 30
    assert r.teacher.pretrained is None


@pytest.mark.parametrize(
    "override, needle",
    [
        ("cache.codek=int8", "unknown key 'cache.codek' (did you mean 'cache.codec'?)"),
        ("cahce.codec=int8", "unknown key 'cahce' (did you mean 'cache'?)"),
        ("train.epochs=1.5", "train.epochs"),
        ("cache.num_views=four", "cache.num_views"),
        ("teacher.normalize=imagenett", "teacher.normalize"),
        ("mask.ratio=1.2", "mask.ratio"),
        ("seed.x=1", "seed: "),
        ("nonsense", "key=value"),
    ],
)
def test_bad_overrides_name_the_key(override: str, needle: str) -> None:
    with pytest.raises(RecipeError) as info:
        load_recipe(None, [override])
    assert needle in str(info.value)


def test_numbers_are_not_coerced_from_strings() -> None:
    with pytest.raises(RecipeError, match="optim.lr"):
        load_recipe(None, ["optim.lr='1e-3'"])


def test_unknown_key_in_file_names_the_file(tmp_path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text("cache:\n  num_view: 3\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert str(path) in str(info.value) and "cache.num_views" in str(info.value)


def test_frames_in_both_layouts() -> None:
    for layout in ("zarr", "wds"):
        for frames in ("raw", "jpeg"):
            assert load_recipe(None, [f"cache.frames={frames}", f"cache.layout={layout}"]).cache.frames == frames
    with pytest.raises(RecipeError, match="cache.frames"):
        load_recipe(None, ["cache.frames=png"])


def test_round_trip_through_yaml(tmp_path) -> None:
    r = load_recipe(None, ["cache.codec=bf16", "views.scales=[1, 0.5]"])
    path = tmp_path / "r.yaml"
    path.write_text(recipe_to_yaml(r))
    assert load_recipe(path) == r


def test_parse_override_splits_on_first_equals() -> None:
    assert parse_override("corpus.source=a=b.csv") == (["corpus", "source"], "a=b.csv")


@pytest.mark.parametrize("path", list_recipe_files(), ids=lambda p: p.stem)
def test_every_shipped_recipe_loads(path) -> None:
    recipe = load_recipe(path)
    assert isinstance(recipe, Recipe)
    check_parts(recipe)
    assert path.read_text().startswith("#"), "each recipe starts with a header comment"


def test_shipped_recipes_exist() -> None:
    names = {p.stem for p in list_recipe_files()}
    assert {"b16_k710", "l16_k710", "tiny"} <= names


def test_unknown_part_names_are_rejected() -> None:
    from umt_distill.registry import CODECS, load_all_parts

    load_all_parts()
    if not CODECS.names():
        pytest.skip("codecs not registered in this build")
    with pytest.raises(RecipeError, match="cache.codec"):
        check_parts(load_recipe(None, ["cache.codec=fp17"]))


def test_scientific_notation_is_a_number_in_overrides_and_files(tmp_path) -> None:
    from umt_distill.config import load_recipe, parse_override

    assert parse_override("optim.lr=5e-3") == (["optim", "lr"], 0.005)  # YAML 1.1 would read a string
    assert parse_override("corpus.source=1e") == (["corpus", "source"], "1e")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("optim:\n  lr: 3e-4\n  min_lr: 1E-6\n")
    cfg = load_recipe(str(recipe))
    assert cfg.optim.lr == 3e-4 and cfg.optim.min_lr == 1e-6


def test_the_catalog_holds_what_the_registries_hold() -> None:
    from umt_distill.registry import ALL_REGISTRIES, CATALOG, load_all_parts

    load_all_parts()
    for kind, registry in ALL_REGISTRIES.items():
        families = tuple((p.pattern, label) for p, label, _, _ in registry._families)
        assert CATALOG[kind] == (tuple(registry.names()), families), f"registry.CATALOG[{kind!r}] is stale"


def test_a_family_name_passes_the_catalog_and_a_typo_is_named() -> None:
    check_parts(load_recipe(None, ["cache.codec=jpca64i4"]))
    with pytest.raises(RecipeError, match=r"mask.type: unknown mask 'semantc'. Did you mean 'semantic'"):
        check_parts(load_recipe(None, ["mask.type=semantc"]))


def test_validate_does_not_import_torch() -> None:
    import subprocess
    import sys

    code = ("import sys\nfrom umt_distill.cli import app\n"
            "try:\n    app(['validate', 'stage1/tiny', 'cache.codec=int8'], standalone_mode=False)\n"
            "except SystemExit:\n    pass\n"
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'open_clip', 'zarr', 'av'))\n"
            "assert not heavy, heavy[:5]\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-1000:]
    assert "codec: int8" in done.stdout


@pytest.mark.parametrize("text", [
    # 9 ** 4 strings from 40 lines: refused before anything is expanded
    'a: &a ["x","x","x","x","x","x","x","x","x"]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\n'
    'c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]\nd: [*c,*c,*c,*c,*c,*c,*c,*c,*c]\n',
    "train: &t\n  epochs: *t\n",  # an alias inside its own anchor
], ids=["nested", "recursive"])
def test_yaml_aliases_are_refused_in_one_line_naming_the_file_and_line(tmp_path, text) -> None:
    import subprocess
    import sys

    recipe = tmp_path / "r.yaml"
    recipe.write_text(text)
    done = subprocess.run([sys.executable, "-m", "umt_distill", "validate", str(recipe)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert f"cannot read recipe {recipe}: line 2: YAML aliases" in done.stderr
    assert "write the value out instead" in done.stderr
