"""The mixed-precision search shared by the INT8 exporters (edgetl.host.sensitivity), on a problem whose answer is
known: each float convolution kept removes part of the quantization noise."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.host
pytest.importorskip("torch")  # edgetl.host needs the host extra

from edgetl.host.sensitivity import PLATEAU, Trial, candidates, first_float_convs, mean_cosine

REFERENCE = np.random.default_rng(0).normal(size=(32, 64))
NOISE = np.random.default_rng(1).normal(size=(32, 64))


def _quantize(noise_by_k: list[float], calls: list[int]):  # type: ignore[no-untyped-def]
    def quantize(k: int) -> np.ndarray:
        calls.append(k)
        return REFERENCE + noise_by_k[k] * NOISE
    return quantize


def test_mean_cosine_of_equal_and_opposite_rows() -> None:
    assert mean_cosine(REFERENCE, 3 * REFERENCE) == pytest.approx(1.0)
    assert mean_cosine(REFERENCE, -REFERENCE) == pytest.approx(-1.0)


def test_the_smallest_k_that_reaches_the_target_is_kept_and_no_more_are_tried() -> None:
    calls: list[int] = []
    noise = [1.0, 0.5, 0.1, 0.05, 0.01]
    search = first_float_convs(_quantize(noise, calls), lambda e: e, REFERENCE, range(5), target=0.99)
    expected = [mean_cosine(REFERENCE, REFERENCE + n * NOISE) for n in noise]
    k = next(i for i, c in enumerate(expected) if c >= 0.99)
    assert calls == list(range(k + 1)) and search.kept.float_convs == k
    np.testing.assert_array_equal(search.quantized, REFERENCE + noise[k] * NOISE)
    assert [t.calibration_mean_cosine for t in search.trials] == [round(c, 5) for c in expected[:k + 1]]


def test_the_best_k_is_kept_when_none_reaches_the_target() -> None:
    calls: list[int] = []
    noise = [1.0, 0.3, 0.6, 0.8]  # k = 1 is best; a later k can be worse
    search = first_float_convs(_quantize(noise, calls), lambda e: e, REFERENCE, [0, 1, 2, 3], target=0.9999)
    assert calls == [0, 1, 2, 3] and search.kept == search.trials[1] and search.kept.float_convs == 1
    np.testing.assert_array_equal(search.quantized, REFERENCE + 0.3 * NOISE)
    record = search.record(0.9999)
    assert record["sensitivity"][1] == {"float_convs": 1, "calibration_mean_cosine": search.trials[1].calibration_mean_cosine}
    assert record["mixed_precision"]["target_calibration_cosine"] == 0.9999
    assert record["mixed_precision"]["candidates"] == [0, 1, 2, 3]


def test_candidates_follow_the_steps_the_graph_allows() -> None:
    calls: list[int] = []
    noise = {0: 1.0, 2: 0.5, 8: 0.001}
    search = first_float_convs(lambda k: calls.append(k) or REFERENCE + noise[k] * NOISE, lambda e: e, REFERENCE,
                               candidates((0, 2, 8, 12), n_convs=10), target=0.999)
    assert calls == [0, 2, 8] and search.kept.float_convs == 8 and search.candidates == [0, 2, 8]
    with pytest.raises(ValueError):
        first_float_convs(lambda k: REFERENCE, lambda e: e, REFERENCE, [], target=0.5)


def test_zero_float_convs_allowed_is_one_trial() -> None:
    search = first_float_convs(lambda k: REFERENCE + NOISE, lambda e: e, REFERENCE, [0], target=1.0)
    assert search.trials == [search.kept] and isinstance(search.kept, Trial) and search.kept.float_convs == 0


def test_without_a_k_reaching_the_target_the_smallest_k_on_the_plateau_is_kept() -> None:
    # k = 3 is the best by less than the plateau over k = 1: the float convolutions k = 2, 3 would buy nothing
    cosines = {}
    noise = {0: 1.0, 1: 0.2005, 2: 0.6, 3: 0.2}
    for k, n in noise.items():
        cosines[k] = mean_cosine(REFERENCE, REFERENCE + n * NOISE)
    assert 0 < cosines[3] - cosines[1] < PLATEAU and cosines[3] == max(cosines.values())
    search = first_float_convs(lambda k: REFERENCE + noise[k] * NOISE, lambda e: e, REFERENCE, [0, 1, 2, 3],
                               target=0.9999)
    assert len(search.trials) == 4 and search.kept.float_convs == 1
    np.testing.assert_array_equal(search.quantized, REFERENCE + noise[1] * NOISE)
    assert search.record(0.9999)["mixed_precision"]["plateau"] == PLATEAU
