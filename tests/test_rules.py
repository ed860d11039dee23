"""Every rule: a case that triggers it and one just on the safe side of its threshold."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bncli.layers import BNLayer
from bncli.report import Severity
from bncli.rules import (
    RULES,
    RuleSelectionError,
    Thresholds,
    rule_by_key,
    run_file_rules,
    run_rules,
    select_rules,
)


def layer(mean=None, var=None, weight="default", bias="default", nbt=100, dtype="float32", name="bn") -> BNLayer:
    """A healthy 4-channel layer unless told otherwise."""
    np_dtype = np.float16 if dtype == "float16" else np.float32
    mean = np.array([0.1, -0.2, 0.3, 0.05] if mean is None else mean, dtype=np_dtype)
    var = np.array([0.5, 1.5, 2.0, 0.9] if var is None else var, dtype=np_dtype)
    weight = np.array([0.9, 1.1, 0.7, 1.3], dtype=np_dtype) if weight == "default" else weight
    bias = np.array([0.01, -0.02, 0.0, 0.1], dtype=np_dtype) if bias == "default" else bias
    if weight is not None:
        weight = np.asarray(weight, dtype=np_dtype)
    if bias is not None:
        bias = np.asarray(bias, dtype=np_dtype)
    return BNLayer(name, mean, var, weight, bias, nbt, dtype)


def hits(bn: BNLayer, rule_id: str, t: Thresholds = Thresholds()) -> list:
    return [f for f in run_rules(bn, t) if f.rule == rule_id]


def test_the_catalogue_is_stable():
    """Ids, names and severities are a public interface (CI configs name them): changing one is a breaking change."""
    assert [(r.id, r.name, r.severity.value) for r in sorted(RULES, key=lambda r: r.id)] == [
        ("BN001", "non-finite", "error"),
        ("BN002", "negative-variance", "error"),
        ("BN003", "never-updated", "error"),
        ("BN004", "collapsed-variance", "warning"),
        ("BN005", "dead-channel", "info"),
        ("BN006", "shape-mismatch", "error"),
        ("BN007", "converted-statistics", "info"),
        ("BN008", "exploding-statistics", "warning"),
        ("BN009", "low-precision-statistics", "warning"),
        ("BN010", "untrained-affine", "info"),
        ("BN011", "no-batchnorm", "info"),
        ("BN012", "pickled-code", "warning"),
        ("BN013", "default-channels", "warning"),
        ("BN014", "duplicate-statistics", "warning"),
        ("BN015", "fold-risk", "info"),
        ("BN016", "uneven-batch-counts", "warning"),
        ("BN017", "repeated-update", "warning"),
        ("BN018", "update-without-grad", "warning"),
        ("BN019", "not-updating", "info"),
    ]


def test_a_healthy_layer_has_no_finding():
    assert run_rules(layer()) == []


# --------------------------------------------------------------------------- BN006 shape-mismatch


def test_shape_mismatch_triggers_and_skips_the_per_channel_rules():
    bn = layer(var=[np.nan, 1.0, 1.0, 1.0], weight=[1.0, 1.0, 1.0])
    found = run_rules(bn)
    assert [(f.rule, f.message) for f in found] == [
        ("BN006", "lengths differ: running_mean 4, running_var 4, weight 3, bias 4")
    ]


def test_shape_mismatch_ignored_still_skips_the_other_rules():
    bn = layer(var=[np.nan, 1.0, 1.0, 1.0], weight=[1.0, 1.0, 1.0])
    assert run_rules(bn, selected=select_rules(ignore=["BN006"])) == []


def test_equal_lengths_and_affine_false_are_fine():
    assert hits(layer(weight=None, bias=None), "BN006") == []


def test_zero_channels_is_a_shape_finding():
    bn = layer(mean=[], var=[], weight=[], bias=[])
    assert [f.message for f in hits(bn, "BN006")] == ["the layer has 0 channels"]


# --------------------------------------------------------------------------- BN001 non-finite


def test_non_finite_names_field_kind_and_channels():
    bn = layer(mean=[0.0, np.nan, 0.1, 0.2], bias=[0.0, 0.0, np.inf, -np.inf])
    assert [(f.channels, f.message) for f in hits(bn, "BN001")] == [
        ((1,), "running_mean is NaN in channel(s) 1"),
        ((2, 3), "bias is Inf in channel(s) 2, 3"),
    ]


def test_largest_finite_float32_is_not_non_finite():
    big = float(np.finfo(np.float32).max)
    assert hits(layer(weight=[big, 1.0, 1.0, 1.0]), "BN001") == []


# --------------------------------------------------------------------------- BN002 negative-variance


def test_negative_variance_triggers_on_the_smallest_negative():
    found = hits(layer(var=[1.0, -1e-30, 1.0, 1.0]), "BN002")
    assert [(f.channels, f.severity) for f in found] == [((1,), Severity.ERROR)]


def test_zero_and_negative_zero_variance_are_not_negative():
    assert hits(layer(var=[0.0, -0.0, 1.0, 1.0]), "BN002") == []


# --------------------------------------------------------------------------- BN003 never-updated


def test_never_updated_triggers_on_exact_defaults():
    found = hits(layer(mean=[0, 0, 0, 0], var=[1, 1, 1, 1]), "BN003")
    assert len(found) == 1 and found[0].channels == ()


def test_one_channel_off_the_defaults_is_updated():
    assert hits(layer(mean=[0, 0, 0, 1e-12], var=[1, 1, 1, 1]), "BN003") == []
    assert hits(layer(mean=[0, 0, 0, 0], var=[1, 1, 1, np.float32(1.0000001)]), "BN003") == []


# --------------------------------------------------------------------------- BN004 collapsed-variance


def test_collapsed_variance_reports_the_resulting_scale():
    found = hits(layer(var=[1.0, 1e-8, 5e-6, 1.0]), "BN004")
    assert len(found) == 1 and found[0].channels == (1, 2) and found[0].severity is Severity.WARNING
    var = float(np.float32(1e-8))
    expected = 1.0 / math.sqrt(var + 1e-5)  # float64 reference: 316.07...
    assert f"reaches {expected:.4g} (channel 1, eps=1e-05)" in found[0].message
    assert found[0].message.startswith("running_var below 1e-05 in channel(s) 1, 2: the normalization scale 1/sqrt(")


def test_variance_at_eps_is_not_collapsed():
    eps32 = float(np.float32(1e-5))  # the float32 value just at the threshold, stored exactly
    assert hits(layer(var=[1.0, eps32, 1.0, 1.0]), "BN004", Thresholds(eps=eps32)) == []
    assert len(hits(layer(var=[1.0, float(np.nextafter(np.float32(eps32), 0)), 1.0, 1.0]), "BN004", Thresholds(eps=eps32))) == 1


def test_eps_zero_reports_a_zero_variance_as_an_infinite_scale():
    found = hits(layer(var=[1.0, 0.0, 1e-12, 1.0]), "BN004", Thresholds(eps=0.0))
    assert len(found) == 1 and found[0].channels == (1,)  # 1e-12 is not below eps 0, but 0 divides by zero
    assert found[0].message == ("running_var 0 in channel(s) 1: the normalization scale 1/sqrt(running_var + eps) "
                                "reaches inf (channel 1, eps=0)")
    assert hits(layer(var=[1.0, 0.5, 1e-12, 1.0]), "BN004", Thresholds(eps=0.0)) == []
    with_min = hits(layer(var=[1.0, 0.0, 1e-12, 1.0]), "BN004", Thresholds(eps=0.0, min_var=1e-5))
    assert with_min[0].channels == (1, 2) and "reaches inf (channel 1, eps=0)" in with_min[0].message


def test_min_var_moves_the_threshold_but_eps_stays_in_the_scale():
    t = Thresholds(eps=1e-5, min_var=1e-3)
    found = hits(layer(var=[1.0, 5e-4, 1.0, 1.0]), "BN004", t)
    expected = 1.0 / math.sqrt(float(np.float32(5e-4)) + 1e-5)
    assert f"reaches {expected:.4g}" in found[0].message and "below 0.001" in found[0].message
    assert hits(layer(var=[1.0, 1e-3 * 1.001, 1.0, 1.0]), "BN004", t) == []


# --------------------------------------------------------------------------- BN005 dead-channel


def test_dead_channels_count_and_sign():
    found = hits(layer(weight=[0.99e-3, -1e-4, 1.0, 1.0]), "BN005")
    assert [(f.channels, f.severity, f.message) for f in found] == [
        ((0, 1), Severity.INFO, "|weight| below 0.001 in 2 channel(s) (0, 1): they output a constant")
    ]


def test_weight_at_the_threshold_is_alive():
    assert hits(layer(weight=[1e-3, -1.01e-3, 1.0, 1.0]), "BN005", Thresholds(dead_weight=float(np.float32(1e-3)))) == []


# --------------------------------------------------------------------------- BN007 converted-statistics


def test_zero_batches_with_trained_statistics_is_a_conversion_note():
    found = hits(layer(nbt=0), "BN007")
    assert len(found) == 1 and found[0].severity is Severity.INFO and "converted from another framework" in found[0].message


def test_one_batch_or_no_counter_is_not_a_conversion():
    assert hits(layer(nbt=1), "BN007") == []
    assert hits(layer(nbt=None), "BN007") == []


def test_zero_batches_with_default_statistics_is_only_never_updated():
    found = run_rules(layer(mean=[0, 0, 0, 0], var=[1, 1, 1, 1], nbt=0))
    assert [f.rule for f in found] == ["BN003"]


# --------------------------------------------------------------------------- BN008 exploding-statistics


def test_exploding_variance_and_mean():
    found = hits(layer(mean=[0.0, -100.5, 0.0, 0.0], var=[1.0, 1.0, 10001.0, 1.0]), "BN008")
    assert [(f.channels, f.message) for f in found] == [
        ((2,), "running_var above 10000 in channel(s) 2 (max 1e+04)"),
        ((1,), "|running_mean| above 100 in channel(s) 1 (max 100.5)"),
    ]


def test_statistics_at_the_limits_are_not_exploding():
    assert hits(layer(mean=[100.0, -100.0, 0.0, 0.0], var=[1.0, 1.0, 1e4, 1.0]), "BN008") == []


def test_exploding_thresholds_are_tunable():
    t = Thresholds(max_var=1e6, max_mean=1e3)
    assert hits(layer(mean=[500.0, 0, 0, 0], var=[1.0, 1.0, 1e5, 1.0]), "BN008", t) == []
    assert len(hits(layer(mean=[500.0, 0, 0, 0], var=[1.0, 1.0, 1e5, 1.0]), "BN008", Thresholds(max_var=1e4, max_mean=499))) == 2


def test_inf_is_non_finite_not_exploding():
    assert hits(layer(var=[1.0, np.inf, 1.0, 1.0]), "BN008") == []


# --------------------------------------------------------------------------- BN009 low-precision-statistics


def test_float16_subnormal_variance():
    tiny = 2.0**-14  # float16's smallest normal, 6.1035e-05
    found = hits(layer(var=[1.0, tiny / 2, 1.0, 1.0], dtype="float16"), "BN009", Thresholds(min_var=0))
    assert [f.channels for f in found] == [(1,)]
    assert "stored as float16 and is below its smallest normal number 6.104e-05" in found[0].message
    assert np.finfo(np.float16).smallest_normal == tiny  # the constant agrees with numpy


def test_float16_smallest_normal_and_zero_are_fine():
    tiny = 2.0**-14
    assert hits(layer(var=[1.0, tiny, 1.0, 0.0], mean=[0.0, -tiny, 0.0, 0.0], dtype="float16"), "BN009") == []


def test_bfloat16_subnormal_mean():
    bn = layer(mean=[0.0, 1e-39, 0.0, 0.0], dtype="bfloat16")  # bfloat16 shares float32's exponent range
    assert [f.channels for f in hits(bn, "BN009")] == [(1,)]
    assert hits(layer(mean=[0.0, 2.0**-126, 0.0, 0.0], dtype="bfloat16"), "BN009") == []


def test_float32_subnormals_are_not_low_precision():
    assert hits(layer(mean=[0.0, 1e-40, 0.0, 0.0]), "BN009") == []


# --------------------------------------------------------------------------- BN010 untrained-affine


def test_untrained_affine():
    found = hits(layer(weight=[1, 1, 1, 1], bias=[0, 0, 0, 0]), "BN010")
    assert len(found) == 1 and found[0].severity is Severity.INFO


def test_almost_initial_affine_is_trained():
    assert hits(layer(weight=[1, 1, 1, np.float32(1.0000001)], bias=[0, 0, 0, 0]), "BN010") == []
    assert hits(layer(weight=[1, 1, 1, 1], bias=[0, 0, 0, 1e-7]), "BN010") == []


def test_untrained_affine_needs_trained_statistics_and_affine():
    assert hits(layer(mean=[0, 0, 0, 0], var=[1, 1, 1, 1], weight=[1, 1, 1, 1], bias=[0, 0, 0, 0]), "BN010") == []
    assert hits(layer(weight=None, bias=None), "BN010") == []


# --------------------------------------------------------------------------- BN011 no-batchnorm


def test_no_batchnorm_is_info_or_error_with_require_bn():
    assert [(f.rule, f.severity, f.layer) for f in run_file_rules([])] == [("BN011", Severity.INFO, None)]
    assert [f.severity for f in run_file_rules([], require_bn=True)] == [Severity.ERROR]


def test_a_file_with_one_layer_has_batchnorm():
    assert run_file_rules([layer()], require_bn=True) == []


def test_ignored_no_batchnorm_stays_silent_even_with_require_bn():
    assert run_file_rules([], selected=select_rules(ignore=["no-batchnorm"]), require_bn=True) == []


# --------------------------------------------------------------------------- BN013 default-channels


def test_default_channels_lists_the_untouched_channels():
    found = hits(layer(mean=[0.0, -0.2, 0.0, 0.05], var=[1.0, 1.5, 1.0, 0.9]), "BN013")
    assert [(f.severity, f.channels) for f in found] == [(Severity.WARNING, (0, 2))]
    assert found[0].message.startswith("2 of 4 channel(s) (0, 2) still hold exactly the initial running_mean 0 and running_var 1")


def test_default_channels_needs_both_exact_values():
    tiny = float(np.nextafter(np.float32(0), np.float32(1)))
    one_up = float(np.nextafter(np.float32(1), np.float32(2)))
    assert hits(layer(mean=[tiny, -0.2, 0.3, 0.05], var=[1.0, 1.5, 2.0, 0.9]), "BN013") == []  # mean one ulp off 0
    assert hits(layer(mean=[0.0, -0.2, 0.3, 0.05], var=[one_up, 1.5, 2.0, 0.9]), "BN013") == []  # var one ulp off 1
    assert hits(layer(mean=[0.0, -0.2, 0.3, 0.05], var=[0.9, 1.5, 2.0, 0.9]), "BN013") == []  # a mean of 0 alone is fine


def test_every_channel_default_is_never_updated_not_default_channels():
    assert [f.rule for f in run_rules(layer(mean=[0.0] * 4, var=[1.0] * 4))] == ["BN003"]


def test_default_channels_with_negative_zero_mean():
    # -0.0 == 0: a channel zeroed by a kernel that wrote -0.0 is still at its initial value
    assert hits(layer(mean=[-0.0, -0.2, 0.3, 0.05], var=[1.0, 1.5, 2.0, 0.9]), "BN013")[0].channels == (0,)


# --------------------------------------------------------------------------- BN014 duplicate-statistics


def test_duplicate_statistics_names_both_layers():
    a, b, c = layer(name="model.bn"), layer(name="ema.bn"), layer(mean=[0.1, -0.2, 0.3, 0.06], name="other")
    found = [f for f in run_file_rules([a, c, b]) if f.rule == "BN014"]
    assert [(f.severity, f.layer, f.channels) for f in found] == [(Severity.WARNING, "model.bn", ())]
    assert found[0].message.startswith("model.bn and ema.bn have bit-identical running_mean and running_var (4 channels)")


def test_duplicate_statistics_groups_more_than_two():
    group = [layer(name=f"l{i}") for i in range(3)] + [layer(var=[2.0] * 4, name="x"), layer(var=[2.0] * 4, name="y")]
    found = [f for f in run_file_rules(group) if f.rule == "BN014"]
    assert [f.layer for f in found] == ["l0", "x"]
    assert found[0].message.startswith("3 layers (l0, l1, l2) have bit-identical")
    assert found[1].message.startswith("x and y have bit-identical")


def test_one_ulp_apart_or_another_size_is_not_a_duplicate():
    var = np.array([0.5, 1.5, 2.0, 0.9], dtype=np.float32)
    nudged = var.copy()
    nudged[3] = np.nextafter(nudged[3], np.float32(2))
    assert run_file_rules([layer(var=var, name="a"), layer(var=nudged, name="b")]) == []
    mean_nudged = np.nextafter(np.float32(0.05), np.float32(1))
    assert run_file_rules([layer(name="a"), layer(mean=[0.1, -0.2, 0.3, mean_nudged], name="b")]) == []
    small = BNLayer("s", np.array([0.1, -0.2], np.float32), np.array([0.5, 1.5], np.float32), None, None, 1, "float32")
    big = BNLayer("t", np.array([0.1, -0.2, 0.1, -0.2], np.float32), np.array([0.5, 1.5, 0.5, 1.5], np.float32), None, None, 1,
                  "float32")
    assert run_file_rules([small, big]) == []


def test_never_updated_layers_are_not_duplicates():
    defaults = [layer(mean=[0.0] * 4, var=[1.0] * 4, name=n) for n in ("a", "b")]
    assert run_file_rules(defaults) == []


def test_duplicate_statistics_flags_the_layer_in_the_report(make_ckpt):
    from conftest import bn_state

    from bncli.audit import inspect_file

    sd = bn_state(prefix="model.bn", seed=1)
    sd.update(bn_state(prefix="ema.bn", seed=1))
    sd.update(bn_state(prefix="head.bn", seed=2))
    report = inspect_file(make_ckpt(sd))
    assert [(f.rule, f.layer) for f in report.findings] == [("BN014", "model.bn")]
    assert [layer.flags for layer in report.layers] == [("duplicate-statistics",), (), ()]


# --------------------------------------------------------------------------- BN015 fold-risk


def _fold_scales(bn: BNLayer, eps: float) -> np.ndarray:
    """The float64 reference: |gamma| / sqrt(var + eps), gamma 1 without affine."""
    gamma = np.ones(bn.running_var.size) if bn.weight is None else np.abs(bn.weight.astype(np.float64))
    return gamma / np.sqrt(bn.running_var.astype(np.float64) + eps)


def test_fold_risk_reports_the_spread_and_the_channels():
    bn = layer(var=[0.5, 1.5, 1e-7, 0.9], weight=[0.9, 1.1, 0.7, 1.3])
    scales = _fold_scales(bn, 1e-5)
    median = float(np.median(scales))
    found = hits(bn, "BN015")
    assert [(f.severity, f.channels) for f in found] == [(Severity.INFO, (2,))]
    assert found[0].message.startswith(
        f"the folded scale |weight|/sqrt(running_var + eps) reaches {scales[2]:.4g} in channel 2, "
        f"{scales[2] / median:.4g}x the median {median:.4g} (eps=1e-05); above 100x the median in channel(s) 2"
    )
    assert "float16" not in found[0].message


def f64_layer(var, weight=None) -> BNLayer:
    var = np.asarray(var, np.float64)
    weight = None if weight is None else np.asarray(weight, np.float64)
    return BNLayer("bn", np.full(var.size, 0.1), var, weight, None, 100, "float64")


def test_fold_risk_on_both_sides_of_the_spread_threshold():
    # channels 0, 1, 3 have scale 1 (var + eps = 1) and so does the median; channel 2's scale is `ratio`
    def at(ratio: float) -> BNLayer:
        return f64_layer([1 - 1e-5, 1 - 1e-5, 1 / ratio**2 - 1e-5, 1 - 1e-5])

    assert hits(at(99.0), "BN015") == []
    assert [f.channels for f in hits(at(101.0), "BN015")] == [(2,)]
    assert hits(at(101.0), "BN015", Thresholds(max_fold_spread=102)) == []
    assert [f.channels for f in hits(at(101.0), "BN015", Thresholds(max_fold_spread=100.5))] == [(2,)]


def test_fold_risk_float16_overflow_without_a_large_spread():
    # every channel scaled alike (no spread) but beyond 65504: a half-precision export overflows
    big = f64_layer([1.0, 1.0], weight=[7e4, 6.5e4])
    found = hits(big, "BN015")
    assert [f.channels for f in found] == [(0,)]
    assert "above float16's largest value 65504 in channel(s) 0: a half-precision export overflows" in found[0].message
    assert "int8" not in found[0].message
    under = f64_layer([1.0, 1.0], weight=[65504 * (1 + 1e-5) ** 0.5] * 2)
    assert hits(under, "BN015") == []  # exactly 65504 after eps: not above


def test_fold_risk_uses_eps_and_affine_false():
    bn = layer(var=[1.0, 1.0, 0.0, 1.0], weight=None, bias=None)
    assert [f.channels for f in hits(bn, "BN015")] == [(2,)]  # 1/sqrt(1e-5) = 316x
    assert hits(bn, "BN015", Thresholds(eps=1e-3)) == []  # 1/sqrt(1e-3) = 31.6x


def test_fold_risk_ignores_dead_invalid_and_default_layers():
    dead = layer(var=[0.5, 1.5, 2.0, 0.9], weight=[0.0, 1e-9, 1.0, 1.0])  # tiny scales are BN005's, not a spread
    assert hits(dead, "BN015") == []
    broken = layer(var=[np.nan, -1.0, 2.0, 0.9])
    assert hits(broken, "BN015") == []
    assert hits(layer(mean=[0.0] * 4, var=[1.0] * 4), "BN015") == []


def test_clean_sample_has_no_new_finding():
    from conftest import SAMPLES

    from bncli.audit import inspect_file

    for name in ("model.pt", "model.safetensors"):
        assert inspect_file(SAMPLES / name).findings == ()


# --------------------------------------------------------------------------- selection


def test_select_and_ignore_accept_ids_names_case_and_commas():
    assert select_rules(["bn001,dead-channel"], None) == {"BN001", "BN005"}
    assert select_rules(["BN001", "BN005"], ["dead-channel"]) == {"BN001"}
    assert select_rules(None, ["BN011"]) == {r.id for r in RULES} - {"BN011"}
    assert select_rules([], []) == {r.id for r in RULES}


def test_unknown_rule_suggests_the_nearest():
    with pytest.raises(RuleSelectionError) as info:
        rule_by_key("dead-chanel")
    assert info.value.message == "unknown rule 'dead-chanel'; did you mean dead-channel, default-channels?"
    with pytest.raises(RuleSelectionError) as info:
        rule_by_key("zzz")
    assert info.value.message.startswith("unknown rule 'zzz'; known rules: BN006, BN001")


def test_selected_rules_only_are_reported():
    bn = layer(var=[1.0, 1e-8, -1.0, 1.0], weight=[0.0, 1.0, 1.0, 1.0])
    assert {f.rule for f in run_rules(bn)} == {"BN002", "BN004", "BN005"}
    assert {f.rule for f in run_rules(bn, selected=select_rules(["BN004"]))} == {"BN004"}


def test_select_and_ignore_leaving_no_rule_is_a_usage_error(cli):
    from conftest import SAMPLES

    result = cli("inspect", SAMPLES / "model_defects.pt", "--select", "never-updated", "--ignore", "BN003")
    assert result.exit_code == 2
    assert result.stderr == "error: --select and --ignore leave no rule to run\n"


def test_a_layer_that_knows_its_eps_uses_it_over_the_option():
    """A whole pickled model stores each layer's eps: BN004 and BN015 use it, --eps only for layers without one."""
    import dataclasses

    bn = layer(var=[1.0, 1.0, 0.0, 1.0], weight=None, bias=None)
    assert [f.channels for f in hits(bn, "BN015")] == [(2,)]  # 1/sqrt(1e-5): 316x the median
    own = dataclasses.replace(bn, eps=1e-3)
    assert hits(own, "BN015") == []  # 1/sqrt(1e-3): 31.6x
    assert hits(own, "BN015", Thresholds(eps=1e-7)) == []  # the layer's own eps wins
    assert "eps=0.001" in hits(own, "BN004", Thresholds(min_var=1e-2))[0].message


def test_fold_risk_with_eps_0_and_a_zero_variance_says_infinite():
    bn = layer(var=[1.0, 0.0, 2.0, 1.5], weight=[1.0, 1.0, 1.0, 1.0])
    found = hits(bn, "BN015", Thresholds(eps=0.0))
    assert [f.channels for f in found] == [(1,)]
    assert found[0].message.startswith("the folded scale |weight|/sqrt(running_var + eps) is infinite in channel 1 "
                                       "(running_var + eps is 0), against a median of ")
    assert "above float16's largest value 65504 in channel(s) 1" in found[0].message
