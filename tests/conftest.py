"""Shared fixtures: the toy tokenizer and tiny random Llama models saved the HF way."""

import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM, LlamaForSequenceClassification

import data


@pytest.fixture(scope="session")
def toy_dir(tmp_path_factory):
    """A directory with the toy tokenizer and a tiny random LlamaForCausalLM (the policy)."""
    path = tmp_path_factory.mktemp("toy_policy")
    tokenizer = data.build_toy_tokenizer()
    tokenizer.save_pretrained(path)
    torch.manual_seed(0)
    LlamaForCausalLM(data.toy_model_config(tokenizer)).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def toy_rm_dir(tmp_path_factory):
    """A directory with the toy tokenizer and a tiny random reward model (num_labels = 1)."""
    path = tmp_path_factory.mktemp("toy_rm")
    tokenizer = data.build_toy_tokenizer()
    tokenizer.save_pretrained(path)
    config = data.toy_model_config(tokenizer)
    config.num_labels = 1
    torch.manual_seed(1)
    LlamaForSequenceClassification(config).save_pretrained(path)
    return path


@pytest.fixture
def toy_tokenizer(toy_dir):
    return AutoTokenizer.from_pretrained(toy_dir)
