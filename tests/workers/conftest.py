import pytest

from workers.engine import Engine
from workers.models import load_model
from workers.prompt import PromptEncoder


@pytest.fixture(scope="session")
def tiny():
    return load_model("tiny-random", device="cpu")


@pytest.fixture(scope="session")
def tiny_engine(tiny):
    return Engine(tiny)


@pytest.fixture(scope="session")
def tiny_prompts(tiny):
    return PromptEncoder.for_model(tiny)


@pytest.fixture(scope="session")
def smollm2():
    return load_model("smollm2-135m", device="cpu")


@pytest.fixture(scope="session")
def smollm2_engine(smollm2):
    return Engine(smollm2)


@pytest.fixture(scope="session")
def smollm2_prompts(smollm2):
    return PromptEncoder.for_model(smollm2)


@pytest.fixture(scope="module")
def store():
    """A real KVStore (gRPC, memory backend) on a loopback port, for workers in this process."""
    from services.store.server import StoreConfig, StoreServer

    server = StoreServer(StoreConfig(port=0))
    server.start()
    yield server
    server.stop(0)


@pytest.fixture(scope="module")
def pair(store):
    """Two tiny-random workers, "a" and "b", sharing `store`."""
    from tests.support.work import make_worker

    a, b = make_worker(store, "a"), make_worker(store, "b")
    yield a, b
    a.close()
    b.close()
