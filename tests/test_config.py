import pytest

from poelm import config
from poelm.core.errors import ConfigError


def test_presets_load_and_overrides():
    cfg = config.load("embedded", ["model.depth=8", "model.stage_layers=[4,2,1,1]", "train.seed=3"])
    assert cfg.model.depth == 8 and cfg.model.stage_layers == (4, 2, 1, 1) and cfg.train.seed == 3
    ref = config.load("cognica-3b")
    assert ref.model.stage_layers == (16, 6, 5, 5) and ref.model.n_head // ref.model.n_kv_head == 2
    assert ref.schedule.steps == 83_923 and ref.train.tokens_per_step == 786_432
    assert config.grad_accum_steps(ref, world_size=12) == 4


@pytest.mark.parametrize("override,msg", [
    ("model.depth=7", "sums to 6 but model.depth is 7"),
    ("model.n_kv_head=3", "not divisible by model.n_kv_head"),
    ("model.bogus=1", "unknown config key model.bogus"),
    ("model.n_embd=0", "model.n_embd must be a positive integer"),
    ("schedule.steps=-5", "schedule.steps must be a positive integer"),
    ("model.objective=xx", "model.objective must be"),
])
def test_bad_configs_are_rejected_with_a_clear_message(override, msg):
    with pytest.raises(ConfigError, match=msg):
        config.load("embedded", [override])


def test_malformed_toml_and_unknown_section(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\ndepth = 3")
    with pytest.raises(ConfigError, match="malformed TOML"):
        config.load(str(bad))
    other = tmp_path / "other.toml"
    other.write_text("[modle]\ndepth = 3\n")
    with pytest.raises(ConfigError, match=r"unknown config section \[modle\]"):
        config.load(str(other))
    with pytest.raises(ConfigError, match="config file not found"):
        config.load(str(tmp_path / "missing.toml"))


def test_token_budget_parsing():
    assert config.parse_tokens("40B") == 40_000_000_000
    assert config.steps_for_tokens(config.parse_tokens("40B"), 786_432) == 50_863
    with pytest.raises(ConfigError):
        config.parse_tokens("forty")


def test_a_key_the_chosen_optimizer_ignores_is_refused():
    """Under the reference's optimizer (the default) poelm's Muon/AdamW keys are not read, and
    under poelm's lr_scale is not: set to anything but the default, each is one ConfigError line
    naming the key and the fix; at the default (every saved config.json has them) it passes."""
    for key, value in (("adam_beta1", 0.9), ("adam_beta2", 0.99), ("adam_eps", 1e-8), ("muon_momentum", 0.9),
                       ("muon_momentum_start", 0.8), ("muon_momentum_warmup", 10), ("muon_ns_steps", 3)):
        with pytest.raises(ConfigError, match=rf'^optim.{key} = {value!r} is ignored by optim.optimizer = "nanochat": '
                                              rf'remove it \(default .*\), or set optim.optimizer = "poelm"$'):
            config.load("embedded", [f"optim.{key}={value}"])
        assert getattr(config.load("embedded", ["optim.optimizer=poelm", f"optim.{key}={value}"]).optim, key) == value
    with pytest.raises(ConfigError, match='optim.lr_scale = 0.5 is ignored by optim.optimizer = "poelm".*set optim.optimizer = "nanochat"'):
        config.load(None, ["optim.optimizer=poelm", "optim.lr_scale=0.5"])
    assert config.load(None, ["optim.lr_scale=0.5"]).optim.lr_scale == 0.5
    assert config.validate(config.from_dict(config.load("embedded").to_dict())).optim.optimizer == "nanochat"
