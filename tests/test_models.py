"""msmarco/models.py: the one-logit head of cross_encoder() on the encoders the recipes name (BERT, DistilBERT,
RoBERTa, ELECTRA), built here as tiny random-weight models, offline; the mixed precision a run trains and scores in,
on simulated GPUs and CPUs."""
import contextlib
from types import SimpleNamespace

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


@pytest.mark.parametrize("arch", ["bert", "roberta"])
def test_the_mean_head_scores_the_masked_mean_of_the_token_states(tiny_models, arch):
    """pooling=mean (both sample presets): the logit is the linear head on the mean of the pair's token states,
    padding left out; [CLS] alone, or a mean over the padding, would score otherwise."""
    model = models.cross_encoder(tiny_models[arch], max_length=32, pooling="mean")
    model.eval()
    scores = model.predict(PAIRS, activation_fn=torch.nn.Identity(), convert_to_tensor=True)
    batch = model.tokenizer([q for q, _ in PAIRS], [p for _, p in PAIRS], padding=True, truncation=True,
                            max_length=32, return_tensors="pt")
    assert not batch["attention_mask"].all()  # the pairs differ in length: one of them is padded
    with torch.no_grad():
        states = model[0].auto_model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        mean = (states * mask).sum(1) / mask.sum(1)
        head = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
        torch.testing.assert_close(scores, head(mean).squeeze(-1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["bert", "distilbert"])  # their configs name dropout differently
def test_dropout_zero_makes_training_forward_passes_deterministic(tiny_models, arch):
    features = None
    for dropout, same in ((-1.0, False), (0.0, True)):
        torch.manual_seed(0)
        model = models.cross_encoder(tiny_models[arch], max_length=32, pooling="mean", dropout=dropout)
        rates = {m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)}
        assert rates == ({0.0} if same else {0.1}), rates  # -1 keeps the base model's own
        config = model[0].auto_model.config  # what a saved model would carry: the base model's dropout, unchanged
        assert getattr(config, "hidden_dropout_prob", getattr(config, "dropout", None)) == 0.1
        features = features or model.preprocess(PAIRS)
        model.train()
        first, second = (model(dict(features))["scores"] for _ in range(2))
        assert torch.equal(first, second) == same
    model.eval()
    assert torch.equal(model(dict(features))["scores"], first)  # no dropout: training computes what scoring does
    with pytest.raises(SystemExit, match="--dropout must be in"):
        models.cross_encoder(tiny_models["bert"], max_length=32, pooling="mean", dropout=1.5)


@pytest.mark.parametrize("pooling", ["cls", "mean"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_frozen_embeddings_get_no_gradient_and_the_rest_trains(tiny_models, arch, pooling):
    model = models.cross_encoder(tiny_models[arch], max_length=32, pooling=pooling, freeze_embeddings=True)
    model.train()
    model(dict(model.preprocess(PAIRS)))["scores"].sum().backward()
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and all(".embeddings." in n or ".pooler." in n for n in frozen), sorted(frozen)
    assert any("word_embeddings" in n for n in frozen)  # the bulk of the layer, its vocabulary
    for n, p in model.named_parameters():  # frozen weights get no gradient, the encoder and head get theirs
        assert (p.grad is None) == (n in frozen), n
    with pytest.raises(SystemExit, match="no embeddings layer"):
        model[0].auto_model.base_model.embeddings = None
        models.freeze_embedding_layer(model[0])


def test_head_bias_without_a_biased_logit_layer_names_the_model(tiny_models):
    model = models.cross_encoder(tiny_models["bert"], max_length=32, pooling="cls")
    model[0].auto_model.classifier = torch.nn.Linear(32, 1, bias=False)
    with pytest.raises(SystemExit, match="BertForSequenceClassification"):
        models.head_bias(model)


def simulate(monkeypatch, gpu: tuple | None, amx: bool = False) -> None:
    """This machine as a CUDA GPU of compute capability `gpu` (None: no GPU) and a CPU with or without AMX tiles.
    torch.cuda.is_bf16_supported itself runs, over a device where a bf16 tensor can be made (emulated on GPUs
    before 8.0), as on a real V100 or T4."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu is not None)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: gpu)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: SimpleNamespace(major=gpu[0],
                                                                                                 minor=gpu[1]))
    monkeypatch.setattr(torch.cuda, "_check_bf16_tensor_supported", lambda device: True)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)


@pytest.mark.parametrize("machine,gpu,amx,args,dtype", [
    ("H100", (9, 0), False, {"bf16": True, "fp16": False, "use_cpu": False}, torch.bfloat16),
    ("A100", (8, 0), True, {"bf16": True, "fp16": False, "use_cpu": False}, torch.bfloat16),
    ("V100", (7, 0), False, {"bf16": False, "fp16": True, "use_cpu": False}, torch.float16),  # bf16 only emulated
    ("T4", (7, 5), True, {"bf16": False, "fp16": True, "use_cpu": False}, torch.float16),
    ("CPU with AMX", None, True, {"bf16": True, "fp16": False, "use_cpu": True}, torch.bfloat16),
    ("CPU without AMX", None, False, {"bf16": False, "fp16": False, "use_cpu": True}, None),
])
def test_mixed_precision_where_it_pays(monkeypatch, machine, gpu, amx, args, dtype):
    simulate(monkeypatch, gpu, amx)
    cudnn, flash = [], []  # what the code asked of torch's cuDNN and flash attention switches (recorded, not applied)
    monkeypatch.setattr(torch.backends.cuda, "enable_cudnn_sdp", cudnn.append)
    monkeypatch.setattr(torch.backends.cuda, "enable_flash_sdp", flash.append)
    if gpu is not None:
        assert torch.cuda.is_bf16_supported()  # what the trainers chose by: emulation counts
    assert models.precision_args(True) == args
    assert models.precision_args(False) == {"bf16": False, "fp16": False, "use_cpu": gpu is None}
    # a GPU in half precision trains without cuDNN's attention, a CPU in bf16 without the flash kernel (both measured
    # slower); nothing else touches the switches
    assert cudnn == ([False] if gpu else [])
    assert flash == ([False] if gpu is None and amx else [])
    device = "cuda" if gpu else "cpu"
    ctx = models.autocast(torch.device(device))
    assert cudnn == ([False, False] if gpu else [])
    assert flash == ([False] if gpu is None and amx else [])  # evaluate.py keeps it: its forward is as fast
    if dtype is None:
        assert isinstance(ctx, contextlib.nullcontext)
    else:
        assert isinstance(ctx, torch.autocast) and ctx.device == device and ctx.fast_dtype == dtype
    # a model left on the CPU of a GPU machine scores as that CPU allows; other devices without autocast
    assert isinstance(models.autocast("cpu"), torch.autocast) == amx
    assert isinstance(models.autocast("meta"), contextlib.nullcontext)


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_a_model_the_hub_cannot_serve_is_named_with_what_to_do(pooling):
    """Offline (the tests always are) or misspelt: a ModelError, which a script ends on with exit code 1 and the
    message, not transformers' traceback."""
    from msmarco import errors
    with pytest.raises(errors.ModelError, match=r"could not load the model 'nope-org/nope-model-xyz'.*offline:"):
        models.cross_encoder("nope-org/nope-model-xyz", max_length=32, pooling=pooling)
    assert errors.ModelError in errors.USER_ERRORS
    with pytest.raises(errors.ModelError, match="nope-model-xyz"), models.loading("nope-org/nope-model-xyz"):
        from sentence_transformers.sentence_transformer.modules import Transformer
        Transformer("nope-org/nope-model-xyz")
