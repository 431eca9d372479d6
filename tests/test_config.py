import pytest

from pipeline.config import DEFAULT_CONFIG, ConfigError, PipelineConfig, load_config


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
    # "-<path>" leaves out a part of a section it reads; under an unset section there is nothing to leave out
    without = cfg.subset(("download", "-download.retries", "sweep.study", "-sweep.study.downstream"))
    assert "retries" not in without["download"] and without["download"]["shard_size"] == \
        cfg.download.shard_size
    assert "downstream" not in without["sweep.study"] and without["sweep.study"]["name"] == "demo"
    unset = load_config(DEFAULT_CONFIG, ["sweep.study=null"])
    assert unset.subset(("sweep.study", "-sweep.study.downstream")) == {"sweep.study": None}
    with pytest.raises(ValueError, match=r"config path -eval.common: no earlier path holds it"):
        cfg.subset(("download", "-eval.common"))


def test_base_inheritance_merges_sections(tmp_path):
    from pipeline.config import REPO_ROOT

    cfg = load_config(REPO_ROOT / "configs" / "tiny.yaml")
    assert cfg.name == "tiny" and cfg.world.sizes.vg == 30
    assert cfg.download.timeout_s == 1.0 and "coco" in cfg.download.datasets  # inherited from demo.yaml
    loop = tmp_path / "a.yaml"
    loop.write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="loops back"):
        load_config(loop)


def test_in_domain_config_pretrains_on_coco_and_vg_with_uniters_per_dataset_mix(tmp_path):
    from pipeline.config import REPO_ROOT

    cfg = load_config(REPO_ROOT / "configs" / "in_domain.yaml")
    demo = load_config(DEFAULT_CONFIG)
    assert cfg.name == "in_domain" and cfg.download == demo.download  # the same data, another pretraining
    mix = {name: (d.dbs, d.weight) for name, d in cfg.pretrain.train_dbs.items()}
    assert mix == {"coco": (["coco_train2014", "coco_val2014"], 1.0), "vg": (["vg_train"], 1.0)}
    assert cfg.pretrain.tasks == {"itm": 2, "mlm": 2, "mrfr": 1, "mrc_kl": 1}
    keys, demo_keys = _keys(cfg, tmp_path), _keys(demo, tmp_path)
    assert {name for name in keys if keys[name] != demo_keys[name]} >= {"pretrain"}
    assert keys["features"] == demo_keys["features"] and keys["txtdb"] == demo_keys["txtdb"]


def _keys(cfg, tmp_path):
    from pipeline.cache import StageStore
    from pipeline.dag import plan

    return {p.name: p.key for p in plan(cfg, "all", StageStore(tmp_path))}


def test_root_seed_reruns_exactly_the_stages_that_read_it(tmp_path):
    from pipeline.stages import STAGES

    readers = {name for name, spec in STAGES.items() if "seed" in spec.config}
    assert readers == {"detector", "pretrain", *(f"finetune_{t}" for t in
                                                 ("retrieval", "vqa", "nlvr2", "snli_ve", "refcoco", "gqa"))}
    base = _keys(load_config(DEFAULT_CONFIG), tmp_path)
    seeded = _keys(load_config(DEFAULT_CONFIG, ["seed=1"]), tmp_path)
    # The readers and what is downstream of them; the world (world.seed), its download and text dbs stay.
    unchanged = {n for n in base if base[n] == seeded[n]}
    assert unchanged == {"world", "download", "dedup", "txtdb", "karpathy_txtdb"}
    with pytest.raises(ConfigError, match=r"unknown key 'pretrain.seed'"):
        load_config(DEFAULT_CONFIG, ["pretrain.seed=1"])
    with pytest.raises(ConfigError, match=r"unknown key 'features.detector.train.seed'"):
        load_config(DEFAULT_CONFIG, ["features.detector.train.seed=1"])



def test_stages_that_train_in_their_own_task_reserve_its_threads():
    # The graph runs independent stages side by side (with seeds=[0,1,2], three detectors at once); a stage
    # task reserving no CPUs while it sets torch threads oversubscribes the cores (seen: 10x slower epochs).
    import re

    from pipeline.config import REPO_ROOT
    from pipeline.stages import STAGES

    cfg = load_config(DEFAULT_CONFIG, ["features.detector.train.threads=3", "runtime.threads=2"])
    threaded = {name: spec for name, spec in STAGES.items() if "set_num_threads" in (
        REPO_ROOT / (spec.entry.split(":")[0].replace(".", "/") + ".py")).read_text()}
    assert {re.sub(r"_.*", "", n) for n in threaded} == {"detector", "finetune", "eval"}
    assert {n: spec.cpus(cfg) for n, spec in threaded.items()} == {
        n: 3 if n == "detector" else 2 for n in threaded}

def test_runtime_settings_have_one_home(tmp_path):
    cfg = load_config(DEFAULT_CONFIG)
    assert (cfg.runtime.precision, cfg.runtime.eval_precision, cfg.runtime.threads) == ("auto", "fp32", 1)
    base = _keys(cfg, tmp_path)
    changed = _keys(load_config(DEFAULT_CONFIG, ["runtime.eval_precision=bf16"]), tmp_path)
    assert {n for n in base if base[n] != changed[n]} == {"eval", *(f"eval_{t}" for t in cfg.finetune.tasks)}
    for moved in ("finetune.common.threads=2", "eval.common.precision=bf16", "pretrain.precision=fp32",
                  "finetune.common.nbb=[0.2,100,10]", "pretrain.max_txt_len=40"):
        with pytest.raises(ConfigError, match="unknown key"):
            load_config(DEFAULT_CONFIG, [moved])


def test_task_options_are_typed_and_checked_when_the_config_loads():
    cfg = load_config(DEFAULT_CONFIG, ["finetune.nlvr2.options.variant=pair",
                                       "finetune.vqa.options.min_count=2"])
    assert (cfg.finetune.nlvr2.options.variant, cfg.finetune.vqa.task_options()["min_count"]) == ("pair", 2)
    # The graph runner ships the config to each stage dumped and validates it again there.
    assert PipelineConfig.model_validate(cfg.model_dump(mode="json")) == cfg
    with pytest.raises(ConfigError, match=r"finetune.nlvr2.options.variant: Input should be"):
        load_config(DEFAULT_CONFIG, ["finetune.nlvr2.options.variant=quad"])
    with pytest.raises(ConfigError, match=r"unknown key 'finetune.vqa.options.min_cnt'"):
        load_config(DEFAULT_CONFIG, ["finetune.vqa.options.min_cnt=2"])
    with pytest.raises(ConfigError, match=r"unknown key 'finetune.vqa.options.skip_missing'"):
        load_config(DEFAULT_CONFIG, ["finetune.vqa.options.skip_missing=true"])  # runtime.skip_missing_images


def test_finetuning_from_the_sweep_needs_a_study():
    with pytest.raises(ConfigError, match=r"finetune.encoder: 'sweep' starts finetuning from the loss "
                                          r"study's best trial, but sweep.study names no pretraining study"):
        load_config(None, ["finetune.encoder=sweep", "sweep.study=null"])
    with pytest.raises(ConfigError, match=r"names no pretraining study"):
        load_config(None, ["finetune.encoder=sweep", "sweep.study=configs/sweeps/iais.yaml"])
    with pytest.raises(ConfigError, match=r"several seeds: the study pretrains on the first seed's regions"):
        load_config(None, ["finetune.encoder=sweep", "seeds=[0,1]"])
