"""msmarco/models.py: the one-logit head of cross_encoder() on the encoders the recipes name (BERT, DistilBERT,
RoBERTa, ELECTRA), built here as tiny random-weight models, offline."""
import pytest
import torch

from msmarco import models

TINY = dict(vocab_size=30522, num_labels=1)  # the vocabulary of the offline model's BERT tokenizer
ARCHS = {
    "bert": dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37),
    "distilbert": dict(dim=32, n_layers=1, n_heads=2, hidden_dim=37),  # head: pre_classifier + classifier
    "roberta": dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37),
    "electra": dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37,
                    embedding_size=16),  # roberta and electra: classifier.dense + classifier.out_proj
}
PAIRS = [("what is a cat", "A cat is a small domesticated carnivorous mammal."), ("tea", "Tea is a drink.")]


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """Folder per architecture: a random-weight one-label sequence classifier with the offline model's tokenizer."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(models.offline_base_model())
    assert len(tok) == TINY["vocab_size"]
    out = {}
    for arch, kw in ARCHS.items():
        torch.manual_seed(0)
        folder = tmp_path_factory.mktemp(arch)
        AutoModelForSequenceClassification.from_config(AutoConfig.for_model(arch, **TINY, **kw)).save_pretrained(folder)
        tok.save_pretrained(folder)
        out[arch] = str(folder)
    return out


@pytest.mark.parametrize("pooling", ["cls", "mean"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_head_bias_is_the_bias_of_the_logit(tiny_models, arch, pooling):
    model = models.cross_encoder(tiny_models[arch], max_length=32, pooling=pooling)
    bias = models.head_bias(model)
    assert bias.shape == (1,)
    before = model.predict(PAIRS, activation_fn=torch.nn.Identity(), convert_to_tensor=True)
    old = float(bias[0])
    bias.fill_(old + 2.5)
    after = model.predict(PAIRS, activation_fn=torch.nn.Identity(), convert_to_tensor=True)
    torch.testing.assert_close(after - before, torch.full_like(before, 2.5), atol=1e-4, rtol=0)


def test_head_bias_without_a_biased_logit_layer_names_the_model(tiny_models):
    model = models.cross_encoder(tiny_models["bert"], max_length=32, pooling="cls")
    model[0].auto_model.classifier = torch.nn.Linear(32, 1, bias=False)
    with pytest.raises(SystemExit, match="BertForSequenceClassification"):
        models.head_bias(model)
