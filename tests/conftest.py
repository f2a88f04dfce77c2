import pytest
import torch


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def tiny_tok():
    from smf_lightning.models.tiny import tiny_tokenizer

    return tiny_tokenizer()


# Tiny-model tests are dominated by thread start-up costs: one thread is several times
# faster, and keeps tests fast when the machine is busy.
torch.set_num_threads(1)
