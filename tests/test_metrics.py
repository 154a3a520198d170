"""AA, F.Ra and BWT on a matrix computed by hand."""

import pytest

from nlora.metrics import average_accuracy, backward_transfer, forgetting, summarize

# a[i][j]: task i after training task j
MATRIX = [
    [80.0, 70.0, 60.0],
    [None, 90.0, 85.0],
    [None, None, 50.0],
]


def test_average_accuracy_is_the_mean_of_the_last_column():
    assert average_accuracy(MATRIX) == pytest.approx((60 + 85 + 50) / 3)


def test_forgetting_uses_each_task_best_before_the_end():
    # task 1: max(80, 70) - 60 = 20; task 2: max(90) - 85 = 5
    assert forgetting(MATRIX) == pytest.approx((20 + 5) / 2)


def test_forgetting_takes_the_max_not_the_first_value():
    matrix = [[50.0, 70.0, 65.0], [None, 40.0, 40.0], [None, None, 10.0]]
    # task 1: max(50, 70) - 65 = 5; task 2: 40 - 40 = 0
    assert forgetting(matrix) == pytest.approx(2.5)


def test_backward_transfer_compares_final_with_just_learned():
    # (60 - 80) + (85 - 90) over 2
    assert backward_transfer(MATRIX) == pytest.approx(-12.5)


def test_one_task_has_no_forgetting():
    assert summarize([[42.0]]) == {"AA": 42.0, "F.Ra": None, "BWT": None}


def test_missing_entry_is_reported():
    with pytest.raises(ValueError, match="task 2 after step 3"):
        average_accuracy([[1.0, 1.0, 1.0], [None, 1.0, None], [None, None, 1.0]])
