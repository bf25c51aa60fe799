"""TRAINING schedule under a wall-clock cap: looping switches on at ENABLE_LOOPING_AT of the
wall clock and the warm-down follows the clock down to MIN_LR. Run: python3 -m pytest -q tests/test_schedule.py"""
from __future__ import annotations

import dataclasses

import pytest
import torch

import train_gpt as tg


def _run_with_fake_clock(h, rt, monkeypatch, seconds_per_step: float):
    now = {"t": 0.0}
    trainer = tg.Trainer(h, rt, clock=lambda: now["t"])
    seen = []

    def fake_step(step, scale):
        seen.append((step, scale, trainer.base.recurrence_active))
        now["t"] += seconds_per_step
        return torch.tensor(1.0)

    monkeypatch.setattr(trainer, "step", fake_step)
    monkeypatch.setattr(tg, "eval_val", lambda *a, **k: (0.0, 0.0))
    res = trainer.loop(None, None)
    return seen, res


def test_looping_and_warmdown_follow_the_wall_clock(tiny_h, rt_cpu, monkeypatch):
    h = dataclasses.replace(tiny_h, iterations=1000, max_wallclock_seconds=20.0, gptq_reserve_seconds=0.0,
                            enable_looping_at=0.35, warmdown_frac=0.5, min_lr=0.3, warmup_steps=0,
                            val_loss_every=0, train_log_every=0)
    seen, res = _run_with_fake_clock(h, rt_cpu, monkeypatch, seconds_per_step=1.0)
    assert 20 <= res.steps <= 21  # stopped by the 20 s cap, not by ITERATIONS=1000
    first_loop = next(s for s, _, active in seen if active)
    assert first_loop == 7  # 35 % of 20 s: the first step that starts at or after 7 s
    scales = {s: sc for s, sc, _ in seen}
    assert all(scales[s] == 1.0 for s in range(10))  # before the warm-down half
    assert scales[16] == pytest.approx((1 - 16 / 20) / 0.5)  # linear in the clock
    assert scales[18] == pytest.approx(0.3)  # the MIN_LR floor: linear would give 0.2
    assert min(scales.values()) == pytest.approx(0.3)


def test_without_a_cap_the_schedule_counts_steps(tiny_h, rt_cpu, monkeypatch):
    h = dataclasses.replace(tiny_h, iterations=40, max_wallclock_seconds=0.0, enable_looping_at=0.5,
                            warmdown_frac=0.25, min_lr=0.0, warmup_steps=0, val_loss_every=0, train_log_every=0)
    seen, res = _run_with_fake_clock(h, rt_cpu, monkeypatch, seconds_per_step=123.0)  # the clock is ignored
    assert res.steps == 40
    assert next(s for s, _, active in seen if active) == 20
    assert seen[-1][1] == pytest.approx(1 / 40 / 0.25)
