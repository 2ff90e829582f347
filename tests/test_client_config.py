"""client.toml: the example loads; every mistake is a ConfigError naming the file and the key."""
from pathlib import Path

import pytest

from edge_client.client_config import ConfigError, load_client_config
from edge_client.eligibility import EligibilityPolicy

EXAMPLE = Path(__file__).resolve().parents[1] / "edge_client" / "deploy" / "client.example.toml"

MINIMAL = """
[device]
id = "pi-1"
fleet = "home"
state_dir = "state"

[broker]
host = "127.0.0.1"

[trust]
aggregator_public_key = "keys/aggregator.pub"
"""


def write(tmp_path: Path, text: str, name: str = "client.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_the_example_config_loads():
    config = load_client_config(EXAMPLE)
    assert config.device.id == "pi-kitchen" and config.device.fleet == "home"
    assert config.device.state_dir == Path("/var/lib/fedboard")
    assert config.device.data == Path("/var/lib/fedboard/texts.db")
    assert config.broker.port == 8883 and config.broker.tls_ca == Path("/etc/fedboard/ca.crt")
    assert config.broker.password_file == Path("/etc/fedboard/broker.password")
    assert config.trust.aggregator_public_key == Path("/etc/fedboard/aggregator.pub")
    assert config.policy == EligibilityPolicy()  # the example spells out the defaults
    assert config.store.max_age_days == 90 and config.store.max_rows == 50_000
    assert config.training.threads == 1 and config.platform.idle_after_s == 60


def test_local_dp_is_off_unless_the_owner_sets_it(tmp_path):
    assert load_client_config(EXAMPLE).privacy.local_dp is None
    assert load_client_config(write(tmp_path, MINIMAL)).privacy.local_dp is None
    text = MINIMAL + "\n[privacy]\nlocal_dp_clip = 0.5\nlocal_dp_epsilon = 4.0\n"
    cfg = load_client_config(write(tmp_path, text)).privacy.local_dp
    assert (cfg.clip, cfg.epsilon, cfg.delta) == (0.5, 4.0, 1e-5) and cfg.sigma > 0


def test_minimal_config_gets_defaults_and_relative_paths(tmp_path):
    config = load_client_config(write(tmp_path, MINIMAL))
    assert config.device.state_dir == tmp_path / "state"
    assert config.device.data == tmp_path / "state" / "texts.db"
    assert config.trust.aggregator_public_key == tmp_path / "keys" / "aggregator.pub"
    settings = config.mqtt_settings()
    assert (settings.host, settings.port, settings.mqtt_version, settings.tls_ca) == ("127.0.0.1", 1883, 5, None)
    assert config.policy == EligibilityPolicy()


def test_password_file_and_tls_paths(tmp_path):
    (tmp_path / "secret").write_text("s3cret\n")
    (tmp_path / "ca.crt").write_text("x")
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "aggregator.pub").write_text("x")
    text = MINIMAL.replace('host = "127.0.0.1"', 'host = "127.0.0.1"\nusername = "pi-1"\n'
                           'password_file = "secret"\ntls_ca = "ca.crt"\nmqtt_version = 3')
    config = load_client_config(write(tmp_path, text))
    config.check_files()
    settings = config.mqtt_settings()
    assert settings.password == "s3cret" and settings.port == 8883 and settings.mqtt_version == 3
    assert settings.tls_ca == str(tmp_path / "ca.crt")


def test_policy_store_platform_sections(tmp_path):
    text = MINIMAL + """
[policy]
require_idle = false
min_battery_percent = 50
[store]
max_age_days = 0
max_rows = 100
[training]
threads = 2
[platform]
metered_interfaces = ["eth1"]
idle_after_s = 5
"""
    config = load_client_config(write(tmp_path, text))
    assert config.policy.require_idle is False and config.policy.min_battery_percent == 50
    assert config.store.max_age_days is None and config.store.max_rows == 100
    assert config.training.threads == 2 and config.platform.metered_interfaces == ("eth1",)


@pytest.mark.parametrize("change, message", [
    (('host = "127.0.0.1"', 'host = "127.0.0.1"\nport = "abc"'),
     "[broker] port: expected an integer 1..65535, got 'abc'"),
    (('host = "127.0.0.1"', 'host = "127.0.0.1"\nport = 70000'), "[broker] port: expected an integer 1..65535"),
    (('host = "127.0.0.1"', 'host = "127.0.0.1"\nprot = 1883'), "[broker] prot: unknown key"),
    (('host = "127.0.0.1"', 'host = "127.0.0.1"\nmqtt_version = 4'), "[broker] mqtt_version: expected 5 or 3"),
    (('host = "127.0.0.1"', 'host = "127.0.0.1"\npassword = "x"'), "[broker] username: missing"),
    (('host = "127.0.0.1"', 'host = "127.0.0.1"\nusername = "u"\npassword = "x"\npassword_file = "p"'),
     "[broker] password_file: give either"),
    (('host = "127.0.0.1"', 'host = "127.0.0.1"\ntls_cert = "c.pem"'), "[broker] tls_key: tls_cert and tls_key"),
    (('host = "127.0.0.1"', 'host = "127.0.0.1"\nkeepalive_s = 1'),
     "[broker] keepalive_s: expected an integer 5..3600"),
    (('host = "127.0.0.1"', 'port = 1883'), "[broker] host: missing (required)"),
    (('id = "pi-1"', 'id = "pi 1/#"'), "[device] id: 'pi 1/#' is not an id"),
    (('fleet = "home"', ''), "[device] fleet: missing (required)"),
    (('id = "pi-1"', 'id = 7'), "[device] id: expected a non-empty string, got 7"),
    (('aggregator_public_key = "keys/aggregator.pub"', ''), "[trust] aggregator_public_key: missing"),
    (('[trust]', '[trusts]'), "unknown section [trusts]"),
    (('[broker]\nhost = "127.0.0.1"\n', ''), "missing section [broker]"),
])
def test_bad_configs_name_the_file_and_key(tmp_path, change, message):
    old, new = change
    assert old in MINIMAL
    path = write(tmp_path, MINIMAL.replace(old, new))
    with pytest.raises(ConfigError) as info:
        load_client_config(path)
    assert str(info.value).startswith(f"{path}: ")
    assert message in str(info.value)


@pytest.mark.parametrize("extra, message", [
    ("[policy]\nrequire_charging = 1", "[policy] require_charging: expected true or false, got 1"),
    ("[policy]\nmin_battery_percent = 150", "[policy] min_battery_percent"),
    ("[policy]\nmax_cpu_temperature = 60", "[policy] max_cpu_temperature: unknown key"),
    ("[store]\nmax_rows = -5", "[store] max_rows: expected an integer >= 0, got -5"),
    ("[store]\nmax_age_days = \"ninety\"", "[store] max_age_days: expected a number >= 0"),
    ("[training]\nthreads = 0", "[training] threads: expected an integer 1..64, got 0"),
    ("[training]\nthreads = true", "[training] threads: expected an integer 1..64, got True"),
    ("[platform]\nmetered_interfaces = \"eth1\"",
     "[platform] metered_interfaces: expected a list of non-empty strings"),
    ("[platform]\nidle_after_s = -1", "[platform] idle_after_s: expected a number >= 0, got -1"),
    ("training = 3", "training must be a section [training], not a plain key"),
    ("[privacy]\nlocal_dp_clip = 1.0", "[privacy] local_dp_epsilon: missing"),
    ("[privacy]\nlocal_dp_epsilon = 8.0", "[privacy] local_dp_epsilon: set local_dp_clip"),
    ("[privacy]\nlocal_dp_clip = -1", "[privacy] local_dp_clip: expected a number >= 0, got -1"),
    ("[privacy]\nlocal_dp_clip = 1\nlocal_dp_epsilon = 0", "[privacy] local_dp_epsilon: expected a number > 0"),
    ("[privacy]\nlocal_dp_clip = 1\nlocal_dp_epsilon = 8\nlocal_dp_delta = 1.5",
     "[privacy] local_dp_delta: expected a number in (0, 1), got 1.5"),
])
def test_bad_optional_sections(tmp_path, extra, message):
    text = MINIMAL + "\n" + extra + "\n" if extra.startswith("[") else extra + "\n" + MINIMAL
    with pytest.raises(ConfigError) as info:
        load_client_config(write(tmp_path, text))
    assert message in str(info.value), str(info.value)


def test_missing_file_and_not_toml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_client_config(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_client_config(write(tmp_path, "[device\nid = 1"))
    with pytest.raises(ConfigError, match="not UTF-8"):
        (tmp_path / "bin.toml").write_bytes(b"\xff\xfe\x00")
        load_client_config(tmp_path / "bin.toml")
    assert issubclass(ConfigError, ValueError)


def test_files_the_config_points_to_are_checked_before_use(tmp_path):
    config = load_client_config(write(tmp_path, MINIMAL))
    with pytest.raises(ConfigError, match=r"\[trust\] aggregator_public_key: file .* not found"):
        config.check_files()
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "aggregator.pub").write_text("x")
    config.check_files()
    text = MINIMAL.replace('host = "127.0.0.1"', 'host = "127.0.0.1"\nusername = "u"\npassword_file = "empty"')
    (tmp_path / "empty").write_text("\n")
    config = load_client_config(write(tmp_path, text))
    with pytest.raises(ConfigError, match=r"\[broker\] password_file: .* is empty"):
        config.mqtt_settings()


# -- found by bench/fuzz_campaign.py ---------------------------------------------------------------
@pytest.mark.parametrize("line", ["deep = " + "[" * 50_000 + "]" * 50_000,  # tomllib: RecursionError
                                  "big = " + "9" * 5000])                  # tomllib: ValueError (int digits)
def test_toml_that_breaks_tomllib_is_a_config_error(tmp_path, line):
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_client_config(write(tmp_path, line + "\n" + MINIMAL))


def test_a_path_with_a_nul_character_is_a_config_error_naming_the_key(tmp_path):
    text = MINIMAL.replace('state_dir = "state"', 'state_dir = "st\\u0000ate"')
    with pytest.raises(ConfigError, match=r"\[device\] state_dir: a path cannot contain a NUL"):
        load_client_config(write(tmp_path, text))


@pytest.mark.parametrize("section, key", [("platform", "idle_after_s"), ("policy", "min_battery_percent")])
def test_an_integer_beyond_float_range_is_a_config_error_naming_the_key(tmp_path, section, key):
    text = MINIMAL + f"\n[{section}]\n{key} = {'9' * 400}\n"
    with pytest.raises(ConfigError, match=rf"\[{section}\] {key}: expected a number"):
        load_client_config(write(tmp_path, text))
