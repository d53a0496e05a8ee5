"""Text encoders: tokeniser and vocabulary, the causal dilated decoder, KL annealing, skip-thought
neighbours and vocabulary expansion, and each encoder's loss falling on real plot sentences."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from encoders import Encoder, TextCorpus, get_encoder
from encoders._text import BOS, EOS, PAD, UNK, TokenBatch, Vocabulary, split_sentences, tokenize
from encoders.skip_thought import cooccurrence_vectors, fit_linear_map, neighbours
from encoders.text_vae import DilatedCNNDecoder, free_bits_kl, gaussian_kl, kl_weight

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
PLOTS = DATA / "movie-plots" / "movies_extrainfos.dat"

DOCUMENTS = [
    ["The detective finds a hidden map.", "He loses the map at night."],
    [],
    ["A young woman builds a strange machine.", "The machine destroys the town.", "She protects her brother."],
    ["Two brothers hunt the old sailor."],
    ["The robot remembers the lost city.", "The city is hidden under the sea."],
]
CORPUS = TextCorpus(DOCUMENTS, [f"d{k}" for k in range(len(DOCUMENTS))])
TINY = {"embed_dim": 8, "hidden_dim": 8, "min_count": 1, "epochs": 1, "batch_size": 4, "seed": 0}


# ------------------------------------------------------------------ tokeniser and vocabulary
def test_tokenize_lowercases_and_splits_punctuation():
    assert tokenize('Andy\'s toys, "ALIVE"!') == ["andy's", "toys", ",", '"', "alive", '"', "!"]


def test_split_sentences_keeps_titles_together():
    text = "Mr. Smith meets Dr. Who. They fly away! Do they return?"
    assert split_sentences(text) == ["Mr. Smith meets Dr. Who.", "They fly away!", "Do they return?"]


def test_vocabulary_min_count_order_cap_and_unknown_words():
    vocab = Vocabulary.build([["b", "a", "a"], ["c", "a", "b"]], min_count=2)
    assert vocab.words == ["<pad>", "<unk>", "<bos>", "<eos>", "a", "b"]
    assert vocab.ids(["a", "c", "zebra"]) == [4, UNK, UNK]
    assert Vocabulary.build([["b", "a", "a"], ["c", "a", "b"]], max_size=5).words[4:] == ["a"]
    assert Vocabulary.from_extra(vocab.to_extra()).words == vocab.words


def test_encoder_cuts_sentences_at_max_len_and_maps_unseen_words_to_unk():
    encoder = get_encoder("lstm-lm")(**TINY, max_len=3).fit(CORPUS)
    ids = encoder.sentence_ids(["the detective finds a hidden map", "the zebra"])
    assert len(ids[0]) == 3 and ids[0] == encoder.vocab.ids(["the", "detective", "finds"])
    assert ids[1][1] == UNK


def test_token_batch_padding_eos_and_teacher_forcing():
    batch = TokenBatch.from_ids([[5, 6], [], [7]])
    assert batch.words.tolist() == [[5, 6], [PAD, PAD], [7, PAD]] and batch.lengths.tolist() == [2, 0, 1]
    tokens, lengths = batch.with_eos()
    assert tokens.tolist() == [[5, 6, EOS], [EOS, PAD, PAD], [7, EOS, PAD]] and lengths.tolist() == [3, 1, 2]
    inputs, targets = batch.decoder_io(n_output=7)  # id 7 exists on the encoder side only
    assert inputs.tolist() == [[BOS, 5, 6], [BOS, PAD, PAD], [BOS, UNK, PAD]]
    assert targets.tolist() == [[5, 6, EOS], [EOS, PAD, PAD], [UNK, EOS, PAD]]
    assert batch.n_target_tokens() == 6


def test_text_encoder_rejects_an_image_corpus():
    from encoders import ImageCorpus

    images = ImageCorpus.single_images(np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(TypeError, match="TextCorpus"):
        get_encoder("seq-autoencoder")(**TINY).fit(images)


# ------------------------------------------------------------------ text VAE
@pytest.mark.parametrize(("kernel", "dilations"), [(3, [1, 2, 4]), (2, [1, 1]), (3, [4])])
def test_dilated_decoder_never_sees_future_tokens(kernel, dilations):
    torch.manual_seed(0)
    decoder = DilatedCNNDecoder(in_dim=5, channels=6, kernel_size=kernel, dilations=dilations, dropout=0.0).double()
    inputs = torch.randn(2, 24, 5, dtype=torch.float64, requires_grad=True)
    outputs = decoder(inputs)
    for k in range(inputs.shape[1]):
        (grad,) = torch.autograd.grad(outputs[0, k].sum(), inputs, retain_graph=True)
        assert torch.all(grad[0, k + 1 :] == 0), f"output {k} sees a future input"
        assert torch.all(grad[0, : max(k - decoder.receptive_field + 1, 0)] == 0), "sees past its receptive field"
        assert torch.all(grad[1] == 0)
        assert grad[0, k].abs().sum() > 0


@pytest.mark.parametrize("decoder", ["lstm", "cnn"])
def test_vae_next_word_logits_ignore_later_words(decoder):
    vae = get_encoder("text-vae")(**TINY, latent_dim=4, decoder=decoder).fit(CORPUS)
    inputs = torch.tensor([[BOS, 4, 5, 6, 7, 8]])
    changed = inputs.clone()
    changed[0, 4:] = torch.tensor([9, 10])
    z = torch.randn(1, 4)
    with torch.no_grad():
        a, b = vae.decode_logits(z, inputs), vae.decode_logits(z, changed)
    assert torch.equal(a[0, :4], b[0, :4]) and not torch.equal(a[0, 4:], b[0, 4:])


def test_kl_annealing_schedules():
    assert [kl_weight(s, "linear", 100) for s in (0, 25, 50, 100, 400)] == [0.0, 0.25, 0.5, 1.0, 1.0]
    sigmoid = [kl_weight(s, "sigmoid", 100) for s in range(0, 201, 10)]
    assert sigmoid[0] < 0.01 and sigmoid[5] == pytest.approx(0.5) and sigmoid[10] > 0.99
    assert all(later > earlier for earlier, later in zip(sigmoid, sigmoid[1:], strict=False))
    assert kl_weight(0, "none", 100) == 1.0
    with pytest.raises(ValueError, match="kl_anneal"):
        kl_weight(0, "cosine", 100)


def test_vae_anneals_per_training_step_and_reports_kl():
    vae = get_encoder("text-vae")(**{**TINY, "epochs": 3, "batch_size": 2}, kl_anneal_steps=10).fit(CORPUS)
    # 8 sentences / batch 2 = 4 steps per epoch; the epoch's kl_weight is the mean over its steps
    assert int(vae.module.steps_done) == 12
    assert [round(r["kl_weight"], 3) for r in vae.history] == [0.15, 0.55, 0.925]  # steps 8..11: 0.8, 0.9, 1, 1
    figures = vae.evaluate(CORPUS)
    assert figures["kl"] > 0 and figures["nll_nats"] == pytest.approx(figures["recon_nats"] + figures["kl"])
    assert vae.evaluate(CORPUS) == figures  # the held-out bound's sample is seeded


def test_free_bits_charge_each_dimension_at_least_lambda():
    mu = torch.tensor([[0.0, 2.0], [0.0, 0.0]])
    logvar = torch.zeros(2, 2)
    # dimension 0 has KL 0, dimension 1 has KL 2 then 0 (mean 1): charged max(0.5, 0) + max(0.5, 1) per row
    assert float(gaussian_kl(mu, logvar).sum()) == pytest.approx(2.0)
    assert float(free_bits_kl(0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar), 0.5)) == pytest.approx(2 * (0.5 + 1.0))


def test_free_bits_keep_the_held_out_kl_away_from_zero():
    def trained(free_bits):
        return get_encoder("text-vae")(**{**TINY, "epochs": 4, "batch_size": 2}, kl_anneal_steps=2, free_bits=free_bits).fit(CORPUS)

    plain, guarded = trained(0.0).evaluate(CORPUS)["kl"], trained(1.0).evaluate(CORPUS)["kl"]
    assert guarded > plain and guarded > 0.5


# ------------------------------------------------------------------ skip-thought
def test_neighbours_stay_within_documents():
    prev, nxt = neighbours(np.array([0, 2, 2, 5, 6]))
    assert prev.tolist() == [-1, 0, -1, 2, 3, -1]
    assert nxt.tolist() == [1, -1, 3, 4, -1, -1]


def test_skip_thought_batches_pair_sentences_of_one_document():
    encoder = get_encoder("skip-thought")(**{**TINY, "batch_size": 16}).fit(CORPUS)
    (batch,) = list(encoder._make_batches(CORPUS, None))
    ids = encoder.sentence_ids(CORPUS.sentences)
    by_ids = {tuple(i): n for n, i in enumerate(ids)}
    doc_of = np.repeat(np.arange(CORPUS.n_items), np.diff(CORPUS.offsets))
    centres = [by_ids[tuple(row[:n].tolist())] for row, n in zip(batch.centre.words, batch.centre.lengths, strict=True)]
    assert 5 not in centres and len(centres) == 7  # sentence 5, alone in document 3, predicts nothing
    for side, present in ((batch.prev, batch.has_prev), (batch.next, batch.has_next)):
        for centre, row, n, there in zip(centres, side.words, side.lengths, present, strict=True):
            if there:
                assert doc_of[by_ids[tuple(row[:n].tolist())]] == doc_of[centre]
            else:
                assert n == 0


def test_least_squares_map_recovers_a_known_linear_map():
    rng = np.random.default_rng(0)
    source, true_map = rng.normal(size=(40, 6)), rng.normal(size=(6, 4))
    found = fit_linear_map(torch.as_tensor(source), torch.as_tensor(source @ true_map))
    np.testing.assert_allclose(found.numpy(), true_map, atol=1e-10)


@pytest.mark.parametrize("variant", ["uni", "combine"])
def test_vocabulary_expansion_maps_unseen_words_through_the_fitted_map(variant):
    encoder = get_encoder("skip-thought")(**TINY, variant=variant).fit(CORPUS)
    trained = encoder.vocab.words[4:]
    rng = np.random.default_rng(1)
    space = {w: rng.normal(size=10) for w in [*trained, "zebra", "giraffe"]}
    true_maps = [rng.normal(size=(10, 8)) for _ in encoder.module.models]
    with torch.no_grad():  # make every encoder's embeddings an exact linear image of the space
        for model, true_map in zip(encoder.module.models, true_maps, strict=True):
            for word in trained:
                model.embed.weight[encoder.vocab.index[word]] = torch.as_tensor(space[word] @ true_map)
    assert encoder.expand_vocabulary(space) == ["zebra", "giraffe"]
    zebra = encoder.vocab.ids(["zebra"])[0]
    assert zebra >= encoder.vocab.n_output
    for model, true_map in zip(encoder.module.models, true_maps, strict=True):
        np.testing.assert_allclose(model.embed.weight[zebra].detach().numpy(), space["zebra"] @ true_map, atol=1e-4)


def test_vocabulary_expansion_from_a_corpus_word_space_survives_save_load(tmp_path):
    encoder = get_encoder("skip-thought")(**TINY).fit(CORPUS)
    more = CORPUS.sentences + ["The zebra finds a hidden map.", "A zebra builds the machine."]
    added = encoder.expand_vocabulary(cooccurrence_vectors(more, dim=6))
    assert added == ["zebra"] and encoder.sentence_ids(["the zebra"])[0][1] != UNK
    probe = TextCorpus([["The zebra finds a hidden map."], ["The giraffe finds a hidden map."]], ["a", "b"])
    vectors = encoder.encode(probe).matrix
    assert not np.allclose(vectors[0], vectors[1])  # zebra is no longer <unk> (giraffe still is)
    encoder.save(tmp_path / "skip")
    np.testing.assert_array_equal(Encoder.load(tmp_path / "skip").encode(probe).matrix, vectors)


# ------------------------------------------------------------------ training on real plots
@pytest.fixture(scope="module")
def plot_slice() -> TextCorpus:
    if not PLOTS.is_file():
        pytest.skip(f"needs the movie plots at {PLOTS} (not shipped with the repo)")
    from acfrec.datasets.movielens import read_plots
    from acfrec.datasets.movielens import split_sentences as split_plot

    plots = [entry[2] for _, entry in sorted(read_plots(PLOTS).items(), key=lambda kv: int(kv[0])) if entry[2]]
    documents = [split_plot(plot)[:4] for plot in plots[:30]]
    return TextCorpus(documents, [str(k) for k in range(len(documents))])


LOSS_FALLS = {
    "seq-autoencoder": {},
    "lstm-lm": {},
    "skip-thought": {"variant": "bi"},
    "hierarchical-autoencoder": {"attention": True, "batch_size": 8},
    "text-vae": {"kl_anneal": "none"},
    "text-vae (cnn)": {"decoder": "cnn", "cnn_dilations": [1, 2], "kl_anneal": "none"},
}


@pytest.mark.shared_data
@pytest.mark.parametrize("case", sorted(LOSS_FALLS))
def test_loss_falls_on_real_plot_sentences(case, plot_slice):
    options = {"embed_dim": 32, "hidden_dim": 32, "min_count": 1, "max_len": 25, "batch_size": 32, "lr": 1e-2,
               "epochs": 4, "seed": 0, **LOSS_FALLS[case]}
    encoder = get_encoder(case.split(" ")[0])(**options).fit(plot_slice)
    # per token: batches of long and short sentences make the per-sentence loss jumpy
    losses = [r["nll_per_token"] for r in encoder.history]
    assert losses[-1] < 0.85 * losses[0], f"{case}: training NLL per token by epoch {losses}"
