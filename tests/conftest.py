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
