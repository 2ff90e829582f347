from collections import Counter

import pytest

from device_sim.profiles import (BUILTIN_PROFILES, LOW_END_PHONE, PHONE, RASPBERRY_PI, DeviceProfile, ProfileError,
                                 allocate, apply_overrides, get_profile, make_fleet, shard)


def test_builtin_profiles_are_the_three_kinds():
    assert set(BUILTIN_PROFILES) == {"phone", "pi", "lowend"}
    assert not RASPBERRY_PI.has_battery and RASPBERRY_PI.charging.mains_powered
    assert RASPBERRY_PI.network.day.wired > 0.5 and RASPBERRY_PI.network.day.cellular == 0
    assert LOW_END_PHONE.battery.capacity_mah < PHONE.battery.capacity_mah
    assert LOW_END_PHONE.compute.factor_median > PHONE.compute.factor_median
    assert get_profile("raspberry-pi") is RASPBERRY_PI and get_profile("low-end") is LOW_END_PHONE
    with pytest.raises(ValueError, match="unknown device profile 'tablet'"):
        get_profile("tablet")


def test_make_fleet_counts_are_exact_and_kinds_interleaved():
    fleet = make_fleet({"phone": 0.6, "pi": 0.3, "lowend": 0.1}, 1000, seed=0)
    assert [m.index for m in fleet] == list(range(1000))
    assert Counter(m.profile.name for m in fleet) == {"phone": 600, "pi": 300, "lowend": 100}
    first = Counter(m.profile.name for m in fleet[:100])
    assert len(first) == 3  # shuffled, not 600 phones then 300 Pis
    assert fleet == make_fleet({"phone": 0.6, "pi": 0.3, "lowend": 0.1}, 1000, seed=0)
    assert fleet != make_fleet({"phone": 0.6, "pi": 0.3, "lowend": 0.1}, 1000, seed=1)


def test_make_fleet_accepts_profile_objects_and_rounds_by_largest_remainder():
    tablet = DeviceProfile(name="tablet", kind="tablet")
    fleet = make_fleet([(tablet, 1 / 3), ("phone", 2 / 3)], 10, seed=3)
    assert Counter(m.profile.kind for m in fleet) == {"phone": 7, "tablet": 3}
    assert allocate([0.5, 0.25, 0.25], 3) == [1, 1, 1]  # remainders .5 < .75: the small shares win
    assert allocate([0.6, 0.3, 0.1], 7) == [4, 2, 1]
    assert sum(allocate([0.1] * 10, 7)) == 7


@pytest.mark.parametrize("composition, match", [
    ({"phone": 0.5, "pi": 0.3}, "sum to 1"),
    ({"phone": 1.2, "pi": -0.2}, ">= 0"),
    ({}, "at least one"),
    ({"toaster": 1.0}, "unknown device profile"),
])
def test_bad_compositions(composition, match):
    with pytest.raises(ValueError, match=match):
        make_fleet(composition, 10, 0)


def test_shard_splits_the_fleet_without_overlap():
    fleet = make_fleet({"phone": 1.0}, 10, 0)
    parts = [shard(fleet, i, 3) for i in range(3)]
    assert sorted(m.index for p in parts for m in p) == list(range(10))
    with pytest.raises(ValueError, match="shard"):
        shard(fleet, 3, 3)


def test_overrides_replace_nested_numbers_and_share_tables():
    p = apply_overrides(PHONE, {"battery": {"capacity_mah": 3000, "initial_percent": [10, 20]},
                                "network": {"day": {"wifi": 0.9, "offline": 0.1}, "dwell_min": {"wifi": 5}},
                                "utc_offsets": {"-5": 0.25, "+5.5": 0.75}}, "profiles.phone")
    assert p.battery.capacity_mah == 3000 and p.battery.initial_percent == (10.0, 20.0)
    assert p.network.day.values() == (0.0, 0.9, 0.0, 0.1)          # a share table replaces the whole mix
    assert p.network.dwell_min.wifi == 5 and p.network.dwell_min.cellular == PHONE.network.dwell_min.cellular
    assert p.utc_offsets == ((-5.0, 0.25), (5.5, 0.75))
    assert apply_overrides(PHONE, {"utc_offsets": [[1, 1.0]]}, "x").utc_offsets == ((1.0, 1.0),)
    assert PHONE.battery.capacity_mah == 4000  # the built-in is untouched


@pytest.mark.parametrize("data, key", [
    ({"battery": {"capacty_mah": 1}}, "profiles.phone.battery.capacty_mah"),
    ({"battery": {"capacity_mah": "big"}}, "profiles.phone.battery.capacity_mah"),
    ({"battery": {"present": 1}}, "profiles.phone.battery.present"),
    ({"network": {"day": {"wifi": 0.5}}}, "profiles.phone.network.day"),
    ({"network": {"day": {"lte": 1.0}}}, "profiles.phone.network.day.lte"),
    ({"utc_offsets": {"-5": 0.5}}, "profiles.phone.utc_offsets"),
    ({"utc_offsets": {"east": 1.0}}, "profiles.phone.utc_offsets.east"),
    ({"battery": {"present": False}}, "profiles.phone"),
    ({"failures": 3}, "profiles.phone.failures"),
])
def test_bad_overrides_name_the_key(data, key):
    with pytest.raises(ProfileError) as info:
        apply_overrides(PHONE, data, "profiles.phone")
    assert info.value.key == key


def test_profile_checks_time_zones():
    with pytest.raises(ValueError, match="outside"):
        DeviceProfile(name="x", kind="x", utc_offsets=((20.0, 1.0),))
