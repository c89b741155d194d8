import pytest

from poelm.schedule import CARD_B2, CARD_ORIGINAL, Phase, lrm


def test_card_continual_b2_points():
    p = Phase(start_step=83_923, **CARD_B2)
    at = lambda rel: lrm(83_923 + rel, p)  # noqa: E731
    assert at(0) == 0.0
    assert at(1000) == 0.5
    assert at(22_860) == 0.5
    assert at(22_861) == pytest.approx(0.5, abs=1e-4)  # first warmdown step ("warmdown starts at rel 22,861")
    assert at(22_861) < 0.5
    assert p.warmdown_start == 22_861
    assert at(50_800) == 0.0
    assert at(77) == pytest.approx(0.0385)  # the card's step-84000, "lrm ~ 0.04"
    assert at(36_830) == pytest.approx(0.25, abs=1e-4)  # halfway through the warmdown


def test_card_original_final_and_anchor():
    p = Phase(**CARD_ORIGINAL)
    assert lrm(83_923, p) == pytest.approx(0.05)
    assert lrm(500, p) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        lrm(10, Phase(start_step=100, **CARD_B2))
