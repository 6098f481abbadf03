import numpy as np
import pytest

from entruth_lite.owner import verify


def test_paired_test_detects_a_shift_and_not_noise():
    rng = np.random.default_rng(0)
    control = rng.normal(0, 0.1, 64)
    shifted = verify.paired_test(control + 0.2 + rng.normal(0, 0.05, 64), control)
    assert shifted.p_value < 1e-6 and shifted.decision and shifted.evidence
    same = verify.paired_test(control, control)
    assert same.p_value == 1.0 and not same.decision


@pytest.mark.parametrize("test", ["paired", "reference", "binomial"])
def test_false_positive_rate_under_the_null_is_at_most_alpha(test):
    """Scores drawn from one distribution (null true): the share of rejections stays within alpha + noise."""
    rng = np.random.default_rng(1)
    alpha, trials, rejected = 0.05, 400, 0
    for _ in range(trials):
        a, b = rng.normal(size=32), rng.normal(size=32)
        if test == "paired":
            verdict = verify.paired_test(a, b, alpha)
        elif test == "reference":
            verdict = verify.reference_test(a, b, alpha)
        else:
            negatives = rng.normal(size=200)
            verdict = verify.binomial_test(a, verify.calibrate_threshold(negatives, 0.1), negatives, alpha)
        rejected += verdict.decision
    noise = 3 * np.sqrt(alpha * (1 - alpha) / trials)
    assert rejected / trials <= alpha + noise


def test_reference_test_detects_a_suspect():
    rng = np.random.default_rng(2)
    verdict = verify.reference_test(rng.normal(1.5, 1, 32), rng.normal(0, 1, 32))
    assert verdict.p_value < 1e-3 and verdict.test == "reference"


def test_calibrated_threshold_bounds_the_empirical_fpr_even_with_ties():
    negatives = np.array([0.0] * 50 + [0.1] * 30 + [0.2] * 20)
    for fpr in (0.01, 0.05, 0.2, 0.3):
        threshold = verify.calibrate_threshold(negatives, fpr)
        assert (negatives >= threshold).mean() <= fpr
    with pytest.raises(ValueError, match="fpr"):
        verify.calibrate_threshold(negatives, 1.5)


def test_binomial_test_counts_detections_against_a_conservative_null_rate():
    negatives = np.linspace(0, 1, 100)
    threshold = verify.calibrate_threshold(negatives, 0.05)
    verdict = verify.binomial_test(np.array([0.99] * 20 + [0.1] * 44), threshold, negatives)
    assert verdict.detections == 20 and verdict.n_queries == 64
    assert verdict.statistic > 0.05  # the upper bound is above the empirical rate
    assert verdict.p_value < 0.01 and verdict.evidence == list(range(20))


def test_bad_scores_are_refused():
    with pytest.raises(ValueError, match="differ in length"):
        verify.paired_test([1, 2], [1])
    with pytest.raises(ValueError, match="NaN"):
        verify.reference_test([np.nan], [0.0])
    with pytest.raises(ValueError, match="non-empty"):
        verify.paired_test([], [])


def test_conformal_p_values_are_valid_and_exact_under_the_null():
    rng = np.random.default_rng(1)
    negatives = rng.normal(size=99)
    # a null query is exchangeable with the negatives: P(p <= 0.05) = 5/100 exactly over draws
    p = np.array([verify.conformal_p_values([rng.normal()], rng.normal(size=99))[0] for _ in range(4000)])
    assert abs((p <= 0.05).mean() - 0.05) < 0.012
    assert verify.conformal_p_values([100.0], negatives)[0] == 1 / 100
    assert verify.conformal_p_values([-100.0], negatives)[0] == 1.0


def test_one_query_test_is_corrected_for_picking_the_best_of_n():
    rng = np.random.default_rng(2)
    flagged = [verify.one_query_test(rng.normal(size=16), rng.normal(size=400), alpha=0.05).decision
               for _ in range(1500)]
    assert np.mean(flagged) <= 0.05 + 0.015
    strong = verify.one_query_test([0.0, 9.0, 0.1], rng.normal(size=999), alpha=0.01)
    assert strong.decision and strong.evidence == [1] and strong.p_value == pytest.approx(3 / 1000)


def test_decoy_test_is_exact_under_exchangeability_and_detects_a_standout():
    rng = np.random.default_rng(3)
    p = np.array([verify.decoy_test(*(lambda x: (x[0], x[1:]))(rng.normal(size=100)), n_queries=8).p_value
                  for _ in range(3000)])
    assert abs((p <= 0.05).mean() - 0.05) < 0.012
    assert verify.decoy_test(5.0, rng.normal(size=999), n_queries=64).p_value == pytest.approx(1e-3)
    tie = verify.decoy_test(1.0, [1.0, 0.0, 0.0], n_queries=4)
    assert tie.p_value == 0.5  # ties count against the owner


def test_roc_curve_and_auc():
    fpr, tpr, auc = verify.roc_curve([3.0, 4.0, 5.0], [0.0, 1.0, 2.0])
    assert auc == 1.0 and tpr[-1] == 1.0 and fpr[-1] == 1.0 and np.all(np.diff(fpr) >= 0)
    assert verify.roc_curve([1.0, 1.0], [1.0, 1.0])[2] == 0.5
    _, _, mixed = verify.roc_curve([0.0, 2.0], [1.0, 3.0])
    assert mixed == 0.25


def test_measured_power_reads_the_nearest_measured_rate():
    import pandas as pd

    table = pd.DataFrame(dict(rate=[0.02, 0.01, 0.01, 0.005], test=["decoy (projection)"] * 2 + ["binomial (projection)",
                              "decoy (projection)"], n=[64, 64, 64, 64], detected=[3, 2, 1, 0], seeds=[3, 3, 3, 3],
                              median_p=[1e-3, 1e-3, 0.2, 0.3]))
    assert verify.measured_power(table, 0.00995).startswith("1.00%: measured at this rate, the decoy (projection) test "
                                                          "detected 2 of 3")
    assert "nearest measured rate 2.0%" in verify.measured_power(table, 0.017)
    assert "detected 0 of 3" in verify.measured_power(table, 0.001) and "below every measured rate" in \
        verify.measured_power(table, 0.001)
    assert "above every measured rate" in verify.measured_power(table, 0.3)
    assert "detected 1 of 3" in verify.measured_power(table, 0.01, test="binomial (projection)")
    with pytest.raises(ValueError, match="no rows for test 'nope'"):
        verify.measured_power(table, 0.01, test="nope")


def test_summarize_memorization_counts_detected_seeds_per_setting_and_rate():
    import pandas as pd

    table = pd.DataFrame(dict(setting=["full", "full", "full", "lora", "lora"], rate=[0.01, 0.01, 0.01, 0.01, 0.02],
                              seed=[0, 1, 2, 0, 0], decoy_p=[0.001, 0.2, 0.009, 0.011, 0.001],
                              binomial_flagged=[32, 0, 16, 4, 48], train_seconds=[360, 420, 300, 600, 540],
                              resumed_from_step=[0, 0, 0, 500, 0]))
    summary = verify.summarize_memorization(table).set_index(["setting", "rate"])
    assert summary.loc[("full", 0.01), "seeds"] == 3 and summary.loc[("full", 0.01), "detected"] == 2
    assert summary.loc[("lora", 0.01), "detected"] == 0, "0.011 is not below alpha = 0.01"
    assert np.isnan(summary.loc[("lora", 0.01), "train_minutes"]), "a resumed run timed only its last part"
    assert summary.loc[("full", 0.01), "flagged_share"] == 0.25 and summary.loc[("full", 0.01), "train_minutes"] == 5
    assert verify.summarize_memorization(table, alpha=0.05).set_index(["setting", "rate"]).loc[("lora", 0.01), "detected"] == 1
    with pytest.raises(ValueError, match="decoy_p"):
        verify.summarize_memorization(table.drop(columns="decoy_p"))


def test_summarize_query_budget_counts_seeds_detected_per_rate_and_query_count():
    import pandas as pd

    table = pd.DataFrame(dict(rate=[0.01] * 4 + [0.02] * 2, queries=[4, 4, 64, 64, 4, 64], seed=[0, 1, 0, 1, 0, 0],
                              p_value=[0.3, 0.009, 1e-4, 0.01, 0.02, 1e-6], max_decoys=[99_999] * 4 + [999_999] * 2))
    summary = verify.summarize_query_budget(table).set_index(["rate", "queries"])
    assert summary.loc[(0.01, 4), "detected"] == 1 and summary.loc[(0.01, 64), "detected"] == 1, "0.01 is not below"
    assert summary.loc[(0.01, 4), "worst_p"] == 0.3 and summary.loc[(0.01, 64), "median_p"] == pytest.approx(0.00505)
    assert summary.loc[(0.02, 64), "max_decoys"] == 999_999 and summary.loc[(0.01, 4), "seeds"] == 2
    with pytest.raises(ValueError, match="p_value"):
        verify.summarize_query_budget(table.drop(columns="p_value"))


def _sequential(released, decoys, chunk, max_decoys, stop_after):
    chunks = [decoys[i:i + chunk] for i in range(0, len(decoys), chunk)]
    return verify.sequential_decoy_test(released, chunks, 8, max_decoys, stop_after)


def test_sequential_decoy_test_is_the_fixed_k_test_when_few_decoys_reach_the_released():
    rng = np.random.default_rng(3)
    decoys = rng.normal(size=999)
    released = float(np.sort(decoys)[-7])  # 7 decoys at or above it (ties count against it)
    fixed = verify.decoy_test(released, decoys, 8)
    for chunk in (1, 64, 999):
        sequential = _sequential(released, decoys, chunk, 999, stop_after=20)
        assert (sequential.p_value, sequential.draws, sequential.at_least) == (fixed.p_value, 999, 7) == (8 / 1000, 999, 7)
    assert fixed.floor == sequential.floor == pytest.approx(1 / 1000)


def test_sequential_decoy_test_stops_at_the_hth_decoy_that_reaches_the_released():
    decoys = np.array([0.1, 0.9, 0.2, 0.6, 0.3, 0.8, 0.7, 0.0])
    for chunk in (1, 3, 8):
        verdict = _sequential(0.5, decoys, chunk, 1000, stop_after=3)
        assert (verdict.draws, verdict.at_least, verdict.p_value) == (6, 3, 3 / 6)  # the 3rd hit is the 6th decoy
        assert verdict.floor == pytest.approx(1 / 1001), "the floor is what it could have reached"
    assert _sequential(0.5, decoys, 3, 5, stop_after=3).p_value == pytest.approx((1 + 2) / (5 + 1)), "capped at K"
    with pytest.raises(ValueError, match="no decoy statistics"):
        verify.sequential_decoy_test(0.5, [], 8, 10)


def test_sequential_decoy_p_value_has_the_exact_null_distribution():
    """Besag & Clifford: under exchangeability P(p <= h / l) = h / l at the values p takes (continuous statistics)."""
    rng = np.random.default_rng(0)
    replicates, k, h = 20000, 199, 5
    values = rng.normal(size=(replicates, k + 1))
    p = np.array([verify.sequential_decoy_test(row[0], [row[1:]], 8, k, h).p_value for row in values])
    for u in (h / 10, h / 25, h / 100, 1 / (k + 1) * 4):
        observed = (p <= u + 1e-12).mean()
        assert abs(observed - u) < 4 * np.sqrt(u * (1 - u) / replicates) + 1e-3, (u, observed)
