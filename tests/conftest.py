
import os

import pytest
import torch

FULL_ENV = "DISTTRAIN_FULL_TESTS"


def pytest_addoption(parser):
    parser.addoption("--full", action="store_true",
                     help="also run the tests marked slow (second proofs of a property the default run proves, "
                          "and end-to-end runs of the benchmark tool); also DISTTRAIN_FULL_TESTS=1")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a second proof or an end-to-end tool run; runs with --full")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--full") or os.environ.get(FULL_ENV):
        return
    skip = pytest.mark.skip(reason="slow: runs with scripts/test.sh --full (CI runs the rest)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _clean_distributed_state(monkeypatch):
    """No test leaks a process group, launcher variables or thread settings into the next."""
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                "SLURM_PROCID", "SLURM_NTASKS", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_USE_AGENT_STORE"):
        monkeypatch.delenv(var, raising=False)
    threads = torch.get_num_threads()
    yield
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    torch.set_num_threads(threads)
