"""Tokenization (workers.prompt): one encoder for the worker and the gateway.

The gateway tokenizes with the files the worker's tokenizer saves, loaded without torch; the
ids must be exactly the worker's, or the gateway would route on hashes the worker never stores.
"""

import subprocess
import sys

import pytest

from workers.api import ChatMessage, PromptInput
from workers.prompt import PromptEncoder, tokenizer_files


def test_chat_template_is_applied_to_messages(tiny_prompts):
    ids = tiny_prompts.encode(messages=[{"role": "user", "content": "hi there"}])
    text = tiny_prompts.tokenizer.decode(ids)
    assert "<|im_start|>user\nhi there<|im_end|>" in text
    assert text.rstrip().endswith("<|im_start|>assistant")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"prompt": ""}, "prompt is empty"),
        ({"prompt": "   "}, "prompt is empty"),
        ({"token_ids": []}, "token_ids is empty"),
        ({"token_ids": [-1]}, r"token ids must be integers in \[0, "),
        ({"messages": []}, "messages is empty"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "role must be one of"),
        ({}, "exactly one of prompt, messages or token_ids"),
        ({"prompt": "a", "token_ids": [1]}, "exactly one of"),
    ],
)
def test_bad_input_names_what_is_allowed(tiny_prompts, kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny_prompts.encode(**kwargs)


def test_token_ids_pass_through(tiny_prompts):
    assert tiny_prompts.encode(token_ids=[1, 2, 3]) == [1, 2, 3]


@pytest.fixture(scope="module")
def gateway_prompts(tiny, tiny_prompts):
    files = tokenizer_files(tiny.tokenizer)
    return PromptEncoder.from_files(
        files, tiny.name, tiny_prompts.vocab_size, tiny_prompts.eos_token_ids
    )


def test_gateway_encoder_gives_the_workers_ids_for_chat_and_raw_prompts_with_history(
    tiny_prompts, gateway_prompts
):
    _check_same_ids(tiny_prompts, gateway_prompts)


@pytest.mark.model
def test_smollm2_gateway_encoder_gives_the_workers_ids(smollm2, smollm2_prompts):
    gateway = PromptEncoder.from_files(
        tokenizer_files(smollm2.tokenizer),
        smollm2.name,
        smollm2_prompts.vocab_size,
        smollm2_prompts.eos_token_ids,
    )
    _check_same_ids(smollm2_prompts, gateway)


def _check_same_ids(worker: PromptEncoder, gateway: PromptEncoder) -> None:
    chat = PromptInput(messages=(ChatMessage("system", "Be brief."), ChatMessage("user", "Hi!")))
    raw = PromptInput(prompt="Tokenize me, with ünïcödé and   spaces.\n")
    first = worker.encode_input(chat)
    assert gateway.encode_input(chat) == first
    assert gateway.encode_input(raw) == worker.encode_input(raw)
    history = [*first, 42, 7, *sorted(worker.eos_token_ids)[:1]]
    turn = PromptInput(messages=(ChatMessage("user", "And then?"),))
    assert gateway.encode_input(turn, history) == worker.encode_input(turn, history)
    assert gateway.encode_input(raw, history) == worker.encode_input(raw, history)
    assert gateway.decode(history) == worker.decode(history)


def test_gateway_encoder_loads_without_torch(tiny):
    """Loading the tokenizer from its files and encoding a chat prompt never imports torch."""
    import pickle
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".pickle") as f:
        f.write(pickle.dumps(tokenizer_files(tiny.tokenizer)))
        f.flush()
        code = (
            "import pickle, sys\n"
            "from workers.prompt import PromptEncoder\n"
            "from workers.api import ChatMessage, PromptInput\n"
            f"files = pickle.load(open({f.name!r}, 'rb'))\n"
            "p = PromptEncoder.from_files(files, 'tiny-random', 49152, frozenset({2}))\n"
            "ids = p.encode_input(PromptInput(messages=(ChatMessage('user', 'hi'),)))\n"
            "assert ids, ids\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n"
        )
        subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_tokenizer_files_refuse_anything_but_tokenizer_files():
    with pytest.raises(ValueError, match=r"tokenizer\.json"):
        PromptEncoder.from_files({"model.safetensors": b""}, "m", 10, frozenset())
