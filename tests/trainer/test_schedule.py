import itertools
import math

import pytest

from trainer.schedule import lr_factor


def f(step, warmup=100, total=1000, final=0.1):
    return lr_factor(step, warmup_steps=warmup, max_steps=total, final_lr_ratio=final)


def test_warmup_start_and_end():
    assert f(0) == pytest.approx(0.01)
    assert f(49) == pytest.approx(0.5)
    assert f(99) == pytest.approx(1.0)


def test_mid_cosine_and_end():
    # Halfway through the decay the cosine term is 1/2: factor = final + (1 - final) / 2.
    assert f(100 + 450 - 1) == pytest.approx(0.1 + 0.9 * 0.5)
    assert f(999) == pytest.approx(0.1)
    assert f(5000) == pytest.approx(0.1)  # past the end it stays at the floor


def test_monotone_decay_and_closed_form():
    values = [f(s) for s in range(100, 1000)]
    assert all(a >= b for a, b in itertools.pairwise(values))
    s = 700
    progress = (s - 100 + 1) / 900
    assert f(s) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def test_no_warmup():
    assert f(0, warmup=0) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 1000)))


def test_first_decay_step_is_below_the_peak():
    # Step warmup_steps is the first cosine step: progress 1/900, never above the peak (no 101/100 overshoot).
    assert f(100) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 900)))
    assert f(100) < 1.0
