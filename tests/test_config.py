import pytest
import yaml

from cellmorph.config import Config, ConfigError, dump_config, load_config, parse_overrides


def test_defaults_load_and_demo_yaml_is_valid():
    assert isinstance(load_config(None), Config)
    cfg = load_config("configs/demo.yaml")
    assert cfg.name == "demo" and cfg.data.split == "grouped"
    for path in ("configs/cpjump1.yaml", "configs/cpjump1_cells.yaml"):
        load_config(path)


def test_overrides_are_typed_and_nested():
    cfg = load_config(
        "configs/demo.yaml", ["train.epochs=3", "loader.augment=[hflip]", "optim.lr=1e-4"]
    )
    assert cfg.train.epochs == 3
    assert cfg.loader.augment == ["hflip"]
    assert cfg.optim.lr == pytest.approx(1e-4)
    assert parse_overrides(["a.b.c=1"]) == {"a": {"b": {"c": 1}}}


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("train.epoch=3", "train.epoch: unknown key"),
        ("train.epochs=abc", "train.epochs"),
        ("train.epochs=0", "train.epochs"),
        ("data.split=random", "data.split"),
        ("loader.augment=[spin]", "loader.augment.0"),
        ("nosuchsection.x=1", "nosuchsection: unknown key"),
    ],
)
def test_bad_keys_and_types_are_named(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config("configs/demo.yaml", [override])


def test_unknown_key_in_yaml_is_named(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  epochs: 2\n  lerning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"train\.lerning_rate: unknown key"):
        load_config(p)


def test_malformed_override_and_missing_file():
    with pytest.raises(ConfigError, match="key.path=value"):
        load_config(None, ["train.epochs"])
    with pytest.raises(ConfigError, match="not found"):
        load_config("nope.yaml")


def test_config_is_frozen():
    cfg = load_config(None)
    with pytest.raises(Exception, match="frozen"):
        cfg.train.epochs = 9  # type: ignore[misc]


def test_dump_round_trip(tmp_path):
    cfg = load_config("configs/demo.yaml", ["train.epochs=2"])
    dump_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["train"]["epochs"] == 2


def test_rotation_whose_corners_reach_the_view_is_refused_naming_both_keys():
    # 10 degrees keep a central square of 1 / (cos 10 + sin 10) = 0.863 of the field.
    with pytest.raises(ConfigError, match=r"loader.rotate_degrees=10.*loader.view_fraction=1 "):
        load_config(None, ["loader.view_fraction=1.0"])
    load_config(None, ["loader.view_fraction=1.0", "loader.augment=[hflip,vflip,rot90]"])
    load_config(None, ["loader.view_fraction=0.86"])
    with pytest.raises(ConfigError, match=r"<= 0\.801"):
        load_config(None, ["loader.rotate_degrees=17", "loader.view_fraction=0.85"])
