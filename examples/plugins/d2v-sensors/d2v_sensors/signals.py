"""Synthetic 3-axis accelerometer recordings of six activities (human-activity-recognition style).

Each activity is a periodic (or bursty) motion pattern in the body frame -- vertical, forward,
lateral -- defined by its cadence and by the *shape* of the movement (harmonics, step
alternation, quadrature, impulses). Cadences overlap between activities, so the class is not
readable from one frequency peak; every recording also gets its own nuisance variation: cadence
drift, phase, amplitude, device orientation (yaw anywhere, tilt up to 35 degrees), gravity
seen through that orientation, sensor noise and a slow baseline wander.

Everything is a function of a numpy ``Generator``: the same seed gives the same recording.
Values are in units of g; the layout is ``(time, 3)`` float32.
"""

from __future__ import annotations

import numpy as np

ACTIVITIES = ("walk", "run", "cycle", "stairs", "jump", "idle")
SAMPLE_RATE = 50.0  # Hz, a common wearable accelerometer rate
MAX_TILT = np.deg2rad(35.0)


def _phase(rng: np.random.Generator, t: np.ndarray, low: float, high: float) -> np.ndarray:
    """Cumulative phase (radians) of a cadence drawn in ``[low, high]`` Hz that drifts slowly
    (up to +-8 % over a random period of 3 to 10 s), from a random start."""
    cadence = rng.uniform(low, high)
    drift = rng.uniform(0.0, 0.08) * np.sin(2 * np.pi * t / rng.uniform(3.0, 10.0) + rng.uniform(0, 2 * np.pi))
    frequency = cadence * (1.0 + drift)
    dt = t[1] - t[0] if len(t) > 1 else 1.0 / SAMPLE_RATE
    return 2 * np.pi * np.cumsum(frequency) * dt + rng.uniform(0, 2 * np.pi)


def _walk(rng, t):
    p = _phase(rng, t, 1.5, 2.1)
    return np.stack([np.sin(p) + 0.45 * np.sin(2 * p + 0.6), 0.6 * np.cos(p), 0.3 * np.sin(p / 2)], axis=1)


def _run(rng, t):
    p = _phase(rng, t, 2.0, 2.8)
    impact = np.maximum(np.sin(p), 0.0) ** 4  # short, sharp foot strikes
    return np.stack([2.2 * impact - 0.6, 0.8 * np.sin(p + 0.4), 0.35 * np.sin(p / 2)], axis=1)


def _cycle(rng, t):
    p = _phase(rng, t, 1.2, 1.9)
    return np.stack([0.2 * np.sin(2 * p), 0.6 * np.sin(p), 0.6 * np.cos(p)], axis=1)  # pedalling circle


def _stairs(rng, t):
    p = _phase(rng, t, 1.3, 1.9)
    stride = 1.0 + 0.6 * np.sin(p / 2)  # one leg lifts the body, the other follows: alternating steps
    return np.stack([stride * np.sin(p) + 0.3 * np.sin(2 * p), 0.35 * np.cos(p), 0.3 * np.sin(p / 2)], axis=1)


def _jump(rng, t):
    period = rng.uniform(0.7, 1.3)
    gaps = period * rng.uniform(0.85, 1.15, size=int(t[-1] / (0.85 * period)) + 2)
    landings = rng.uniform(0.0, period) + np.concatenate([[0.0], np.cumsum(gaps)])
    x = np.zeros((len(t), 3))
    for landing in landings[landings < t[-1] + period]:
        since = t - landing
        after = since >= 0
        ring = np.exp(-since[after] / 0.12) * np.cos(2 * np.pi * 6.0 * since[after])  # landing shock
        x[after, 0] += 2.0 * ring
        x[after, 1] += 0.4 * ring
        x[:, 0] -= 0.8 * np.exp(-0.5 * ((since + 0.35 * period) / 0.08) ** 2)  # push-off before it
    return x


def _idle(rng, t):
    x = 0.08 * _smooth_noise(rng, len(t), 3, 25)
    for _ in range(rng.integers(0, 3)):  # a few small gestures
        centre, width = rng.uniform(t[0], t[-1]), rng.uniform(0.3, 1.0)
        envelope = np.exp(-0.5 * ((t - centre) / width) ** 2)
        x += envelope[:, None] * rng.uniform(0.1, 0.4, 3) * np.sin(2 * np.pi * rng.uniform(2.0, 4.0) * t)[:, None]
    return x


PATTERNS = {"walk": _walk, "run": _run, "cycle": _cycle, "stairs": _stairs, "jump": _jump, "idle": _idle}


def _smooth_noise(rng: np.random.Generator, n: int, channels: int, width: int) -> np.ndarray:
    """White noise smoothed by a moving average of ``width`` samples, scaled to unit std."""
    raw = rng.standard_normal((n + width, channels))
    kernel = np.ones(width) / width
    smooth = np.stack([np.convolve(raw[:, c], kernel, mode="valid")[:n] for c in range(channels)], axis=1)
    return smooth / max(float(smooth.std()), 1e-8)


def _orientation(rng: np.random.Generator) -> np.ndarray:
    """A device orientation: any yaw, then a tilt of at most ``MAX_TILT`` about a random horizontal axis."""
    yaw = rng.uniform(0, 2 * np.pi)
    rz = np.array([[1, 0, 0], [0, np.cos(yaw), -np.sin(yaw)], [0, np.sin(yaw), np.cos(yaw)]])  # axis 0 is vertical
    tilt, direction = rng.uniform(0, MAX_TILT), rng.uniform(0, 2 * np.pi)
    axis = np.array([0.0, np.cos(direction), np.sin(direction)])
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    tilt_matrix = np.eye(3) + np.sin(tilt) * k + (1 - np.cos(tilt)) * (k @ k)  # Rodrigues
    return tilt_matrix @ rz


def synthesize(activity: str, num_samples: int, rng: np.random.Generator, *,
               sample_rate: float = SAMPLE_RATE) -> np.ndarray:
    """One recording of ``activity``: ``(num_samples, 3)`` float32 accelerations in g as the
    device measures them (gravity included)."""
    t = np.arange(num_samples) / sample_rate
    body = PATTERNS[activity](rng, t) * rng.uniform(0.6, 1.4)
    body[:, 0] += 1.0  # gravity, along the body's vertical
    wander = 0.1 * _smooth_noise(rng, num_samples, 3, int(2 * sample_rate))
    device = body @ _orientation(rng).T + wander
    device += rng.uniform(0.05, 0.3) * rng.standard_normal(device.shape)
    return device.astype(np.float32)
