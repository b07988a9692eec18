import pytest

FAILED: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.failed:
        FAILED.append(f"{report.nodeid} ({report.when})")


def pytest_unconfigure(config: pytest.Config) -> None:
    """The failed tests, one short line each, as the log's very last lines: CI keeps only the log's tail,
    which pytest's own summary (the full assertion text on CI) can fill before the names are reached."""
    for nodeid in FAILED:
        print(f"FAILED {nodeid}")


@pytest.fixture(scope="session")
def ray_local():
    """One embedded Ray for the in-process tests (starting Ray costs seconds)."""
    import ray

    from pipeline.ray_runtime import init_ray

    init_ray(cpus=2)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def digits(ray_local, tmp_path_factory):
    """The built-in ``digits`` source (scikit-learn's 1,797 8x8 images) ingested in shards of 300.
    Per module, not per session: curation writes its selections into the dataset."""
    from pipeline.ingest.job import IngestOptions, ingest
    from pipeline.ingest.sources import open_source

    out = tmp_path_factory.mktemp("data") / "digits"
    ingest(open_source("digits"), str(out), IngestOptions(shard_size=300), command=["test"], progress=False)
    return str(out)


@pytest.fixture(scope="module")
def photos(ray_local, tmp_path_factory):
    """An ImageFolder of real photo crops, 24-400 px of every aspect ratio and mode (tests/photos.py),
    ingested: 24 train and 6 val per class. Per module, as ``digits``."""
    from photos import photo_folder
    from pipeline.ingest.job import IngestOptions, ingest
    from pipeline.ingest.sources import open_source

    root = tmp_path_factory.mktemp("photos")
    photo_folder(root / "folder", {"train": 24, "val": 6})
    out = root / "data"
    ingest(open_source(f"imagefolder:{root / 'folder'}"), str(out), IngestOptions(shard_size=7), command=["test"],
           progress=False)
    return str(out)
