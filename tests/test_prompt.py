"""Prompts as Automatic1111 reads them (minifusion.prompt) and SDXL textual-inversion embeddings
(minifusion.embeddings).

The parser and the chunking are checked on hand-worked cases (the parser's expected values are those of A1111's
own doctests in modules/prompt_parser.py, plus nesting, escapes, BREAK and unbalanced brackets); the encoding is
checked against transformers' CLIPTextModel / CLIPTextModelWithProjection and diffusers'
StableDiffusionXLPipeline (encode_prompt, load_textual_inversion on both encoders) on the same tiny random
weights; a plain prompt must give bit for bit what the unchanged low-level path (tokenizer + encoders) gives.
"""
import gzip
import json

import pytest
import torch
from safetensors.torch import save_file

transformers = pytest.importorskip("transformers")
diffusers = pytest.importorskip("diffusers")

from minifusion import CheckpointError, load  # noqa: E402
from minifusion.embeddings import load_embeddings  # noqa: E402
from minifusion.prompt import BREAK, EMPTY, Span, Vector, emphasize, ids, pad_rows, parse, to_chunks  # noqa: E402
from minifusion.tiny import TINY, random_models, write_diffusers  # noqa: E402
from minifusion.tokenizer import BOS, EOS, Tokenizer  # noqa: E402

SQ = 1 / 1.1
WIDTHS = (TINY.text_encoder_1.width, TINY.text_encoder_2.width)  # 64, 128


@pytest.fixture(scope="module")
def tok():
    return Tokenizer()


def words(n: int, word: str = "cat") -> str:
    return " ".join([word] * n)


# ---------------------------------------------------------------------------------------------------------
# The parser

@pytest.mark.parametrize("text, expected", [
    # A1111's doctests
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.3 * 1.1 * 1.1), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.5 * 1.1),
      (", sun, ", 1.1), ("sky", 1.1 * 1.1 * 1.1 * 1.1), (".", 1.1)]),
    # nesting multiplies, innermost first
    ("((a))", [("a", 1.1 * 1.1)]),
    ("[[a]]", [("a", SQ * SQ)]),
    ("([a] b)", [("a", SQ * 1.1), (" b", 1.1)]),
    ("((a:2) b)", [("a", 2.0 * 1.1), (" b", 1.1)]),
    ("(a:0.5) (b:.25) (c:-1) (d:1.)", [("a", 0.5), (" ", 1.0), ("b", 0.25), (" ", 1.0), ("c", -1.0), (" d", 1.0)]),
    ("(a : 1.5)", [("a : 1.5", 1.1)]),  # a space before the number: not a weight, plain ( )
    # escapes: \( \) \[ \] \\ are characters; a lone backslash disappears
    ("\\(a\\) \\[b\\] c\\\\d", [("(a) [b] c\\d", 1.0)]),
    ("a\\b", [("ab", 1.0)]),
    ("(\\(x\\))", [("(x)", 1.1)]),
    # unbalanced: open brackets weigh everything after them; lone closers and weights are text
    ("[a", [("a", SQ)]),
    ("((a)", [("a", 1.1 * 1.1)]),
    ("(a [b", [("a ", 1.1), ("b", SQ * 1.1)]),
    ("a) b] c:1.5)", [("a) b] c:1.5)", 1.0)]),
    ("[a:1.5)", [("a:1.5)", SQ)]),  # a weight closes only a round bracket
    ("(a:1.5", [("a:1.5", 1.1)]),
    ("photo: a cat, 16:9", [("photo: a cat, 16:9", 1.0)]),
    # BREAK: upper case, a word of its own
    ("a BREAK b", [("a", 1.0), BREAK, ("b", 1.0)]),
    ("a BREAK BREAK b", [("a", 1.0), BREAK, ("", 1.0), BREAK, ("b", 1.0)]),
    ("aBREAK b, a break b", [("aBREAK b, a break b", 1.0)]),
    ("BREAK a", [("", 1.0), BREAK, ("a", 1.0)]),
    ("\\(BREAK\\)", [("(", 1.0), BREAK, (")", 1.0)]),
    # inside brackets BREAK still breaks and the text around it keeps the weight (A1111 would weigh its marker
    # and encode the word "BREAK" at -1.1)
    ("(a BREAK b)", [("a", 1.1), BREAK, ("b", 1.1)]),
    ("", [("", 1.0)]),
])
def test_parse(text, expected):
    assert parse(text) == [e if e is BREAK else Span(*e) for e in expected]


def test_parse_keeps_a1111_float_products():
    # weights are multiplied one bracket at a time, as A1111 does, so they equal its floats exactly
    assert parse("(((sky)))")[0].weight == 1.3310000000000004
    assert parse("a (((house:1.3)) b")[1].weight == 1.5730000000000004


def test_bad_weight_is_one_clear_error():
    with pytest.raises(ValueError, match=r"^prompt: ':1\.2\.3\)' is not a weight; write \(text:1\.2\)") as e:
        parse("a (cat:1.2.3)")
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------------------
# Chunks of 75 tokens

def test_the_test_words_are_single_tokens(tok):
    # the hand-worked chunk lengths below count one token per word
    assert all(len(tok.encode(w)) == 1 for w in ("cat", "dog", ",", "bird"))


@pytest.mark.parametrize("text, lengths", [
    (words(75), [75]),
    (words(76), [75, 1]),
    (words(150), [75, 75]),
    (words(151), [75, 75, 1]),
    # full with a comma among its last 20 tokens: what follows the comma moves to the next chunk
    (words(60) + ", " + words(20, "dog"), [61, 20]),
    (words(55) + ", " + words(30, "dog"), [56, 30]),  # 75 - 55 = 20: still within
    (words(54) + ", " + words(30, "dog"), [75, 10]),  # 21 back: cut at 75
    (words(75) + ", dog", [75, 2]),  # the 76th token is the comma itself: it starts the next chunk
    (words(10) + ", " + words(70, "dog"), [75, 6]),
    # BREAK ends the chunk; a trailing BREAK adds nothing, a leading one an empty chunk
    ("cat BREAK dog", [1, 1]),
    ("cat BREAK", [1]),
    ("BREAK cat", [0, 1]),
    ("cat BREAK BREAK dog", [1, 0, 1]),
    (words(75) + " BREAK dog", [75, 1]),  # a chunk closes when the next token comes: the full one, no empty one
    ("", [0]),
])
def test_chunk_lengths(tok, text, lengths):
    assert [c.length for c in to_chunks(text, tok)] == lengths


def test_chunk_layout_and_weights(tok):
    cat, dog, comma = tok.encode("cat")[0], tok.encode("dog")[0], tok.encode(",")[0]
    first, second = to_chunks(words(60) + ", (dog:1.5) " + words(19, "dog"), tok)
    assert first.tokens == (BOS, *[cat] * 60, comma, *[EOS] * 15)
    assert first.weights == (1.0,) * 77
    assert second.tokens == (BOS, dog, *[dog] * 19, *[EOS] * 56)
    assert second.weights == (1.0, 1.5, *[1.0] * 75)
    # per encoder: encoder 1 pads with EOS, encoder 2 with 0 after the closing EOS (as Tokenizer.__call__)
    assert ids(second, EOS) == [BOS, *[dog] * 20, *[EOS] * 56]
    assert ids(second, 0) == [BOS, *[dog] * 20, EOS, *[0] * 55]
    assert EMPTY.tokens == (BOS, *[EOS] * 76) and EMPTY.length == 0
    assert pad_rows([[first], [first, second]], 3) == [[first, EMPTY, EMPTY], [first, second, EMPTY]]


def test_chunks_match_the_tokenizer_for_plain_prompts(tok):
    prompts = ["a photo of an astronaut riding a horse on mars", "", "photo: a cat, 16:9, it's 8k!!! <|endoftext|> x",
               "Café 東京 🐱🚀 naïve"]
    for p in prompts:
        (chunk,) = to_chunks(p, tok)
        for pad_id in (EOS, 0):
            assert ids(chunk, pad_id) == tok([p], pad_id=pad_id)[0].tolist()


# ---------------------------------------------------------------------------------------------------------
# Emphasis arithmetic

def test_emphasis_by_hand():
    z = torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[1.0, -1.0], [2.0, 0.0]]])
    w = torch.tensor([[1.0, 2.0], [1.0, 1.0]])
    # row 0: weighted [[1, 2], [6, 8]], mean 17/4; unweighted mean 10/4, so the whole row is scaled by 10/17
    expected_0 = torch.tensor([[1.0, 2.0], [6.0, 8.0]]) * (10 / 17)
    out = emphasize(z, w)
    assert torch.allclose(out[0], expected_0, rtol=1e-6, atol=0)
    assert torch.equal(out[1], z[1])  # weights 1: unchanged (the mean is per prompt)
    assert emphasize(z, torch.ones(2, 2)) is z
    half = emphasize(z.half(), w)
    assert half.dtype == torch.float16 and torch.allclose(half[0].float(), expected_0, rtol=1e-3)


# ---------------------------------------------------------------------------------------------------------
# The oracles: transformers' encoders and diffusers' SDXL pipeline on the tiny weights, with CLIP tokenizers built
# from the same BPE file (as tests/test_tokenizer.py does)

def write_hf_tokenizer(folder):
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    folder.mkdir(exist_ok=True)
    merges = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    chars = list(bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return str(folder)


class Oracle:
    def __init__(self, root):
        self.folder = write_diffusers(random_models(TINY, seed=5), TINY, root / "tiny")
        files = write_hf_tokenizer(root / "tokenizer")
        self.tok_1 = transformers.CLIPTokenizer.from_pretrained(files, model_max_length=77)
        # SDXL's tokenizer_2 pads with "!", token 0
        self.tok_2 = transformers.CLIPTokenizer.from_pretrained(files, model_max_length=77, pad_token="!")
        self.te_1 = transformers.CLIPTextModel.from_pretrained(self.folder / "text_encoder").eval()
        self.te_2 = transformers.CLIPTextModelWithProjection.from_pretrained(self.folder / "text_encoder_2").eval()
        # SDXL's released config (eos_token_id 2) makes transformers pool at argmax(ids), which an added token
        # (id > EOS) wins: diffusers' pooled output is then that token's, not the end of text's. The config fixed
        # as transformers' PR #24773 intends pools at the first EOS, as open_clip and A1111 do with their ids.
        self.te_2.text_model.eos_token_id = EOS

    @torch.no_grad()
    def hidden(self, rows_1, rows_2):
        """(B, 77, 64 + 128) penultimate states and (B, 96) pooled for id rows of each encoder."""
        a = self.te_1(torch.tensor(rows_1), output_hidden_states=True).hidden_states[-2]
        out = self.te_2(torch.tensor(rows_2), output_hidden_states=True)
        return torch.cat([a, out.hidden_states[-2]], dim=-1), out.text_embeds

    def chunk_ids(self, tokens):
        """One chunk as each encoder sees it, built from transformers' tokens: BOS, tokens, EOS, then padding."""
        pad = 75 - len(tokens)
        return [BOS, *tokens, EOS, *[EOS] * pad], [BOS, *tokens, EOS, *[0] * pad]

    def tokens(self, text):
        return self.tok_1(text, add_special_tokens=False).input_ids


@pytest.fixture(scope="module")
def oracle(tmp_path_factory):
    return Oracle(tmp_path_factory.mktemp("prompt_oracle"))


@pytest.fixture(scope="module")
def pipe(oracle):
    return load(oracle.folder, device="cpu", dtype=torch.float32)


def check(name, ours, ref, rel=1e-5):
    scale = ref.abs().max().item()
    err = (ours - ref).abs().max().item()
    print(f"{name}: max abs err {err:.2e}, output scale {scale:.2e}")
    assert ours.shape == ref.shape, name
    assert err <= rel * scale, f"{name}: max abs err {err:.3e} > {rel} x {scale:.3e}"


PLAIN = ["a photo of an astronaut riding a horse on mars", "", "photo: a cat, 16:9, 8k!!!",
         "Café 東京 🐱🚀 naïve façade", words(75)]


@torch.no_grad()
def test_plain_prompts_give_todays_embeddings_bit_for_bit(pipe, oracle):
    def todays(prompts):  # what encode_prompt did before prompts were parsed: the unchanged low-level path
        h1, _ = pipe.text_encoder_1(pipe.tokenizer(prompts, pad_id=EOS))
        h2, pooled = pipe.text_encoder_2(pipe.tokenizer(prompts, pad_id=0))
        return torch.cat([h1, h2], dim=-1), pooled

    for p in PLAIN:
        context, pooled = pipe.encode_prompt(p, "blurry, lowres")
        (neg, neg_pooled), (pos, pos_pooled) = todays(["blurry, lowres"]), todays([p])
        assert context.shape == (2, 77, 192)
        assert torch.equal(context, torch.cat([neg, pos])) and torch.equal(pooled, torch.cat([neg_pooled, pos_pooled]))
        ref, ref_pooled = oracle.hidden(*oracle.chunk_ids(oracle.tokens(p)))
        check("plain prompt vs transformers", context[1:], ref)
        check("plain prompt pooled vs transformers", pooled[1:], ref_pooled)
    with pytest.raises(ValueError, match="^encode_prompt needs at least one prompt$"):
        pipe.encode_prompt([])
    with pytest.raises(ValueError, match="^1 negative prompts for 2 prompts$"):
        pipe.encode_prompt(PLAIN[:2], PLAIN[2:3])
    context, pooled = pipe.encode_prompt(PLAIN[:2], PLAIN[2:4])
    assert torch.equal(context, torch.cat([todays(PLAIN[2:4])[0], todays(PLAIN[:2])[0]]))
    assert torch.equal(pooled, torch.cat([todays(PLAIN[2:4])[1], todays(PLAIN[:2])[1]]))


@torch.no_grad()
def test_long_prompt_is_the_concatenation_of_its_chunks(pipe, oracle):
    # 60 cats, a comma, then 25 words: the 76th token finds the comma 15 back, so chunk 1 ends at the comma
    prompt = words(60) + ", " + words(24, "dog") + " (bird:1.2)"
    tokens = oracle.tokens(words(60) + ", " + words(24, "dog")) + oracle.tokens("bird")  # the spans, by hand
    assert len(tokens) == 86
    context, pooled = pipe.encode_prompt(prompt, "blurry")
    assert context.shape == (2, 154, 192) and pooled.shape == (2, 96)

    first, first_pooled = oracle.hidden(*oracle.chunk_ids(tokens[:61]))
    second, _ = oracle.hidden(*oracle.chunk_ids(tokens[61:]))
    # chunk 2's weights, by hand: BOS, 24 dogs, the bird at 1.2, padding
    w = torch.tensor([1.0] * 25 + [1.2] + [1.0] * 51)
    weighted = second * w[None, :, None]
    h1, h2 = weighted.split([64, 128], dim=-1)
    s1, s2 = second.split([64, 128], dim=-1)
    # "Original" emphasis: each encoder's chunk rescaled to its unweighted mean
    second = torch.cat([h1 * (s1.mean() / h1.mean()), h2 * (s2.mean() / h2.mean())], dim=-1)
    check("long prompt chunk 1 vs transformers", context[1, :77], first[0])
    check("long prompt chunk 2 (weighted) vs transformers", context[1, 77:], second[0])
    check("long prompt pooled (chunk 1) vs transformers", pooled[1], first_pooled[0])

    # the negative prompt is padded with the empty prompt's chunk
    neg, neg_pooled = oracle.hidden(*oracle.chunk_ids(oracle.tokens("blurry")))
    empty, _ = oracle.hidden(*oracle.chunk_ids([]))
    check("negative chunk 1 vs transformers", context[0, :77], neg[0])
    check("negative padding chunk vs transformers", context[0, 77:], empty[0])
    check("negative pooled vs transformers", pooled[0], neg_pooled[0])

    # and the other way round: a long negative prompt pads the prompt
    context, _ = pipe.encode_prompt("blurry", prompt)
    assert context.shape == (2, 154, 192)
    check("padded prompt vs transformers", context[1, 77:], empty[0])

    # no negative prompt: zeros, of the padded length
    context, pooled = pipe.encode_prompt(prompt)
    assert context.shape == (2, 154, 192) and not context[0].any() and not pooled[0].any()


@torch.no_grad()
def test_break_and_emphasis_in_both_encoders(pipe, oracle):
    context, _ = pipe.encode_prompt("a ((red)) fox BREAK [[on snow]]")
    assert context.shape == (2, 154, 192)
    # ((red)) weighs 1.1 x 1.1; [[on snow]] 1/1.1 twice; BREAK starts chunk 2
    spans = ([("a ", 1.0), ("red", 1.1 * 1.1), (" fox", 1.0)], [("on snow", SQ * SQ)])
    for chunk, chunk_spans in zip((context[1, :77], context[1, 77:]), spans):
        tokens, w = [], [1.0]
        for text, weight in chunk_spans:
            t = oracle.tokens(text)
            tokens += t
            w += [weight] * len(t)
        ref, _ = oracle.hidden(*oracle.chunk_ids(tokens))
        w = torch.tensor(w + [1.0] * (77 - len(w)))[None, :, None]
        expected = []
        for part in ref.split([64, 128], dim=-1):
            expected.append(part * w * (part.mean() / (part * w).mean()))
        check("emphasised chunk vs transformers", chunk, torch.cat(expected, dim=-1)[0])


# ---------------------------------------------------------------------------------------------------------
# Textual inversion

def write_embedding(path, clip_l, clip_g):
    save_file({"clip_l": clip_l.contiguous(), "clip_g": clip_g.contiguous()}, str(path))
    return path


@pytest.fixture(scope="module")
def embedding(tmp_path_factory):
    g = torch.Generator().manual_seed(11)
    # at the scale of the tiny token table's rows, so the vectors matter as much as words do
    vectors = 0.5 * torch.randn(3, 64, generator=g), 0.5 * torch.randn(3, 128, generator=g)
    return write_embedding(tmp_path_factory.mktemp("emb") / "neggy.safetensors", *vectors), vectors


@pytest.fixture(scope="module")
def diffusers_pipe(oracle, embedding):
    _, (clip_l, clip_g) = embedding
    pipe = diffusers.StableDiffusionXLPipeline(vae=None, unet=None, scheduler=diffusers.EulerDiscreteScheduler(),
                                               text_encoder=oracle.te_1, text_encoder_2=oracle.te_2,
                                               tokenizer=oracle.tok_1, tokenizer_2=oracle.tok_2)
    pipe.load_textual_inversion(clip_l, token="neggy", text_encoder=oracle.te_1, tokenizer=oracle.tok_1)
    pipe.load_textual_inversion(clip_g, token="neggy", text_encoder=oracle.te_2, tokenizer=oracle.tok_2)
    return pipe


@pytest.fixture(scope="module")
def ti_pipe(oracle, embedding):
    return load(oracle.folder, device="cpu", dtype=torch.float32, embeddings=[embedding[0]])


@torch.no_grad()
def test_embedding_matches_diffusers_load_textual_inversion(ti_pipe, pipe, diffusers_pipe):
    for prompt, negative in [("a photo of neggy, red fox", "neggy"), ("neggy", "blurry neggy lowres"),
                             ("a red fox", "worst quality, neggy")]:
        context, pooled = ti_pipe.encode_prompt(prompt, negative)
        ref = diffusers_pipe.encode_prompt(prompt, device="cpu", num_images_per_prompt=1,
                                           do_classifier_free_guidance=True, negative_prompt=negative)
        pos, neg, pos_pooled, neg_pooled = ref
        check(f"embedding {prompt!r} vs diffusers", context[1], pos[0])
        check(f"embedding negative {negative!r} vs diffusers", context[0], neg[0])
        check("embedding pooled vs diffusers", pooled[1], pos_pooled[0])
        check("embedding negative pooled vs diffusers", pooled[0], neg_pooled[0])
    # the embedding changes the outcome, so a wrong substitution could not pass by accident
    with_it, _ = ti_pipe.encode_prompt("a photo of neggy, red fox")
    without, _ = pipe.encode_prompt("a photo of neggy, red fox")
    assert (with_it - without).abs().max() > 0.1


@torch.no_grad()
def test_weighted_embedding(ti_pipe, diffusers_pipe, oracle):
    # (neggy:1.3) weighs all three of its vectors; the rest as diffusers encodes "neggy cat", rescaled by hand
    context, _ = ti_pipe.encode_prompt("(neggy:1.3) cat")
    ref = diffusers_pipe.encode_prompt("neggy cat", device="cpu", num_images_per_prompt=1,
                                       do_classifier_free_guidance=False)[0]
    w = torch.tensor([1.0, 1.3, 1.3, 1.3] + [1.0] * 73)[None, :, None]
    expected = torch.cat([p * w * (p.mean() / (p * w).mean()) for p in ref.split([64, 128], dim=-1)], dim=-1)
    check("weighted embedding vs diffusers + hand emphasis", context[1], expected[0])


def test_embedding_tokens_in_chunks(ti_pipe, tok):
    e = ti_pipe.embeddings
    vec = [Vector("neggy", i) for i in range(3)]
    # an embedding never straddles two chunks
    first, second = to_chunks(words(73) + " neggy", tok, e)
    assert first.length == 73 and second.tokens[1:4] == tuple(vec) and second.length == 3
    # moved at a comma, it keeps its vectors
    first, second = to_chunks(words(60) + ", neggy " + words(12, "dog"), tok, e)
    assert first.length == 61 and second.tokens[1:4] == tuple(vec) and second.length == 15
    # matched as a word, in any case, not inside another word
    assert to_chunks("NEGGY", tok, e)[0].tokens[1:4] == tuple(vec)
    assert not any(isinstance(t, Vector) for t in to_chunks("aneggy neggys", tok, e)[0].tokens)
    (chunk,) = to_chunks("x neggy", tok, e)
    assert ids(chunk, EOS)[:6] == [BOS, tok.encode("x")[0], 0, 0, 0, EOS]  # placeholders are token 0, as A1111


# ---------------------------------------------------------------------------------------------------------
# Errors: one line each, naming the file and what to do

def one_line(path, pattern, encode):
    with pytest.raises(CheckpointError) as e:
        load_embeddings([path], WIDTHS, encode)
    message = str(e.value)
    assert "\n" not in message and str(path) in message
    assert pattern in message, message


def test_embedding_errors(tmp_path, tok):
    l, g = torch.zeros(2, 64), torch.zeros(2, 128)
    pt = tmp_path / "neg.pt"
    pt.write_bytes(b"PK\x03\x04 not opened")
    one_line(pt, "a pickled embedding (.pt) is not loaded", tok.encode)
    disguised = tmp_path / "pickle.safetensors"
    disguised.write_bytes(b"\x80\x02" + b"\x00" * 64)
    one_line(disguised, "unpickling can run code", tok.encode)
    sd15 = tmp_path / "sd15.safetensors"
    save_file({"emb_params": torch.zeros(2, 768)}, str(sd15))
    one_line(sd15, "an SD 1.5 (or 2.x) embedding", tok.encode)
    a1111 = tmp_path / "a1111.safetensors"
    save_file({"string_to_param.*": torch.zeros(2, 768)}, str(a1111))
    one_line(a1111, "an SD 1.5 (or 2.x) embedding", tok.encode)
    only_g = tmp_path / "only_g.safetensors"
    save_file({"clip_g": g}, str(only_g))
    one_line(only_g, "must hold exactly the tensors clip_l and clip_g, it has 'clip_g'", tok.encode)
    extra = tmp_path / "extra.safetensors"
    save_file({"clip_l": l, "clip_g": g, "junk": l.clone()}, str(extra))
    one_line(extra, "(unexpected: 'junk')", tok.encode)
    full_size = write_embedding(tmp_path / "full.safetensors", torch.zeros(2, 768), torch.zeros(2, 1280))
    one_line(full_size, "clip_l is 2 x 768, not n x 64; clip_g is 2 x 1280, not n x 128 (this model's text encoders "
                        "are 64 and 128 wide)", tok.encode)
    flat = tmp_path / "flat.safetensors"
    save_file({"clip_l": torch.zeros(64), "clip_g": g}, str(flat))
    one_line(flat, "clip_l is 64, not n x 64", tok.encode)
    ints = tmp_path / "ints.safetensors"
    save_file({"clip_l": torch.zeros(2, 64, dtype=torch.int32), "clip_g": g}, str(ints))
    one_line(ints, "clip_l is int32, not floating point", tok.encode)
    nan = write_embedding(tmp_path / "nan.safetensors", l, torch.full((2, 128), float("nan")))
    one_line(nan, "NaN or inf in clip_g: the file is damaged", tok.encode)
    counts = write_embedding(tmp_path / "counts.safetensors", torch.zeros(3, 64), g)
    one_line(counts, "clip_l has 3 vectors but clip_g 2", tok.encode)
    long = write_embedding(tmp_path / "long.safetensors", torch.zeros(76, 64), torch.zeros(76, 128))
    one_line(long, "76 vectors; an embedding needs 1 to 75", tok.encode)
    empty = write_embedding(tmp_path / "empty.safetensors", torch.zeros(0, 64), torch.zeros(0, 128))
    one_line(empty, "0 vectors", tok.encode)
    nameless = write_embedding(tmp_path / " .safetensors", l, g)
    one_line(nameless, "the name ' ' has no tokens, so no prompt can call it", tok.encode)


def test_same_word_twice_is_an_error(tmp_path, tok):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = write_embedding(tmp_path / "a" / "Neggy.safetensors", torch.zeros(1, 64), torch.zeros(1, 128))
    second = write_embedding(tmp_path / "b" / "neggy.safetensors", torch.zeros(1, 64), torch.zeros(1, 128))
    with pytest.raises(CheckpointError, match="its name 'neggy' is the same word as that of .*Neggy.safetensors"):
        load_embeddings([first, second], WIDTHS, tok.encode)


def test_load_checks_embeddings_against_the_model(oracle, tmp_path):
    full_size = write_embedding(tmp_path / "xl.safetensors", torch.zeros(1, 768), torch.zeros(1, 1280))
    with pytest.raises(CheckpointError, match="not n x 64"):
        load(oracle.folder, device="cpu", dtype=torch.float32, embeddings=[full_size])


# ---------------------------------------------------------------------------------------------------------
# The sampler takes 77 x k tokens of context

def test_generation_sees_every_chunk(pipe, monkeypatch):
    contexts = []

    class Recording(torch.nn.Module):
        def __init__(self, unet):
            super().__init__()
            self.unet = unet

        def forward(self, x, t, context, *rest, **kwargs):
            contexts.append(context.shape)
            return self.unet(x, t, context, *rest, **kwargs)

    monkeypatch.setattr(pipe, "unet", Recording(pipe.unet))
    long = words(75) + " dog"
    run = dict(negative_prompt="blurry", height=256, width=256, num_inference_steps=1, seed=0)
    with_dog, without = pipe.generate(long, **run), pipe.generate(words(75), **run)
    assert contexts[0][1:] == (154, 192) and contexts[-1][1:] == (77, 192)
    assert not torch.equal(with_dog.latents[0], without.latents[0])  # the 76th token reaches the UNet
