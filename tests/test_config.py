import pytest
import yaml

from reptile_dist.config import FIELDS, PRESETS, Config, ConfigError, describe, load_config, parse_overrides, preset_path


def test_the_preset_list_names_every_shipped_preset_file():
    assert sorted(p.stem for p in preset_path("sine").parent.glob("*.yaml")) == sorted(PRESETS)


@pytest.mark.parametrize("name", PRESETS)
def test_a_preset_holds_its_yaml_values_and_the_defaults_elsewhere(name):
    written = yaml.safe_load(preset_path(name).read_text())
    loaded, defaults = load_config(name).to_dict(), Config().to_dict()
    assert set(written) <= set(FIELDS)
    assert {k: loaded[k] for k in written} == written
    assert {k: v for k, v in loaded.items() if k not in written} == {k: v for k, v in defaults.items() if k not in written}
    # YAML's 1 is an int; a float field must still hold a float (and so on for every field).
    assert {k: type(v).__name__ for k, v in loaded.items()} == {k: f.type for k, f in FIELDS.items()}


def test_omniglot_presets_carry_the_papers_hyperparameters():
    c = load_config("omniglot-5w1s")
    assert (c.ways, c.shots, c.train_shots, c.inner_batch_size, c.inner_steps) == (5, 1, 10, 10, 5)
    assert (c.inner_optimizer, c.inner_lr, c.meta_batch_size, c.meta_iters) == ("adam", 0.001, 5, 100_000)
    assert (c.meta_step_size, c.meta_step_size_final, c.eval_inner_steps, c.eval_batch_size) == (1.0, 0.0, 50, 5)
    assert c.inner_state == "carried"  # the reference's one long-lived Adam
    c = load_config("omniglot-20w5s")
    assert (c.ways, c.shots, c.inner_batch_size, c.inner_steps, c.inner_lr, c.meta_iters, c.eval_batch_size) == (
        20, 5, 20, 10, 0.0005, 200_000, 10)


def test_overrides_from_the_command_line_are_typed():
    c = load_config("sine", parse_overrides(["inner_steps=8", "meta_step_size=0.5", "inner_replacement=true"]))
    assert c.inner_steps == 8 and c.meta_step_size == 0.5 and c.inner_replacement is True


def test_overrides_win_over_the_preset_and_are_coerced_to_the_fields_type():
    preset = load_config("sine")
    c = load_config("sine", parse_overrides(["meta_step_size=1", "eval_tasks=20.0", "mode=async"]))
    assert (c.meta_step_size, c.eval_tasks, c.mode) == (1.0, 20, "async")
    assert type(c.meta_step_size) is float and type(c.eval_tasks) is int
    assert c.replace(meta_step_size=preset.meta_step_size, eval_tasks=preset.eval_tasks, mode=preset.mode) == preset


def test_an_override_in_exponent_notation_without_a_dot_is_a_number():
    # YAML 1.1 reads 1e-3 (no dot) as a string
    assert load_config("sine", parse_overrides(["inner_lr=1e-3"])).inner_lr == 0.001
    assert load_config("sine", {"eval_tasks": "2e3"}).eval_tasks == 2000


@pytest.mark.parametrize("override", ["inner_lr=.nan", "meta_step_size=.inf", "inner_lr=nan", "meta_step_size=-inf"])
def test_a_non_finite_number_is_refused_naming_the_field(override):
    with pytest.raises(ConfigError, match=f"{override.split('=')[0]} must be a finite number"):
        load_config("sine", parse_overrides([override]))


@pytest.mark.parametrize("overrides, field", [
    ({"nonsense": 1}, "nonsense"),
    ({"meta_step_size": -1}, "meta_step_size"),
    ({"inner_steps": 0}, "inner_steps"),
    ({"workers": 0}, "workers"),
    ({"mode": "turbo"}, "mode"),
    ({"inner_lr": "fast"}, "inner_lr"),
    ({"meta_step_size_final": 2.0}, "meta_step_size_final"),
    ({"inner_state": "warm"}, "inner_state"),
    ({"inner_state": "carried", "inner_optimizer": "sgd"}, "inner_state"),
    ({"inner_steps": "2.5"}, "inner_steps must be an integer"),
    ({"inner_replacement": "sometimes"}, "inner_replacement must be true or false"),
    ({"prefetch": True, "mode": "async", "outer_optimizer": "nesterov"}, "prefetch needs outer_optimizer=sgd"),
])
def test_bad_values_name_the_field(overrides, field):
    with pytest.raises(ConfigError, match=field):
        load_config("sine", overrides)


def test_annealing_schedule_is_linear_and_exact():
    c = Config(meta_iters=100, meta_step_size=1.0, meta_step_size_final=0.2)
    assert c.meta_step_size_at(0) == 1.0
    assert c.meta_step_size_at(50) == pytest.approx(0.6, abs=1e-12)
    assert c.meta_step_size_at(25) == pytest.approx(0.8, abs=1e-12)
    assert c.meta_step_size_at(100) == pytest.approx(0.2, abs=1e-12)


def test_yaml_file_config_round_trips(tmp_path):
    import yaml

    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(load_config("omniglot-5w5s").to_dict()))
    assert load_config(str(path)) == load_config("omniglot-5w5s")
    assert "meta_step_size" in describe()


@pytest.mark.parametrize("value", [5, ["a"], None, True])
def test_a_string_field_refuses_a_non_string_naming_the_field(value):
    with pytest.raises(ConfigError, match="data must be a string"):
        Config().replace(data=value)


@pytest.mark.parametrize("content, message", [
    (b"data: 5\n", "data must be a string, got 5"),
    (b"data: [a]\n", r"data must be a string, got \['a'\]"),
    (b"inner_lr: [\n", "not valid YAML"),
    (b"5: x\n", "key 5 is not a name"),
    (b"\x89PNG\r\n\x1a\n\xff\xfe", "not valid YAML"),
])
def test_a_bad_config_file_is_a_config_error(tmp_path, content, message):
    path = tmp_path / "mine.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=message):
        load_config(str(path))


def test_a_folder_given_as_config_is_a_config_error_naming_it(tmp_path):
    with pytest.raises(ConfigError, match=f"{tmp_path} is a folder"):
        load_config(str(tmp_path))


def test_a_set_value_that_is_not_yaml_is_a_config_error_naming_the_field():
    with pytest.raises(ConfigError, match="inner_lr="):
        load_config("sine", parse_overrides(["inner_lr=[0.1"]))


def test_the_wire_precision_is_float64_where_a_run_is_reproducible_and_float32_for_async_with_several_workers():
    ray = Config().replace(backend="ray")
    assert Config().delta_dtype == "auto" and Config().wire_dtype == "float64"
    for mode in ("sync", "allreduce"):
        assert ray.replace(mode=mode, workers=4).wire_dtype == "float64"  # bit-equal to the local trainer
    assert ray.replace(mode="async", workers=1).wire_dtype == "float64"  # one async worker is sync
    assert ray.replace(mode="async", workers=2).wire_dtype == "float32"
    assert ray.replace(mode="async", workers=2, delta_dtype="float64").wire_dtype == "float64"  # asked for
    assert ray.replace(mode="sync", delta_dtype="bfloat16").wire_dtype == "bfloat16"


def test_an_async_push_holds_a_meta_batch_unless_tasks_per_push_says_otherwise():
    cfg = Config().replace(backend="ray", mode="async", workers=3, meta_batch_size=5)
    assert cfg.async_tasks_per_push == 5 and cfg.replace(tasks_per_push=2).async_tasks_per_push == 2
