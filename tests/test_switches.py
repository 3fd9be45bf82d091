"""A switch holds one validated value, and its ``with`` form restores the previous value however
the block ends."""

import pytest

from lightning_lora.switches import Switch


def test_a_switch_refuses_a_value_outside_its_choices_and_keeps_its_value():
    mode = Switch("fast path mode", "auto", ("auto", "always", "never"))
    with pytest.raises(ValueError, match=r"fast path mode must be one of \('auto', 'always', 'never'\), got 'fast'"):
        mode.set("fast")
    assert mode.value == "auto"
    mode.set("never")
    assert mode.value == "never"


def test_convert_normalises_before_the_check():
    sharing = Switch("input sharing", False, convert=bool)
    sharing.set(1)
    assert sharing.value is True


def test_using_restores_the_previous_value_even_when_the_block_raises():
    mode = Switch("mode", "a", ("a", "b"))
    with mode.using("b"):
        assert mode.value == "b"
    assert mode.value == "a"
    with pytest.raises(RuntimeError), mode.using("b"):
        raise RuntimeError("boom")
    assert mode.value == "a"
    with pytest.raises(ValueError), mode.using("c"):
        pass
    assert mode.value == "a"  # a refused value changes nothing
