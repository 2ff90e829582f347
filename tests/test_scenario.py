import json
from collections import Counter

import pytest

from device_sim.clock import DAY_S, DEFAULT_START_S, HOUR_S, ManualClock, VirtualClock
from device_sim.scenario import CorpusSpec, ScenarioError, builtin_scenarios, load_scenario, parse_scenario

MINIMAL = """
[fleet]
devices = 10
composition = { phone = 1.0 }
[rounds]
clients_per_round = 5
"""


def write(tmp_path, text, name="s.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_three_example_scenarios_ship_and_load():
    scenarios = builtin_scenarios()
    assert set(scenarios) == {"phones-overnight", "iot-pis", "flaky-network"}
    for name, path in scenarios.items():
        s = load_scenario(path)
        assert s.name == name and s.description
        assert s.rounds.clients_per_round * s.rounds.over_selection <= s.fleet.devices
        json.dumps(s.summary())


def test_phones_overnight_is_60_30_10_starting_monday_evening():
    s = load_scenario("phones-overnight")   # by name
    fleet = s.make_fleet()
    assert Counter(m.profile.kind for m in fleet) == {"phone": 600, "pi": 300, "lowend": 100}
    assert s.clock.start_s == DEFAULT_START_S + 20 * HOUR_S
    assert isinstance(s.make_clock(), VirtualClock)
    clock = s.make_clock(manual=True)
    assert isinstance(clock, ManualClock) and clock.now() == s.clock.start_s
    platforms = s.make_platforms(clock, shard_of=(1, 4))
    assert len(platforms) == 250 and all(p.index % 4 == 1 for p in platforms)
    assert platforms[0].base_step_s == s.training.base_step_s


def test_iot_pis_defines_a_flaky_pi_from_the_pi():
    s = load_scenario("iot-pis")
    flaky, pi = s.profiles["flaky-pi"], s.profiles["pi"]
    assert flaky.kind == "pi-flaky" and not flaky.has_battery
    assert flaky.network.day.offline == 0.2 and pi.network.day.wired == 0.85
    assert flaky.failures.upload_loss == 0.1 and pi.failures.upload_loss == 0.005
    assert pi.utc_offsets == ((1.0, 1.0),)


def test_flaky_network_failures_apply_to_every_profile():
    s = load_scenario("flaky-network")
    for name in ("phone", "lowend"):
        assert s.profiles[name].failures.crash_per_round == 0.05
    assert s.profiles["phone"].network.dwell_min.offline == 4
    assert s.rounds.over_selection == 2.0 and s.rounds.min_reports == 24


def test_per_profile_failures_win_over_the_global_table(tmp_path):
    s = load_scenario(write(tmp_path, MINIMAL + """
[failures]
crash_per_round = 0.2
[profiles.phone.failures]
crash_per_round = 0.5
"""))
    assert s.profiles["phone"].failures.crash_per_round == 0.5
    assert s.profiles["lowend"].failures.crash_per_round == 0.2


def test_minimal_scenario_gets_defaults(tmp_path):
    s = load_scenario(write(tmp_path, MINIMAL, "mini.toml"))
    assert s.name == "mini" and s.seed == 0 and s.corpus.builtin
    assert s.eligibility.require_charging


@pytest.mark.parametrize("extra, key, match", [
    ("colour = 'red'", "colour", "unknown top-level key"),
    ("[rounds]\nrounds = 'ten'", None, "Cannot declare"),  # duplicate table: TOML itself refuses
    ("[clock]\nspeedup = 'fast'", "clock.speedup", "must be a number"),
    ("[clock]\nstart = 'someday'", "clock.start", "start"),
    ("[clock]\nspeeedup = 3", "clock.speeedup", "unknown key"),
    ("[training]\ncodec = 'zz9'", "training.codec", "codec"),
    ("[corpus]\nformat = 'pdf'", "corpus.format", "format must be one of"),
    ("[corpus]\npath = 'nowhere.txt'", "corpus.path", "does not exist"),
    ("[eligibility]\nrequire_charge = true", "eligibility", "unknown key"),
    ("[network.tablet]\nday = { wifi = 1.0 }", "network.tablet", "no such profile"),
    ("[network.phone]\nday = { wifi = 0.7 }", "network.phone.day", "sum to 1"),
    ("[profiles.tablet]\nkind = 'tablet'", "profiles.tablet.base", "needs base"),
    ("[profiles.phone.battery]\ncapacity_mah = -5", "profiles.phone.battery.capacity_mah", "capacity_mah"),
    ("[failures]\ncrash_per_round = 2", "failures.crash_per_round", "crash_per_round"),
    ("seed = -1", "seed", ">= 0"),
])
def test_bad_scenarios_name_the_file_and_the_key(tmp_path, extra, key, match):
    text = extra + "\n" + MINIMAL if not extra.startswith("[") else MINIMAL + extra
    path = write(tmp_path, text, "bad.toml")
    with pytest.raises(ScenarioError, match=match) as info:
        load_scenario(path)
    assert str(path) in str(info.value)
    if key is not None:
        assert info.value.key == key and key in str(info.value)


@pytest.mark.parametrize("fleet, key, match", [
    ("devices = 10\ncomposition = { phone = 0.5, pi = 0.3 }", "fleet.composition", "sum to 1, got 0.8"),
    ("devices = 10\ncomposition = { phone = 0.5, toaster = 0.5 }", "fleet.composition.toaster", "no such profile"),
    ("devices = 10\ncomposition = { phone = '1' }", "fleet.composition.phone", "share must be a number"),
    ("devices = 0", "fleet.devices", ">= 1"),
    ("devices = 3", "fleet.devices", "cannot fill a round"),
    ("devices = 10\nsize = 4", "fleet.size", "unknown key"),
])
def test_bad_fleets(tmp_path, fleet, key, match):
    path = write(tmp_path, f"[fleet]\n{fleet}\n[rounds]\nclients_per_round = 5\n")
    with pytest.raises(ScenarioError, match=match) as info:
        load_scenario(path)
    assert info.value.key == key


def test_invalid_toml_and_missing_file(tmp_path):
    with pytest.raises(ScenarioError, match="not valid TOML"):
        load_scenario(write(tmp_path, "[fleet\n"))
    with pytest.raises(ScenarioError, match="file not found; built-in scenarios: flaky-network"):
        load_scenario(tmp_path / "nope.toml")


def test_corpus_path_is_relative_to_the_scenario(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "c.tsv").write_text("alice\thello there\n")
    s = load_scenario(write(tmp_path, MINIMAL + "[corpus]\npath = 'data/c.tsv'\nformat = 'tsv'\n"))
    assert s.corpus.path == str((tmp_path / "data" / "c.tsv").resolve())
    assert s.corpus.read().users == {"alice": ["hello there"]}


def test_builtin_corpus_size_follows_n_users():
    corpus = CorpusSpec(n_users=7).read(seed=0)
    assert corpus.n_users == 7


def test_users_are_dealt_to_devices_deterministically():
    spec = CorpusSpec(users_per_device=2)
    users = [f"u{i}" for i in range(10)]
    five = spec.assign_users(users, 5, seed=0)
    assert sorted(u for group in five for u in group) == users      # every user exactly once
    assert all(len(g) == 2 for g in five)
    assert five == spec.assign_users(users, 5, seed=0) != spec.assign_users(users, 5, seed=1)
    twelve = spec.assign_users(users, 12, seed=0)
    assert twelve[:5] == five and twelve[5:10] == five and len(twelve) == 12
    with pytest.raises(ValueError, match="reuse_users"):
        CorpusSpec(reuse_users=False).assign_users(users, 11)


def test_parse_scenario_from_a_dict_without_a_file():
    s = parse_scenario({"fleet": {"devices": 20, "composition": {"raspberry-pi": 1.0}},
                        "rounds": {"clients_per_round": 10}})
    assert s.fleet.composition == (("pi", 1.0),) and s.path is None
    clock = s.make_clock(manual=True)
    clock.advance(DAY_S)
    assert all(p.read().battery_percent is None for p in s.make_platforms(clock))


def test_round_windows_too_short_on_the_wall_are_warned_about(tmp_path, caplog):
    path = write(tmp_path, MINIMAL.replace("[rounds]", "[rounds]\ncheckin_window_s = 60\ndeadline_s = 600")
                 + "[clock]\nspeedup = 600\n")
    s = load_scenario(path)
    warnings = s.timing_warnings()
    assert len(warnings) == 2 and "0.10 wall s" in warnings[0] and "1.00 wall s" in warnings[1]
    assert "checkin_window_s" in caplog.text
    for name in builtin_scenarios():
        assert load_scenario(name).timing_warnings() == []


# -- found by bench/fuzz_campaign.py ---------------------------------------------------------------
@pytest.mark.parametrize("data, match", [
    (b"name = \"x\"\n\xff\xfe\n", "not UTF-8"),                      # was a UnicodeDecodeError
    (b"deep = " + b"[" * 50_000 + b"]" * 50_000 + b"\n", "not valid TOML"),  # was a RecursionError
    (b"seed = " + b"9" * 5000 + b"\n", "not valid TOML"),               # was a ValueError from int()
])
def test_files_that_break_tomllib_are_scenario_errors(tmp_path, data, match):
    path = tmp_path / "s.toml"
    path.write_bytes(data)
    with pytest.raises(ScenarioError, match=match):
        load_scenario(path)


def test_an_integer_beyond_float_range_is_a_scenario_error_naming_the_key(tmp_path):
    path = write(tmp_path, "[failures]\nupload_loss = " + "9" * 400 + "\n")
    with pytest.raises(ScenarioError) as info:
        load_scenario(path)
    assert info.value.key == "failures.upload_loss" and "integer of" in str(info.value)


def test_a_fleet_share_beyond_float_range_is_a_scenario_error(tmp_path):
    path = write(tmp_path, "[fleet]\ncomposition = { phone = " + "9" * 400 + " }\n")
    with pytest.raises(ScenarioError) as info:
        load_scenario(path)
    assert info.value.key == "fleet.composition.phone"


def test_clients_per_round_beyond_float_range_is_a_scenario_error(tmp_path):
    path = write(tmp_path, "[rounds]\nclients_per_round = " + "9" * 400 + "\n")
    with pytest.raises(ScenarioError, match="rounds.clients_per_round = 9") as info:
        load_scenario(path)
    assert info.value.key == "fleet.devices"
