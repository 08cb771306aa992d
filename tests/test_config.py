import pytest

from reptile_dist.config import PRESETS, Config, ConfigError, describe, load_config, parse_overrides


def test_every_preset_loads_and_validates():
    for name in PRESETS:
        assert isinstance(load_config(name), Config)


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
