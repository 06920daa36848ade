"""Tokenizers and the M1 chat template, against transformers on the same files (no downloads: the
byte-level BPE is trained here with the tokenizers package)."""

import json

import pytest
from hypothesis import given, settings, strategies as st

from m1jax import tokenizer as tk
from m1jax.data import arith

SPECIALS = [tk.M1_BEGIN_DOCUMENT, tk.M1_BOS, tk.M1_EOS, "<end_of_document>"]
CORPUS = [
    "The lightning attention layers keep a fixed-size state.",
    "MiniMax-M1 mixes 7 lightning layers with 1 softmax layer, repeated 10 times.",
    "CISPO clips the importance-sampling weight instead of the token update.",
    "数学: 12 + 34 = 46. Ünïcödé text and emoji 🙂 are bytes too.",
    "def f(x):\n    return x * 2  # code with  double  spaces\n",
] * 20
TEXTS = ["Hello world", "  leading spaces", "mixed 数学 and 🙂", "12+34=46\nnew line", "",
         f"{tk.M1_BOS}user name=user\nhi{tk.M1_EOS}\n", "unseen zygote quixotic"]


def write_bpe_tokenizer(directory) -> None:
    """A GPT-2-style byte-level BPE (MiniMax-M1's tokenizer kind, 400 tokens) with the M1 special
    tokens: tokenizer.json + tokenizer_config.json in ``directory``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tk.save_hf_files(tok, str(directory), {"unk_token": "<end_of_document>"})


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("bpe")
    write_bpe_tokenizer(d)
    return d


def test_bpe_encode_decode_equal_transformers(bpe_dir):
    transformers = pytest.importorskip("transformers")
    ours = tk.load(str(bpe_dir))
    theirs = transformers.PreTrainedTokenizerFast(tokenizer_file=str(bpe_dir / "tokenizer.json"),
                                                  bos_token=tk.M1_BOS, eos_token=tk.M1_EOS)
    assert isinstance(ours, tk.Tokenizer)
    assert ours.vocab_size == len(theirs) and ours.vocab_size > 300
    assert (ours.bos_id, ours.eos_id) == (theirs.bos_token_id, theirs.eos_token_id)
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == theirs.encode(text, add_special_tokens=False), text
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True)
    # special tokens written in the text are single tokens
    assert ours.encode(tk.M1_BOS + "hi" + tk.M1_EOS)[0] == ours.bos_id
    assert ours.encode(tk.M1_BOS + "hi" + tk.M1_EOS)[-1] == ours.eos_id
    # loading the directory with AutoTokenizer (tokenizer_config.json written by save_hf_files)
    auto = transformers.AutoTokenizer.from_pretrained(str(bpe_dir))
    assert auto.eos_token == tk.M1_EOS and auto.encode(TEXTS[2], add_special_tokens=False) == ours.encode(TEXTS[2])


@settings(max_examples=50, deadline=None)
@given(st.text(max_size=40))
def test_bpe_round_trips_any_text(bpe_dir, text):
    """Byte-level BPE covers every string: decode(encode(s)) == s (no unknown tokens)."""
    ours = tk.load(str(bpe_dir / "tokenizer.json"))
    if any(s in text for s in SPECIALS):
        return
    assert ours.decode(ours.encode(text)) == text


MESSAGES = [
    [{"role": "user", "content": [{"type": "text", "text": "What is 12+34?"}]}],
    [{"role": "system", "content": [{"type": "text", "text": "You are a careful solver."}]},
     {"role": "user", "content": [{"type": "text", "text": "What is 12+34?"}]},
     {"role": "assistant", "content": [{"type": "text", "text": "<think>add</think>"},
                                       {"type": "text", "text": " 46"}]},
     {"role": "user", "content": [{"type": "text", "text": "And 1+1?"}]}],
    [{"role": "user", "content": [{"type": "text", "text": "a"}]},
     {"role": "system", "content": [{"type": "text", "text": "late system"}]}],
]


def test_chat_prompt_format():
    """The M1 format written out by hand (independently of the template string)."""
    text = tk.chat_prompt([{"role": "system", "content": "S"}, {"role": "user", "content": "Q"},
                           {"role": "assistant", "content": "A"}, {"role": "user", "content": "Q2"}])
    assert text == ("<begin_of_document>"
                    "<beginning_of_sentence>system ai_setting=assistant\nS<end_of_sentence>\n"
                    "<beginning_of_sentence>user name=user\nQ<end_of_sentence>\n"
                    "<beginning_of_sentence>ai name=assistant\nA<end_of_sentence>\n"
                    "<beginning_of_sentence>user name=user\nQ2<end_of_sentence>\n"
                    "<beginning_of_sentence>ai name=assistant\n")
    assert tk.chat_prompt([{"role": "user", "content": "Q"}], add_generation_prompt=False) == (
        "<begin_of_document><beginning_of_sentence>user name=user\nQ<end_of_sentence>\n")
    with pytest.raises(ValueError, match="role 'tool'"):
        tk.chat_prompt([{"role": "tool", "content": "x"}])


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("messages", MESSAGES)
def test_chat_prompt_equals_transformers_apply_chat_template(bpe_dir, messages, add_generation_prompt):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(bpe_dir))
    assert json.loads((bpe_dir / "tokenizer_config.json").read_text())["chat_template"] == tk.M1_CHAT_TEMPLATE
    expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert tk.chat_prompt(messages, add_generation_prompt) == expected
    ours = tk.load(str(bpe_dir))
    assert ours.encode(expected) == hf.encode(expected, add_special_tokens=False)


def test_char_tokenizer_is_the_arith_encoding():
    tok = tk.load("arith")
    assert isinstance(tok, tk.Tokenizer)
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.vocab_size) == (arith.PAD, arith.BOS, arith.EOS, arith.VOCAB_SIZE)
    p = arith.make_problem(3, seed=0, digits=2)
    text = arith.decode(p.prompt_ids)
    assert [tok.bos_id] + tok.encode(text) == p.prompt_ids
    ids = tok.encode(p.answer) + [tok.eos_id]
    assert tok.decode(ids) == arith.decode(ids) == p.answer
    with pytest.raises(ValueError, match=r"\['x'\] are not in this tokenizer's alphabet"):
        tok.encode("1x2")


def test_char_tokenizer_as_hf_tokenizer(tmp_path):
    transformers = pytest.importorskip("transformers")
    tok = tk.load("chars:0123456789+= ")
    tk.save_hf_files(tok.to_hf(), str(tmp_path), {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"})
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    for text in ["12+34=", "0 9", ""]:
        assert hf.encode(text, add_special_tokens=False) == tok.encode(text)
        assert hf.decode(tok.encode(text) + [tok.eos_id], skip_special_tokens=True) == text
    assert (hf.pad_token_id, hf.bos_token_id, hf.eos_token_id) == (tok.pad_id, tok.bos_id, tok.eos_id)


def test_load_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file; pass a tokenizer.json"):
        tk.load(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="repeated characters"):
        tk.load("chars:aab")
