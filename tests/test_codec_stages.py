"""Stage base classes: abstract, and the number format used in canonical specs."""
import pytest

from protocol.codec.stages import ByteCoder, Layout, Transform, ValueCoder, format_number


@pytest.mark.parametrize("value,text", [(5.0, "5"), (0.01, "0.01"), (1e-2, "0.01"), (7800, "7800"),
                                        (0.1 + 0.2, "0.30000000000000004"), (2.5e-7, "2.5e-07")])
def test_format_number_is_short_and_exact(value, text):
    assert format_number(value) == text
    assert float(text) == value


@pytest.mark.parametrize("base", [Transform, Layout, ValueCoder, ByteCoder])
def test_bases_are_abstract(base):
    with pytest.raises(TypeError):
        base()
