"""The benchmark runs and reports its figures (their values are measured, never asserted)."""
import math

from conftest import ROOT

from cmpipe.bench import distill_step


def test_distill_step_reports_rates_ratio_and_metric_costs():
    out = distill_step(batch_size=4, steps=1, metric="lpips", params_file=str(ROOT / "params-smoke.yaml"),
                       device="cpu", lpips_resize=32, compare_metrics=True)
    assert out["metric"] == "lpips" and out["lpips_resize"] == 32
    assert set(out["cached_images_per_sec_by_metric"]) == {"l2", "pseudo_huber", "lpips"}
    rates = [out["cached_images_per_sec"], out["online_images_per_sec"],
             *out["cached_images_per_sec_by_metric"].values()]
    assert all(math.isfinite(r) and r > 0 for r in rates)
    assert out["ratio"] > 0 and out["step_time_relative_to_l2"]["l2"] == 1.0
    assert out["peak_rss_mb"] > 0
