import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(scope="session")
def ray_local():
    """One embedded Ray for the in-process tests (starting Ray costs seconds)."""
    import ray

    from pipeline.ray_runtime import init_ray

    init_ray(workers=2)
    yield
    ray.shutdown()
