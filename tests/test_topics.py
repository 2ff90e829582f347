import pytest

from protocol.errors import EnvelopeError
from protocol.topics import FleetTopics, check_id, slugify


def test_topic_names_under_fleet_root():
    t = FleetTopics("demo")
    assert t.round == "fedboard/demo/round/current"
    assert t.model == "fedboard/demo/model/current"
    assert t.update("dev-1") == "fedboard/demo/update/dev-1"
    assert t.all_updates == "fedboard/demo/update/+"
    assert t.device_of("fedboard/demo/update/dev-1") == "dev-1"


@pytest.mark.parametrize("bad", ["", "a/b", "+", "#", "with space", "x" * 65, "-lead"])
def test_ids_that_would_break_topics_are_refused(bad):
    with pytest.raises(EnvelopeError):
        check_id("device", bad)


def test_device_of_foreign_topic_refused():
    with pytest.raises(EnvelopeError):
        FleetTopics("demo").device_of("fedboard/other/update/x")


def test_slugify_makes_unique_valid_ids():
    taken: set[str] = set()
    a = slugify("FIRST CITIZEN", taken)
    b = slugify("First  Citizen!", taken)
    assert a == "first-citizen" and b == "first-citizen-2"
    assert check_id("device", slugify("???", taken))
