import pytest

from pipeline.config import DEFAULT_CONFIG, ConfigError, load_config


def test_demo_config_loads_with_typed_values():
    cfg = load_config(DEFAULT_CONFIG)
    assert cfg.name == "demo"
    assert cfg.download.source == "world"
    assert "coco" in cfg.download.datasets
    assert isinstance(cfg.download.timeout_s, float)


def test_override_sets_nested_value_with_yaml_typing():
    cfg = load_config(DEFAULT_CONFIG, ["download.timeout_s=2.5", "download.retries=0", "name=x"])
    assert cfg.download.timeout_s == 2.5
    assert cfg.download.retries == 0
    assert cfg.name == "x"


def test_unknown_key_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'download.timeout'"):
        load_config(DEFAULT_CONFIG, ["download.timeout=3"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: a\nfeatures_typo: {}\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown key 'features_typo'"):
        load_config(bad)


def test_wrong_type_and_range_are_named():
    with pytest.raises(ConfigError, match=r"download.retries: .*integer.*'many'"):
        load_config(DEFAULT_CONFIG, ["download.retries=many"])
    with pytest.raises(ConfigError, match=r"download.timeout_s: .*greater than 0"):
        load_config(DEFAULT_CONFIG, ["download.timeout_s=-1"])
    with pytest.raises(ConfigError, match=r"download.source: "):
        load_config(DEFAULT_CONFIG, ["download.source=ftp"])


def test_errors_are_one_line(tmp_path):
    bad = tmp_path / "broken.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError) as err:
        load_config(bad)
    assert "\n" not in str(err.value) and "broken.yaml: line" in str(err.value)
    with pytest.raises(ConfigError, match="expected key.sub=value"):
        load_config(DEFAULT_CONFIG, ["novalue"])
    with pytest.raises(ConfigError, match="name is not a section"):
        load_config(DEFAULT_CONFIG, ["name.x=1"])
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.yaml")


def test_subset_is_what_a_stage_reads():
    cfg = load_config(DEFAULT_CONFIG, ["download.retries=7"])
    sub = cfg.subset(("download.retries", "world"))
    assert sub["download.retries"] == 7 and isinstance(sub["world"], dict)


def test_base_inheritance_merges_sections(tmp_path):
    from pipeline.config import REPO_ROOT

    cfg = load_config(REPO_ROOT / "configs" / "tiny.yaml")
    assert cfg.name == "tiny" and cfg.world.sizes.vg == 30
    assert cfg.download.timeout_s == 1.0 and "coco" in cfg.download.datasets  # inherited from demo.yaml
    loop = tmp_path / "a.yaml"
    loop.write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="loops back"):
        load_config(loop)
