"""nlora.study.stats against independent values: a published t table and hand-made numbers."""

from __future__ import annotations

import math

import pytest

from nlora.study.stats import mean_interval, paired_test, t_quantile, t_two_sided_p

# Two-sided critical values of Student's t, from the published table (e.g. NIST/SEMATECH
# e-Handbook of Statistical Methods, 1.3.6.7.2), to three decimals.
PUBLISHED_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 7: 2.365, 10: 2.228,
                 15: 2.131, 20: 2.086, 30: 2.042, 40: 2.021, 60: 2.000, 100: 1.984}
PUBLISHED_995 = {1: 63.657, 2: 9.925, 5: 4.032, 10: 3.169, 30: 2.750, 100: 2.626}
PUBLISHED_95 = {1: 6.314, 3: 2.353, 10: 1.812, 31: 1.696}  # one-sided 95 %, df 31 included


@pytest.mark.parametrize("table,p", [(PUBLISHED_975, 0.975), (PUBLISHED_995, 0.995),
                                     (PUBLISHED_95, 0.95)])
def test_t_quantiles_match_the_published_table(table, p):
    for df, value in table.items():
        assert t_quantile(p, df) == pytest.approx(value, abs=6e-4), df


def test_no_normal_shortcut_above_30_df():
    assert t_quantile(0.975, 31) > 2.03  # the old bench helper said 1.96 here
    assert t_quantile(0.975, 10**6) == pytest.approx(1.95996, abs=1e-4)  # -> the normal


def test_p_values_of_known_t_statistics():
    assert t_two_sided_p(12.706, 1) == pytest.approx(0.05, abs=1e-4)
    assert t_two_sided_p(2.228, 10) == pytest.approx(0.05, abs=1e-4)
    assert t_two_sided_p(1.0, 1) == pytest.approx(0.5, abs=1e-12)  # Cauchy: 1 - 2·atan(1)/π
    assert t_two_sided_p(0.0, 7) == pytest.approx(1.0)


def test_interval_of_hand_made_numbers():
    # 70, 72, 74: mean 72, sd 2, half-width 4.303 * 2 / sqrt(3) = 4.9687
    interval = mean_interval([70.0, 72.0, 74.0])
    assert interval.mean == pytest.approx(72.0)
    assert interval.sd == pytest.approx(2.0)
    assert interval.half_width == pytest.approx(4.303 * 2 / math.sqrt(3), abs=1e-3)
    assert interval.text() == "72.0 ± 5.0"
    one = mean_interval([5.0, None])
    assert (one.mean, one.half_width, one.n, one.text()) == (5.0, None, 1, "5.0")
    assert mean_interval([]).text() == "-"


def test_paired_test_of_hand_made_pairs():
    a, b = [80.0, 78.0, 79.0, 81.0], [77.0, 76.0, 78.0, 77.0]
    # differences 3, 2, 1, 4: mean 2.5, sd sqrt(5/3) = 1.2910, t = 2.5 / (1.2910 / 2) = 3.873
    test = paired_test(a, b)
    assert test.difference.mean == pytest.approx(2.5)
    assert test.t == pytest.approx(3.8730, abs=1e-4)
    assert test.difference.half_width == pytest.approx(3.182 * 1.29099 / 2, abs=1e-3)
    assert 0.02 < test.p < 0.05  # t 3.873 with 3 df: between the 0.05 (3.182) and 0.02 (4.541)
    assert paired_test([1.0], [0.0]).p is None
    with pytest.raises(ValueError):
        paired_test([1.0, 2.0], [1.0])
