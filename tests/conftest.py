"""Shared test set-up: hypothesis profiles (`HYPOTHESIS_PROFILE=fast|deep`, default fast)."""

import os

from hypothesis import HealthCheck, settings

settings.register_profile("fast", max_examples=150, deadline=None)
settings.register_profile(
    "deep", max_examples=5000, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "fast"))
