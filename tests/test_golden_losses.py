"""The tiny preset's first losses on the CPU, through the real entry point, equal the golden file's.

Any change to the numbers of the model, optimizer, data pipeline or loop shows here; an intended one is
recorded with `make golden-losses` (tests/golden_losses.py says what the run is).
"""
import json

from tests.golden_losses import DATA_OVERRIDE, GOLDEN_FILE, OVERRIDES, PRESET, REGENERATE, golden_losses

# Losses are ~5-6: 1e-5 is exact up to the last-bit differences between CPU vector units, accumulated over
# 10 steps; an intended numerical change moves them far more (the chunked head loss: up to 1.6e-3).
ATOL = 1e-5


def test_tiny_cpu_losses_match_the_golden_file(tmp_path):
    golden = json.loads(GOLDEN_FILE.read_text())
    assert (golden["preset"], golden["overrides"]) == (PRESET, [*OVERRIDES, DATA_OVERRIDE]), (
        f"{GOLDEN_FILE} records another run than tests/golden_losses.py makes; regenerate it: {REGENERATE}")
    losses = golden_losses(tmp_path)
    expected = golden["losses"]
    assert len(losses) == len(expected), (
        f"the run logged {len(losses)} steps, the golden file has {len(expected)}; regenerate it: {REGENERATE}")
    off = [(step, got, want) for step, (got, want) in enumerate(zip(losses, expected), start=1)
           if not abs(got - want) <= ATOL]
    if off:
        step, got, want = off[0]
        raise AssertionError(
            f"step {step}: loss {got!r}, golden {want!r} (|diff| {abs(got - want):.3g} > {ATOL:g}); "
            f"{len(off)} of {len(losses)} steps differ (steps {[s for s, _, _ in off]}). If the change in the "
            f"numbers is intended, regenerate {GOLDEN_FILE.name} with `{REGENERATE}` and commit it.")
