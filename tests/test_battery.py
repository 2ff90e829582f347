import numpy as np
import pytest

from device_sim.battery import Battery, BatterySpec
from device_sim.timeline import BATTERY_EMPTY

SPEC = BatterySpec(capacity_mah=4000, idle_ma=40, active_ma=400, charge_ma=2000, train_ma=600)


def fixed(intervals):
    def query(t0, t1):
        return [(max(a, t0), min(b, t1)) for a, b in intervals if b > t0 and a < t1]
    return query


def test_idle_unplugged_battery_drains_at_the_idle_current():
    battery = Battery(SPEC, 50.0, 0.0, fixed([]), fixed([]))
    assert battery.percent_at(10 * 3600) == pytest.approx(50.0 - 100 * 400 / 4000)


def test_using_the_phone_drains_faster_and_plugging_in_charges_up_to_full():
    battery = Battery(SPEC, 50.0, 0.0, fixed([(3600, 3 * 3600)]), fixed([(0, 3600)]))
    assert battery.percent_at(3600) == pytest.approx(50 - 10)        # one hour in use: 400 mAh
    assert battery.percent_at(2 * 3600) == pytest.approx(40 + 50)    # one hour on the charger: +2000 mAh
    assert battery.percent_at(3 * 3600) == 100.0                     # capped at full
    assert battery.percent_at(4 * 3600) == pytest.approx(99.0)       # unplugged, idle again


def test_training_and_uploads_spend_the_battery_and_are_counted():
    battery = Battery(SPEC, 80.0, 0.0, fixed([]), fixed([]))
    battery.drain(0.0, 200.0)
    assert battery.percent_at(0.0) == pytest.approx(75.0)
    assert battery.spent_mah == 200.0
    with pytest.raises(ValueError):
        battery.drain(0.0, -1.0)


def test_integration_does_not_depend_on_how_often_the_battery_is_read():
    rng = np.random.default_rng(0)
    edges = np.sort(rng.uniform(0, 48 * 3600, 40))
    plugged = fixed(list(zip(edges[0::4], edges[1::4])))
    active = fixed(list(zip(edges[2::4], edges[3::4])))
    once = Battery(SPEC, 30.0, 0.0, plugged, active)
    often = Battery(SPEC, 30.0, 0.0, plugged, active)
    for t in np.sort(rng.uniform(0, 48 * 3600, 500)):
        often.percent_at(t)
    assert often.percent_at(48 * 3600) == pytest.approx(once.percent_at(48 * 3600), abs=1e-9)


def test_an_empty_battery_stays_empty_until_plugged_in_and_records_when_it_died():
    battery = Battery(SPEC, 1.0, 0.0, fixed([(10 * 3600, 11 * 3600)]), fixed([]), record_events=True)
    assert battery.percent_at(5 * 3600) == 0.0
    assert battery.events and battery.events[0].kind == BATTERY_EMPTY
    assert battery.events[0].t == pytest.approx(40 / 40 * 3600)      # 40 mAh at 40 mA: one hour
    assert battery.percent_at(9 * 3600) == 0.0
    assert battery.percent_at(11 * 3600) == pytest.approx(50.0)


def test_reads_in_the_past_return_the_latest_charge():
    battery = Battery(SPEC, 50.0, 0.0, fixed([]), fixed([]))
    late = battery.percent_at(3600)
    assert battery.percent_at(10) == late


@pytest.mark.parametrize("bad, field", [(dict(capacity_mah=0), "capacity_mah"), (dict(idle_ma=-1), "idle_ma"),
                                        (dict(initial_percent=(90, 10)), "initial_percent")])
def test_bad_spec_names_the_field(bad, field):
    with pytest.raises(ValueError, match=field):
        BatterySpec(**bad)
