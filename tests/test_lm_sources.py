"""Text sources, canary makers and tokenizers of the language-model task, on small files the tests write."""

from __future__ import annotations

import json

import numpy as np
import pytest

from memloc.core.errors import ConfigError, DataError
from memloc.tasks.lm.sources import bible_verses, digit_secret, fake_records, random_words, read_texts
from memloc.tasks.lm.tokenizers import BPETokenizer, ByteTokenizer, LocalHFTokenizer, load_tokenizer, make_tokenizer

DIGITS = "0123456789"


@pytest.fixture(scope="module")
def verses() -> list[str]:
    return bible_verses()[:400]


@pytest.fixture(scope="module")
def bpe(verses) -> BPETokenizer:
    return BPETokenizer.train(verses, 600)


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


# ---------------------------------------------------------------- read_texts


def test_txt_one_text_per_line_blank_lines_skipped(tmp_path):
    f = tmp_path / "c.txt"
    f.write_bytes("first line\n\n  \nsecond é line\r\nthird\n".encode())
    assert list(read_texts(f)) == ["first line", "second é line", "third"]


def test_txt_with_window_is_one_document(tmp_path):
    f = tmp_path / "c.txt"
    f.write_text("a\n\nb\nc\n")
    assert list(read_texts(f, window=64)) == ["a\n\nb\nc"]


def test_txt_streams_line_by_line(tmp_path):
    f = tmp_path / "c.txt"
    f.write_bytes(b"ok\n" + b"\xff bad\n")
    texts = read_texts(f)
    assert next(texts) == "ok"  # the first line comes before the bad one is read
    with pytest.raises(DataError) as e:
        next(texts)
    assert f"{f}:2" in one_line(e)


def test_utf8_bom_is_dropped(tmp_path):
    f = tmp_path / "c.txt"
    f.write_bytes("\ufeffhello\n".encode())
    assert list(read_texts(f)) == ["hello"]


def test_jsonl_text_fields(tmp_path):
    f = tmp_path / "c.jsonl"
    f.write_text(json.dumps({"text": "one", "id": 1}) + "\n\n" + json.dumps({"text": "two\nlines"}) + "\n")
    assert list(read_texts(f)) == ["one", "two\nlines"]
    assert list(read_texts(f, window=8)) == ["one", "two\nlines"]


def test_folder_of_txt_files_sorted_one_document_each(tmp_path):
    (tmp_path / "b.txt").write_text("bee\nline 2\n")
    (tmp_path / "a.txt").write_text("ay\n")
    (tmp_path / "notes.md").write_text("ignored")
    (tmp_path / "empty.txt").write_text("\n")
    assert list(read_texts(tmp_path)) == ["ay", "bee\nline 2"]


@pytest.mark.parametrize("name, content, where, words", [
    ("empty.txt", b"", "", "no text"),
    ("blank.txt", b"\n  \n", "", "no text"),
    ("latin1.txt", b"ok\ncaf\xe9\n", ":2", "not UTF-8"),
    ("latin1.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n', ":2", "not UTF-8"),
    ("bad.jsonl", b'{"text": "ok"}\n{"text": \n', ":2", "not JSON"),
    ("notext.jsonl", b'{"text": "ok"}\n\n{"body": "x"}\n', ":3", "no string \"text\" field"),
    ("number.jsonl", b'{"text": 5}\n', ":1", "no string \"text\" field"),
    ("list.jsonl", b'["text"]\n', ":1", "no string \"text\" field"),
    ("empty.jsonl", b"", "", "no text"),
])
def test_bad_files_raise_one_line_naming_the_file(tmp_path, name, content, where, words):
    f = tmp_path / name
    f.write_bytes(content)
    with pytest.raises(DataError) as e:
        list(read_texts(f))
    msg = one_line(e)
    assert msg.startswith(f"{f}{where}: ") and words in msg


def test_missing_path_and_unknown_extension_raise_at_call(tmp_path):
    with pytest.raises(DataError) as e:
        read_texts(tmp_path / "nope.txt")
    assert str(tmp_path / "nope.txt") in one_line(e) and "no such file" in str(e.value)
    f = tmp_path / "c.csv"
    f.write_text("a,b\n")
    with pytest.raises(DataError) as e:
        read_texts(f)
    assert str(f) in one_line(e) and "'.csv'" in str(e.value) and ".jsonl" in str(e.value)


def test_folder_without_text(tmp_path):
    with pytest.raises(DataError) as e:
        read_texts(tmp_path)
    assert str(tmp_path) in one_line(e) and "no .txt files" in str(e.value)
    (tmp_path / "a.txt").write_text("")
    with pytest.raises(DataError) as e:
        list(read_texts(tmp_path))
    assert str(tmp_path) in one_line(e) and "no text" in str(e.value)


def test_bad_window(tmp_path):
    f = tmp_path / "c.txt"
    f.write_text("a\n")
    with pytest.raises(ConfigError):
        read_texts(f, window=0)


# ---------------------------------------------------------------- canaries


def test_digit_secret_seeded():
    a = digit_secret(np.random.default_rng(3), 6)
    assert len(a) == 6 and a.isdigit()
    assert a == digit_secret(np.random.default_rng(3), 6)
    secrets = {digit_secret(np.random.default_rng(s), 6) for s in range(20)}
    assert len(secrets) == 20
    with pytest.raises(ConfigError):
        digit_secret(np.random.default_rng(0), 0)


def test_random_words_seeded():
    vocab = ["alpha", "beta", "gamma", "delta", "eps"]
    a = random_words(np.random.default_rng(1), vocab, 7)
    assert len(a.split(" ")) == 7 and set(a.split(" ")) <= set(vocab)
    assert a == random_words(np.random.default_rng(1), vocab, 7)
    assert a != random_words(np.random.default_rng(2), vocab, 7)
    with pytest.raises(ConfigError):
        random_words(np.random.default_rng(0), [], 3)


def test_fake_records_seeded_distinct_prefixes():
    a = fake_records(30, seed=5)
    assert a == fake_records(30, seed=5)
    assert a != fake_records(30, seed=6)
    assert len(a) == 30 and len({p for p, _ in a}) == 30
    for prefix, secret in a:
        assert prefix.startswith("Name: ") and ". Address: " in prefix and prefix.endswith(". Phone: ")
        assert len(secret) == 12 and secret[3] == secret[7] == "-" and secret.replace("-", "").isdigit()
    assert fake_records(0, seed=1) == []


# ---------------------------------------------------------------- tokenizers


def test_byte_tokenizer_digits_and_eos(tmp_path):
    tok = ByteTokenizer()
    assert tok.digit_ids() == list(range(48, 58)) and tok.eos_id == 10
    assert tok.encode("123456") == [tok.digit_ids()[int(c)] for c in "123456"]
    tok.save(tmp_path)
    assert isinstance(load_tokenizer(tmp_path), ByteTokenizer)


def test_bpe_is_deterministic(verses, bpe):
    again = BPETokenizer.train(iter(verses), 600)  # a one-shot iterator trains the same as a list
    assert again.tokenizer.get_vocab() == bpe.tokenizer.get_vocab()
    assert again.tokenizer.to_str() == bpe.tokenizer.to_str()
    assert bpe.vocab_size == 600


def test_bpe_round_trip_and_merges(verses, bpe):
    text = verses[5] + " — naïve café 2024\n"
    ids = bpe.encode(text)
    assert bpe.decode(ids) == text
    assert len(bpe.encode(verses[5])) < len(verses[5]) / 2  # merges learnt from the verses
    assert bpe.encode("<|endoftext|>") == [bpe.eos_id] and bpe.decode([bpe.eos_id]) == "<|endoftext|>"


def test_bpe_digits_are_single_fixed_tokens(bpe):
    digits = bpe.digit_ids()
    assert len(set(digits)) == 10 and [bpe.decode([i]) for i in digits] == list(DIGITS)
    for context in ["Phone: ", "In the year ", "x", "the 1 and only ", ""]:
        for secret in ["123456", "000000", "987654"]:
            ids = bpe.encode(context + secret)
            assert ids[-6:] == [digits[int(c)] for c in secret]
            assert bpe.encode(context) == ids[:-6]  # digits never merge with what comes before


def test_bpe_save_load(tmp_path, verses, bpe):
    bpe.save(tmp_path)
    meta = json.loads((tmp_path / "memloc_tokenizer.json").read_text())
    assert meta["kind"] == "bpe" and (tmp_path / "tokenizer.json").is_file()
    loaded = load_tokenizer(tmp_path)
    assert isinstance(loaded, BPETokenizer)
    for text in verses[:50] + ["Phone: 555-123-4567"]:
        assert loaded.encode(text) == bpe.encode(text)
    assert loaded.eos_id == bpe.eos_id and loaded.digit_ids() == bpe.digit_ids()


def test_bpe_errors(tmp_path):
    with pytest.raises(ConfigError):
        BPETokenizer.train(["some text"], 100)
    with pytest.raises(DataError) as e:
        BPETokenizer.train(["", "  "], 300)
    one_line(e)
    with pytest.raises(DataError) as e:
        BPETokenizer.load(tmp_path)
    assert str(tmp_path) in one_line(e) and "tokenizer.json" in str(e.value)
    (tmp_path / "tokenizer.json").write_text("{broken")
    with pytest.raises(DataError) as e:
        BPETokenizer.load(tmp_path)
    assert str(tmp_path / "tokenizer.json") in one_line(e)


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory, verses):
    """A tokenizer folder as Hugging Face writes it: a BPE wrapped in PreTrainedTokenizerFast, save_pretrained."""
    from transformers import PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("hf_tokenizer")
    inner = BPETokenizer.train(verses, 400).tokenizer
    PreTrainedTokenizerFast(tokenizer_object=inner, eos_token="<|endoftext|>").save_pretrained(str(folder))
    return folder


def test_hf_local_folder(tmp_path, hf_folder, verses):
    tok = make_tokenizer(f"hf:{hf_folder}")
    assert isinstance(tok, LocalHFTokenizer) and tok.vocab_size == 400
    text = verses[3] + " Phone: 555-123-4567"
    assert tok.decode(tok.encode(text)) == text
    assert tok.eos_id == tok.tokenizer.token_to_id("<|endoftext|>")
    digits = tok.digit_ids()
    assert tok.encode("Phone: 123456")[-6:] == [digits[int(c)] for c in "123456"]
    tok.save(tmp_path / "copy")
    assert json.loads((tmp_path / "copy" / "memloc_tokenizer.json").read_text())["kind"] == "hf"
    loaded = load_tokenizer(tmp_path / "copy")
    assert isinstance(loaded, LocalHFTokenizer) and loaded.encode(text) == tok.encode(text)
    assert loaded.eos_id == tok.eos_id and loaded.decode(tok.encode(text)) == text


def test_a_runs_copy_encodes_as_transformers_does(tmp_path):
    """transformers rebuilds a Llama tokenizer's pipeline from tokenizer_config.json: the run keeps the pipeline
    transformers runs (not the folder's tokenizer.json), read back by `tokenizers` alone with the same ids."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from transformers import AutoTokenizer, LlamaTokenizerFast

    texts = ["In the beginning God created the heaven and the earth. Phone: 555-123-4567"] * 30 + ["ünïcödé ✓"]
    inner = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    inner.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    inner.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    inner.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                                         show_progress=False))
    LlamaTokenizerFast(tokenizer_object=inner, bos_token="<s>", eos_token="</s>",
                       unk_token="<unk>").save_pretrained(str(tmp_path / "user"))
    hf = AutoTokenizer.from_pretrained(str(tmp_path / "user"), local_files_only=True, trust_remote_code=False)
    LocalHFTokenizer(tmp_path / "user").save(tmp_path / "run")
    copy = load_tokenizer(tmp_path / "run")
    for text in texts[-2:] + [" two  spaces", "Phone: 0123456789\n"]:
        ids = hf.encode(text, add_special_tokens=False)
        assert copy.encode(text) == ids
        assert copy.decode(ids) == hf.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    assert copy.eos_id == hf.eos_token_id and copy.vocab_size == len(hf)


def test_hf_tokenizer_that_merges_digits_has_no_digit_ids(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    inner = Tokenizer(models.BPE())
    inner.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # GPT-2 style: "123" can be one token
    inner.decoder = decoders.ByteLevel()
    inner.train_from_iterator(["12 34 123456 123456 1234 12345"] * 20, trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    PreTrainedTokenizerFast(tokenizer_object=inner).save_pretrained(str(tmp_path))
    tok = LocalHFTokenizer(tmp_path)
    with pytest.raises(DataError) as e:
        tok.digit_ids()
    assert str(tmp_path) in one_line(e) and "digit" in str(e.value)


def test_hf_errors(tmp_path):
    with pytest.raises(DataError) as e:
        make_tokenizer("hf:gpt2")
    assert "memloc never downloads: download the tokenizer elsewhere and pass its folder" in one_line(e)
    assert "gpt2" in str(e.value)
    with pytest.raises(DataError) as e:
        LocalHFTokenizer(tmp_path)
    assert str(tmp_path) in one_line(e) and "tokenizer.json" in str(e.value)


def test_make_and_load_tokenizer_errors(tmp_path, verses):
    assert isinstance(make_tokenizer("bytes"), ByteTokenizer)
    assert make_tokenizer("bpe", verses[:100], 300).vocab_size == 300
    with pytest.raises(ConfigError):
        make_tokenizer("bpe")
    with pytest.raises(ConfigError) as e:
        make_tokenizer("sentencepiece")
    assert "bytes" in one_line(e) and "hf:PATH" in str(e.value)
    with pytest.raises(DataError) as e:
        load_tokenizer(tmp_path)
    assert str(tmp_path) in one_line(e) and "memloc_tokenizer.json" in str(e.value)
    (tmp_path / "memloc_tokenizer.json").write_text('{"kind": "wordpiece"}')
    with pytest.raises(DataError) as e:
        load_tokenizer(tmp_path)
    assert "wordpiece" in one_line(e)
