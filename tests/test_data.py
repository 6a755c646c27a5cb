import re
from pathlib import Path

import numpy as np
import pytest

from mla_jax.config import DataConfig
from mla_jax.tokenizers import ByteTokenizer
from mla_jax.train.data import batch_at, list_files, load_corpus, unigram_entropy


def test_byte_tokenizer_round_trips_unicode_and_drops_specials():
  tok = ByteTokenizer()
  ids = tok.encode("déf λ(x):")
  assert ids[:2] == [100, 0xC3] and max(ids) < 256
  assert tok.decode(ids + [tok.EOS, tok.PAD]) == "déf λ(x):"
  assert tok.decode([0xC3]) == "\ufffd"  # a cut UTF-8 sequence is replaced, not raised


def test_default_corpus_is_the_stdlib_split_by_file():
  files = list_files(None)
  assert len(files) > 500 and all(f.suffix == ".py" for f in files)
  corpus = load_corpus(DataConfig(), min_tokens=129)
  assert corpus.num_files == len([f for f in files if f.stat().st_size])
  val_share = len(corpus.val) / (len(corpus.val) + len(corpus.train))
  assert 0.02 < val_share < 0.10  # ~5% of files, by hash of their path
  again = load_corpus(DataConfig(), min_tokens=129)
  assert np.array_equal(corpus.val, again.val)  # deterministic
  assert (corpus.train == ByteTokenizer.EOS).sum() + (corpus.val == ByteTokenizer.EOS).sum() == corpus.num_files


def test_user_directory_file_and_glob(tmp_path):
  for i in range(30):
    (tmp_path / f"doc{i}.txt").write_text(f"document number {i} " * 20)
  (tmp_path / "empty.txt").write_text("")
  corpus = load_corpus(DataConfig(path=str(tmp_path)), min_tokens=17)
  assert corpus.num_files == 30 and len(corpus.val) > 0
  glob_corpus = load_corpus(DataConfig(path=str(tmp_path / "doc1*.txt")), min_tokens=17)
  assert glob_corpus.num_files == 11  # doc1, doc10..doc19
  single = load_corpus(DataConfig(path=str(tmp_path / "doc3.txt"), val_fraction=0.25),
                       min_tokens=17)
  assert single.num_files == 1 and len(single.val) == pytest.approx(0.25 * len("document number 3 ") * 20, abs=2)


@pytest.mark.parametrize("name, text, message", [
    ("nothing*.txt", None, "matches no files"),
    ("a.txt", "", "matches only empty files"),
    ("b.txt", "short", "fewer than train.seq_len"),
])
def test_unusable_data_paths_are_named(tmp_path, name, text, message):
  path = tmp_path / name
  if text is not None:
    path.write_text(text)
  with pytest.raises(ValueError, match=re.escape(f"data.path='{path}'") + f".*{message}"):
    load_corpus(DataConfig(path=str(path)), min_tokens=129)


def test_batches_are_a_pure_function_of_seed_and_step():
  tokens = np.arange(10_000, dtype=np.uint16) % 251
  x, y = batch_at(tokens, seed=3, stream=0, index=17, batch_size=4, seq_len=16)
  x2, y2 = batch_at(tokens, seed=3, stream=0, index=17, batch_size=4, seq_len=16)
  assert x.shape == y.shape == (4, 16) and x.dtype == np.int32
  assert np.array_equal(x, x2) and np.array_equal(y, y2)
  assert np.array_equal(x[:, 1:], y[:, :-1])  # targets are the inputs shifted by one
  assert not np.array_equal(x, batch_at(tokens, 3, 0, 18, 4, 16)[0])
  assert not np.array_equal(x, batch_at(tokens, 3, 1, 17, 4, 16)[0])  # validation stream differs


def test_unigram_entropy():
  assert unigram_entropy(np.array([0, 1, 2, 3] * 5)) == pytest.approx(np.log(4))
  assert unigram_entropy(np.array([7] * 9)) == pytest.approx(0.0)


def _binary(path, size=20_000):
  path.write_bytes(np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8).tobytes())
  return path


@pytest.mark.parametrize("kind", ["binary_file", "directory_of_binaries", "dev_zero"])
def test_data_that_is_not_text_is_refused_with_its_share(tmp_path, kind):
  """A binary file, a directory of them, and /dev/zero (endless: only a prefix is read)."""
  if kind == "binary_file":
    path, files = _binary(tmp_path / "weights.bin"), 1
  elif kind == "directory_of_binaries":
    for i in range(3):
      _binary(tmp_path / f"blob{i}.bin")
    (tmp_path / "notes.txt").write_text("a little text " * 100)
    path, files = tmp_path, 4
  else:
    path, files = Path("/dev/zero"), 1
  with pytest.raises(ValueError) as error:
    load_corpus(DataConfig(path=str(path)), min_tokens=129)
  share = r"(\d+\.\d)%"
  match = re.fullmatch(
      re.escape(f"data.path='{path}' is not text: ") + share + r" of the ([\d,]+) bytes sampled "
      + re.escape(f"(the first 8,192 bytes of {files} file(s)) are control bytes or invalid UTF-8, "
                  "more than the 10% allowed") + r"(; e\.g\. '[^']+blob\d\.bin')?"
      + re.escape("; give a text file, a directory of text files or a glob of them (e.g. "
                  "data.path='corpus/**/*.txt')"), str(error.value))
  assert match, str(error.value)
  assert float(match.group(1)) > 10
  if kind == "dev_zero":
    assert match.group(1) == "100.0" and match.group(2) == "8,192"  # a bounded prefix


def test_a_few_binary_files_in_a_text_corpus_are_listed_not_refused(tmp_path):
  for i in range(20):
    (tmp_path / f"doc{i}.txt").write_text(f"document number {i}, plain text; " * 300)
  _binary(tmp_path / "image.png", size=1000)
  corpus = load_corpus(DataConfig(path=str(tmp_path)), min_tokens=17)
  assert corpus.num_files == 21
  ((path, share),) = corpus.binary_files
  assert path == str(tmp_path / "image.png") and share > 0.5


def test_non_text_bytes_counts_control_bytes_and_invalid_utf8():
  from mla_jax.train.data import non_text_bytes

  assert non_text_bytes("déf λ(x):\n\tpass\r\n\x1b[0m".encode()) == 0
  assert non_text_bytes(b"\x00\x01ab\x7f") == 3
  assert non_text_bytes(b"ab\xff\xfecd") == 2
  assert non_text_bytes("ok λ".encode()[:-1]) == 0  # a character cut by the sample's end
