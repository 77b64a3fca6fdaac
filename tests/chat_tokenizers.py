"""Tokenizers that carry the real special tokens and chat templates of three model families over a
tiny byte-level vocabulary (every byte one token, no merges), built locally for the tests.

The templates in tests/chat_templates/ are the families' own `chat_template` strings:
Llama-3.1-Tulu-3-8B-SFT (open-instruct's "tulu" template, which writes no BOS), Qwen2.5-Instruct
(ChatML, no BOS at all) and Llama-3.1-8B-Instruct (writes <|begin_of_text|> itself). The token
strings are the real ones; the ids are small, since only the strings and their order matter to
the code under test. Llama-3 tokenizers add BOS when called with add_special_tokens=True, as the
real ones do, so a double BOS would show.
"""

from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

TEMPLATES = Path(__file__).resolve().parent / "chat_templates"

FAMILIES = {
    "tulu3": dict(
        template="llama-3.1-tulu-3-8b-sft.jinja",
        specials=["<|begin_of_text|>", "<|end_of_text|>", "<pad>"],
        bos="<|begin_of_text|>",
        eos="<|end_of_text|>",
        pad="<pad>",
        end_of_turn="<|end_of_text|>",
        generation_eos=["<|end_of_text|>"],
    ),
    "qwen2.5": dict(
        template="qwen2.5-instruct.jinja",
        specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        bos=None,
        eos="<|im_end|>",
        pad="<|endoftext|>",
        end_of_turn="<|im_end|>",
        generation_eos=["<|im_end|>", "<|endoftext|>"],
    ),
    "llama3.1-instruct": dict(
        template="llama-3.1-8b-instruct.jinja",
        specials=[
            "<|begin_of_text|>",
            "<|end_of_text|>",
            "<|finetune_right_pad_id|>",
            "<|start_header_id|>",
            "<|end_header_id|>",
            "<|eom_id|>",
            "<|eot_id|>",
            "<|python_tag|>",
        ],
        bos="<|begin_of_text|>",
        eos="<|eot_id|>",
        pad=None,
        end_of_turn="<|eot_id|>",
        generation_eos=["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"],
    ),
}


def build(family: str) -> PreTrainedTokenizerFast:
    spec = FAMILIES[family]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in spec["specials"]])
    if spec["bos"]:  # Llama-3's post-processor: BOS in front when add_special_tokens=True
        backend.post_processor = processors.TemplateProcessing(
            single=f"{spec['bos']} $A", special_tokens=[(spec["bos"], backend.token_to_id(spec["bos"]))]
        )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=spec["bos"], eos_token=spec["eos"], pad_token=spec["pad"]
    )
    tokenizer.chat_template = (TEMPLATES / spec["template"]).read_text()
    return tokenizer


def pieces(text: str, family: str) -> list[str]:
    """The tokens the tiny tokenizer makes of `text`, as strings: each special token whole, every
    other character alone (all test texts are ASCII)."""
    specials = FAMILIES[family]["specials"]
    out, i = [], 0
    while i < len(text):
        special = next((s for s in specials if text.startswith(s, i)), None)
        out.append(special or text[i])
        i += len(special) if special else 1
    return out
