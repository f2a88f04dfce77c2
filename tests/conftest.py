import pytest
import torch


_DEFAULT_THREADS = torch.get_num_threads()


@pytest.fixture(autouse=True)
def _deterministic_and_threads(request):
    # Tiny-model matmuls are too small to share: with other processes on a 2-core machine,
    # extra threads only contend (measured ~5x slower). Real-model tests keep every core.
    torch.manual_seed(0)
    torch.set_num_threads(_DEFAULT_THREADS if request.node.get_closest_marker("real") else 1)
    yield
    torch.set_num_threads(_DEFAULT_THREADS)


@pytest.fixture(scope="session")
def tiny_tok():
    from smf_lightning.models.tiny import tiny_tokenizer

    return tiny_tokenizer()
