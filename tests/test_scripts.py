"""The three training scripts, imported as modules and run with tiny budgets on the bundled sample."""
import dataclasses
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT, rewrite_text
from msmarco import config, errors, evaluation, metrics, paths
from msmarco.data import MSMarco
from msmarco.models import offline_base_model

SCRIPTS = ["train_cross-encoder-v1", "train_cross-encoder-v2", "train_bi-encoder-v2"]


def load(name: str):
    """Import a script whose file name has hyphens; nothing runs at import time."""
    spec = importlib.util.spec_from_file_location(name.replace("-", "_"), ROOT / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


TINY = ["--sample", "--max_steps=4", "--eval_steps=2", "--eval_queries=6", "--eval_candidates=6",
        "--batch_size=4", "--logging_steps=1", "--report_splits="]
TINY_LEN = {"train_cross-encoder-v1": ["--max_length=48"], "train_cross-encoder-v2": ["--max_length=48"],
            "train_bi-encoder-v2": ["--max_seq_length=16", "--eval_max_seq_length=16", "--retrieval_k=20",
                                    "--retrieval_eval=false"]}
# retrieval from the whole sample collection (28k passages) is run by the torchrun tests (before and after training,
# and at a checkpoint), not by these tiny runs nor by the bi-encoder's --sample preset (`retrieval_eval=False`)


def tiny_config(name: str, out, *extra: str):
    mod = load(name)
    return mod, config.script_config(mod.Config(), mod.SAMPLE, TINY + TINY_LEN[name] + [f"--output_dir={out}", *extra])


def dev_test(cfg) -> evaluation.RerankSet:
    """The script's dev-test set: its first stage's candidates of held-out dev queries that chose nothing."""
    data = MSMarco(cfg.data_dir)
    return evaluation.load_rerank_set(data, "dev-test", cfg.eval_queries, cfg.eval_candidates,
                                      evaluation.first_stage_of(data.dir, cfg.first_stage))


def rerun_metrics(name: str, model_dir, cfg) -> dict:
    """Metrics of the saved model, loaded with stock sentence-transformers, on the script's dev-test set."""
    from sentence_transformers import CrossEncoder, SentenceTransformer
    dev = dev_test(cfg)
    if name.startswith("train_bi"):
        return evaluation.rerank_metrics(evaluation.bi_encoder_run(SentenceTransformer(str(model_dir)), dev), dev)
    return evaluation.rerank_metrics(evaluation.cross_encoder_run(CrossEncoder(str(model_dir)), dev), dev)


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    """Each script's tiny run, once for the tests of this module: name -> (module, config, results, output)."""
    runs = {}

    def run(name):
        if name not in runs:
            out = tmp_path_factory.mktemp(name) / "out"
            extra = ["--report_to=tensorboard"] if name == "train_cross-encoder-v1" else []
            mod, cfg = tiny_config(name, out, *extra)
            runs[name] = mod, cfg, mod.main(cfg), out
        return runs[name]
    return run


@pytest.mark.parametrize("name", SCRIPTS)
def test_trains_evaluates_saves_and_reloads(name, tiny_runs):
    mod, cfg, res, out = tiny_runs(name)
    for f in ["config.json", "metrics.jsonl", "metrics.png", "results.json", "baselines.json", "model"]:
        assert (out / f).exists(), f
    assert not (out / "model.tmp").exists()
    assert json.loads((out / "config.json").read_text())["max_steps"] == 4
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in history if "loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in history if "eval_dev-tune_MRR@10" in r] == [0, 2, 4]  # 0: the untrained model
    assert sorted(p.name for p in (out / "checkpoints").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    for key in ("first_stage", "untrained"):
        assert 0.0 <= res["dev-tune"][key]["MRR@10"] <= 1.0
    for key in ("first_stage", "trained"):
        assert 0.0 <= res["dev-test"][key]["MRR@10"] <= 1.0
    # the first-stage baseline is the BM25 run's order of the same candidates, scored by the shared metrics
    dev = dev_test(cfg)
    assert "runs/bm25/dev.run" in dev.first_stage and all(len(c) == 6 for c in dev.candidates)
    assert res["dev-test"]["first_stage"] == evaluation.rerank_metrics(evaluation.candidate_order_run(dev), dev)
    assert set(dev.qids).isdisjoint(evaluation.load_rerank_set(MSMarco(cfg.data_dir), "dev-tune").qids)
    # the saved model is the one the script evaluated, and loads with stock sentence-transformers
    assert rerun_metrics(name, out / "model", cfg) == pytest.approx(res["dev-test"]["trained"], abs=1e-9)
    # ... the checkpoint with the best dev-tune MRR@10 (the earlier on a tie), and a trained one: its encoder moved
    mrr = {r["step"]: r["eval_dev-tune_MRR@10"] for r in history if "eval_dev-tune_MRR@10" in r and r["step"]}
    state = json.loads((out / "checkpoints" / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["best_model_checkpoint"].endswith(f"checkpoint-{2 if mrr[2] >= mrr[4] else 4}"), (mrr, state)
    from safetensors.numpy import load_file
    key = "encoder.layer.0.attention.self.query.weight"
    base = load_file(str(Path(offline_base_model()) / "model.safetensors"))[key]
    saved, = (w for k, w in load_file(str(next((out / "model").rglob("model.safetensors")))).items() if k.endswith(key))
    assert np.abs(saved.astype(np.float32) - base).max() > 1e-6


def test_the_evaluation_queries_do_not_depend_on_the_training_seed(tmp_path):
    """At full scale the scripts score a subset of the dev queries (--eval_queries of thousands): every seed of a
    recipe must tune and report on the same ones, or a mean over seeds mixes query sampling with training noise."""
    _, a = tiny_config("train_cross-encoder-v1", tmp_path / "a", "--eval_queries=5", "--seed=12")
    _, b = tiny_config("train_cross-encoder-v1", tmp_path / "b", "--eval_queries=5", "--seed=13")
    data = MSMarco(a.data_dir)
    (tune_a, reports_a), (tune_b, reports_b) = evaluation.evaluation_sets(data, a), evaluation.evaluation_sets(data, b)
    assert tune_a.qids == tune_b.qids and len(tune_a.qids) == 5
    assert [r.qids for r in reports_a] == [r.qids for r in reports_b]


def test_no_first_stage_row_for_a_candidate_files_order():
    """Without --first_stage the candidates are a candidate file's, whose order is no ranking (as in the official
    files): the tables and the plot get no first-stage row, so no random order is reported as BM25. With a BM25 run
    the row is there."""
    data = MSMarco(paths.SAMPLE_DIR)
    plain = evaluation.load_rerank_set(data, "dev-test", 5)
    bm25 = evaluation.load_rerank_set(data, "dev-test", 5, 6, "data/sample/runs/bm25")
    assert not plain.ranked and bm25.ranked and "not a ranking" in plain.first_stage
    assert evaluation.rerank_table([plain], evaluation.cross_encoder_run, {}) == {"dev-test": {}}
    assert set(evaluation.rerank_table([bm25], evaluation.cross_encoder_run, {})["dev-test"]) == {"first_stage"}


def test_the_data_folders_bm25_runs_are_its_first_stage(copy):
    """Without --first_stage a script reranks its data folder's BM25 runs (runs/bm25/<split>.run), as evaluate.py
    does: a copy of the sample uses its own, and a folder without them (the full downloads) BM25's ranking of the
    candidate files (msmarco/bm25.py, tests/test_bm25.py)."""
    mod = load("train_cross-encoder-v1")
    cfg = config.script_config(mod.Config(), mod.SAMPLE, ["--sample", f"--data_dir={copy}"])
    assert cfg.first_stage == ""
    sets = [s for group in evaluation.evaluation_sets(MSMarco(copy), cfg) for s in ([group] if isinstance(
        group, evaluation.RerankSet) else group)]
    assert [s.name for s in sets] == ["dev-tune", "dev-test", "dl2020"]
    assert all(s.ranked and str(copy / "runs" / "bm25") in s.first_stage for s in sets)
    shutil.rmtree(copy / "runs")
    tune, reports = evaluation.evaluation_sets(MSMarco(copy), cfg)
    assert all(s.ranked and "BM25 of the" in s.first_stage for s in [tune, *reports])


def test_queries_a_first_stage_misses_score_zero(tmp_path, capsys):
    """A judged query that the first stage's run does not list stays in the set with no candidates and scores 0, as
    in the official evaluation (and evaluate.py): dropping it would raise every row's figures by the share missed."""
    data = MSMarco(paths.SAMPLE_DIR)
    full = evaluation.load_rerank_set(data, "dev-test", None, 20, "data/sample/runs/bm25")
    dropped = {str(q) for q in full.qids[::4]}
    lines = (paths.SAMPLE_DIR / "runs" / "bm25" / "dev.run").read_text().splitlines(keepends=True)
    (tmp_path / "dev.run").write_text("".join(ln for ln in lines if ln.split()[0] not in dropped))
    cut = evaluation.load_rerank_set(data, "dev-test", None, 20, str(tmp_path / "dev.run"))
    assert f"{len(dropped)} of the {len(full.qids)} dev-test queries have no candidates" in capsys.readouterr().out
    assert cut.qids == full.qids and [len(c) for c in cut.candidates] == [
        0 if str(q) in dropped else len(c) for q, c in zip(full.qids, full.candidates)]
    bm25 = metrics.read_trec_run(tmp_path / "dev.run")
    official = metrics.evaluate_run(bm25, full.qrels, recall_ks=())  # every judged query: a missing one scores 0
    table = evaluation.rerank_table([cut], evaluation.cross_encoder_run, {})["dev-test"]["first_stage"]
    assert table == pytest.approx({"MRR@10": official["MRR@10"], "nDCG@10": official["nDCG@10"]}, abs=1e-12)
    assert official["MRR@10"] < evaluation.rerank_metrics(evaluation.candidate_order_run(full), full)["MRR@10"]
    with pytest.raises(errors.DataError, match="ranks none of the"):
        (tmp_path / "dl.run").write_text("1 Q0 7 1 1.0 x\n")
        evaluation.load_rerank_set(data, "dev-test", None, 20, str(tmp_path / "dl.run"))


@pytest.mark.parametrize("name", SCRIPTS)
def test_resume_continues_from_checkpoint(name, tiny_runs, tmp_path, capsys):
    mod, cfg, full, out = tiny_runs(name)
    # the same run cut after its first checkpoint: drop what came later, then rerun the same command
    shutil.copytree(out, tmp_path / "cut")
    shutil.rmtree(tmp_path / "cut" / "checkpoints" / "checkpoint-4")
    shutil.rmtree(tmp_path / "cut" / "model")
    with open(tmp_path / "cut" / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "lo')  # the process was killed mid-append: that line is dropped, not a JSON error
    cut = config.parse_cli(cfg, [f"--output_dir={tmp_path / 'cut'}"])
    capsys.readouterr()
    resumed = mod.main(cut)
    assert "resuming from" in capsys.readouterr().out
    history = [json.loads(line) for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in history if "loss" in r] == [1, 2, 3, 4]  # no step logged twice
    assert resumed["dev-test"]["trained"] == pytest.approx(full["dev-test"]["trained"], abs=1e-6)
    a = load_state(name, out / "model")
    b = load_state(name, tmp_path / "cut" / "model")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)


def begin(run, cfg, out):
    """What a script does to its output folder: resume_point at its start, start_run once data and model loaded."""
    checkpoint = run.resume_point(cfg, out)
    run.start_run(cfg, out, checkpoint)
    return checkpoint


def test_a_cut_run_refuses_another_config_and_a_finished_one_is_replaced(tiny_runs, tmp_path, monkeypatch):
    """A cut run met with other training options ends with the changed fields named (resumed, its restored optimizer
    and schedule would ignore a new --lr), leaving the folder as it was; options that only say where to write and
    what to report may change. A finished run (results.json) is replaced by a run with another config."""
    from msmarco import run
    mod, cfg, full, out = tiny_runs("train_cross-encoder-v1")
    cut = tmp_path / "cut"
    shutil.copytree(out, cut)
    shutil.rmtree(cut / "checkpoints" / "checkpoint-4")
    (cut / "results.json").unlink()  # a cut run never wrote its results
    saved = (cut / "config.json").read_text()
    other = config.parse_cli(cfg, [f"--output_dir={cut}", "--lr=7e-6", "--seed=13"])
    with pytest.raises(errors.OutputFolderError) as e:
        run.resume_point(other, cut)
    msg = str(e.value)
    assert "--lr: 0.0001 -> 7e-06" in msg and "--seed: 12 -> 13" in msg and "--resume=false" in msg
    assert "--output_dir:" not in msg and msg.count(" -> ") == 2  # only the fields that change training
    assert (cut / "config.json").read_text() == saved and (cut / "checkpoints" / "checkpoint-2").is_dir()
    reporting = config.parse_cli(cfg, [f"--output_dir={cut}", "--logging_steps=5", "--report_to=none"])
    assert begin(run, reporting, cut).endswith("checkpoint-2")
    # the batch size is per process: the same options under another number of processes are another run
    with monkeypatch.context() as m:
        m.setattr(run, "init_distributed", lambda: (0, 2))
        with pytest.raises(errors.OutputFolderError, match="processes: 1 -> 2"):
            begin(run, reporting, cut)
    assert json.loads((cut / "config.json").read_text())["world_size"] == 1
    assert begin(run, config.parse_cli(other, ["--resume=false"]), cut) is None  # replaced on request
    assert not (cut / "checkpoints").exists() and not (cut / "model").exists()

    done = tmp_path / "done"
    shutil.copytree(out, done)
    assert begin(run, config.parse_cli(cfg, [f"--output_dir={done}"]), done).endswith("checkpoint-4")
    (done / "results.json").write_text("{}")  # finished, as a resumed run leaves it again
    assert begin(run, config.parse_cli(other, [f"--output_dir={done}"]), done) is None
    assert not (done / "checkpoints").exists() and not (done / "results.json").exists()
    assert not (done / "model").exists()  # the old run's model never sits beside the new run's config
    assert json.loads((done / "config.json").read_text())["lr"] == 7e-6
    assert not (done / "metrics.png").exists()  # nor its plot


def test_a_refused_command_leaves_a_finished_run_and_a_foreign_folder_as_they_were(tiny_runs, tmp_path):
    """A value out of range ends the command when it is parsed, and one that fails on the data or the model ends it
    before start_run would replace the finished run; and a folder holding a model/ or results.json without a run's
    config.json is not the scripts' to clear."""
    from msmarco import run
    mod, cfg, full, out = tiny_runs("train_cross-encoder-v1")
    done = tmp_path / "done"
    shutil.copytree(out, done)
    before = sorted(str(p.relative_to(done)) for p in done.rglob("*"))
    # a value refused when parsed, and values that only fail on the data or the model: each command ends before the
    # folder changes, so the finished run stays whole (the four commands run at once: each is mostly imports)
    refused = [("--negatives=hrad", "--negatives must be one of 'triples', 'hard', not 'hrad'"),
               ("--model_name=offline:all-MiniLM-L6-v3", "offline:all-MiniLM-L6-v3"),
               (f"--first_stage={tmp_path / 'typo.run'}", "typo.run"), ("--seed=-1", "--seed")]
    procs = [subprocess.Popen([sys.executable, "train_cross-encoder-v1.py", "--sample", f"--output_dir={done}", bad],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for bad, _ in refused]
    for (bad, says), proc in zip(refused, procs):
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 1 and says in stderr and "Traceback" not in stderr, (bad, stderr[-2000:])
    assert sorted(str(p.relative_to(done)) for p in done.rglob("*")) == before
    foreign = tmp_path / "foreign"
    (foreign / "model").mkdir(parents=True)
    (foreign / "results.json").write_text("{}")
    with pytest.raises(errors.OutputFolderError, match="model, results.json but no config.json"):
        run.resume_point(config.parse_cli(cfg, [f"--output_dir={foreign}"]), foreign)
    assert (foreign / "model").is_dir() and (foreign / "results.json").exists()
    assert not (foreign / "config.json").exists()


def test_a_filter_that_keeps_no_query_says_what_to_change(copy):
    """Every negative filtered away (or no judged training query) is a clear error, not a division by zero."""
    mod = load("train_cross-encoder-v1")
    cfg = config.script_config(mod.Config(), mod.SAMPLE, ["--sample", f"--data_dir={copy}", "--ce_margin=1000"])
    with pytest.raises(errors.DataError, match="no training query keeps a negative after the CE filter"):
        mod.training_pairs(MSMarco(copy), cfg)


@pytest.mark.parametrize("name, source, qid_field", [
    ("train_cross-encoder-v2", "bert_cat_ensemble_msmarcopassage_train_scores_ids.tsv", 2),
    ("train_cross-encoder-v1", "qidpidtriples.train.full.2.tsv.gz", 0)])
def test_a_training_query_not_in_the_queries_names_its_file(copy, name, source, qid_field):
    """A training file whose query ids queries.tar.gz lacks (another release) ends at the start, naming that file
    and what to do, before any step."""
    def edit(lines):
        f = lines[0].split(b"\t")
        lines[0] = b"\t".join(f[:qid_field] + [b"1999999"] + f[qid_field + 1:])
        return lines
    rewrite_text(copy / source, edit)
    mod = load(name)
    cfg = config.script_config(mod.Config(), mod.SAMPLE, ["--sample", f"--data_dir={copy}", "--negatives=triples"]
                               if name.endswith("v1") else ["--sample", f"--data_dir={copy}"])
    data = MSMarco(copy)
    with pytest.raises(errors.DataError) as e:
        if name.endswith("v1"):
            mod.training_pairs(data, config.parse_cli(cfg, ["--max_pairs=100000"]))  # every line of the triples
        else:
            mod.training_samples(data, np.arange(len(data.teacher_scores())), "mse")
    assert str(copy / source) in str(e.value) and "[1999999]" in str(e.value)
    assert "download it again" in str(e.value)


def test_rerunning_a_finished_run_trains_no_step_past_max_steps(tiny_runs, tmp_path, capsys):
    """The same command again on a finished run (or one cut in its final evaluation) resumes from its last
    checkpoint, which holds the whole run: --max_steps=4 ends inside the first epoch, where the HF loop took a 5th
    step (and checkpoint, evaluation and history row) on every rerun. Nothing is trained; the best checkpoint is
    saved and evaluated again, with the same figures."""
    mod, cfg, full, out = tiny_runs("train_cross-encoder-v1")
    again = tmp_path / "again"
    shutil.copytree(out, again)
    state = json.loads((again / "checkpoints" / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["epoch"] < 1 and state["max_steps"] == 4  # inside the first epoch
    before = (again / "metrics.jsonl").read_text()
    res = mod.main(config.parse_cli(cfg, [f"--output_dir={again}"]))
    assert "resuming from" in capsys.readouterr().out
    assert sorted(p.name for p in (again / "checkpoints").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert (again / "metrics.jsonl").read_text() == before
    assert res["dev-test"]["trained"] == pytest.approx(full["dev-test"]["trained"], abs=1e-9)


def test_a_moved_run_saves_its_best_checkpoint_and_one_without_it_says_so(tiny_runs, tmp_path, capsys):
    """The trainer state names the best checkpoint by the path it had when saved. A run folder moved since and rerun
    (--output_dir=<its new place>) saved the untrained weights as its model (a finished --max_steps run) or its last
    checkpoint (an epoch run); the best is now found beside the checkpoints, and a missing one ends the command."""
    mod, cfg, full, out = tiny_runs("train_cross-encoder-v1")
    moved = tmp_path / "moved"
    shutil.copytree(out, moved)
    best = None
    for state_file in (moved / "checkpoints").glob("checkpoint-*/trainer_state.json"):
        state = json.loads(state_file.read_text())
        best = Path(state["best_model_checkpoint"]).name
        state["best_model_checkpoint"] = str(tmp_path / "gone" / "checkpoints" / best)  # where the run used to be
        state_file.write_text(json.dumps(state))
    assert best is not None
    res = mod.main(config.parse_cli(cfg, [f"--output_dir={moved}"]))
    saved, want = load_state("x", moved / "model"), load_state("x", moved / "checkpoints" / best)
    want = {k.replace(f"{best}/", "model/", 1): v for k, v in want.items()}  # keys name the folder of each file
    assert saved.keys() == want.keys() and all(torch.equal(saved[k], want[k]) for k in saved)
    assert res["dev-test"]["trained"] == pytest.approx(full["dev-test"]["trained"], abs=1e-6)
    for state_file in (moved / "checkpoints").glob("checkpoint-*/trainer_state.json"):  # a best deleted since
        state = json.loads(state_file.read_text())
        state["best_model_checkpoint"] = str(moved / "checkpoints" / "checkpoint-3")
        state_file.write_text(json.dumps(state))
    model_before = load_state("x", moved / "model")
    with pytest.raises(errors.OutputFolderError, match="best checkpoint, checkpoint-3, is missing.*--resume=false"):
        mod.main(config.parse_cli(cfg, [f"--output_dir={moved}"]))
    assert all(torch.equal(v, load_state("x", moved / "model")[k]) for k, v in model_before.items())


def test_a_resume_with_other_report_splits_computes_their_baselines(tiny_runs, tmp_path):
    """report_splits may change on a resume (it trains nothing); the added split gets its BM25 row all the same."""
    mod, cfg, full, out = tiny_runs("train_cross-encoder-v1")
    again = tmp_path / "again"
    shutil.copytree(out, again)
    assert "dl2020" not in full
    res = mod.main(config.parse_cli(cfg, [f"--output_dir={again}", "--report_splits=dl2020"]))
    assert set(res["dl2020"]) == {"first_stage", "trained"}
    assert res["dev-test"]["trained"] == pytest.approx(full["dev-test"]["trained"], abs=1e-6)
    history = [json.loads(line) for line in (again / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in history].count(0) == 1  # one step-0 record, as before


def test_a_failed_save_leaves_the_previous_model_whole(tmp_path, monkeypatch):
    """save_model renames the previous model/ aside before the new one takes its place: a crash at any point leaves
    a whole model in model/ or model.old/, never half of one."""
    from msmarco import run

    class Trainer:
        def is_world_process_zero(self):
            return True

    class Model:
        def __init__(self, text):
            self.text = text

        def save_pretrained(self, path):
            (tmp_path / "out" / "model.tmp").mkdir(parents=True)
            for i in range(3):
                (tmp_path / "out" / "model.tmp" / f"part{i}").write_text(self.text)

    out = tmp_path / "out"
    run.save_model(Trainer(), Model("first"), out)
    assert sorted(p.name for p in out.iterdir()) == ["model"]
    real_replace = run.os.replace

    def crash_on_new_model(src, dst):
        if str(src).endswith("model.tmp"):
            raise KeyboardInterrupt
        real_replace(src, dst)
    monkeypatch.setattr(run.os, "replace", crash_on_new_model)
    with pytest.raises(KeyboardInterrupt):
        run.save_model(Trainer(), Model("second"), out)
    kept = out / "model.old" if (out / "model.old").exists() else out / "model"
    assert [p.read_text() for p in sorted(kept.iterdir())] == ["first"] * 3
    monkeypatch.setattr(run.os, "replace", real_replace)
    run.save_model(Trainer(), Model("third"), out)
    assert sorted(p.name for p in out.iterdir()) == ["model"]
    assert [p.read_text() for p in sorted((out / "model").iterdir())] == ["third"] * 3


def load_state(name, model_dir):
    from safetensors.torch import load_file
    files = sorted(model_dir.rglob("model.safetensors"))
    assert files, f"no weights in {model_dir}"
    return {f"{f.parent.name}/{k}": v for f in files for k, v in load_file(str(f)).items()}


@pytest.mark.parametrize("name", SCRIPTS)
def test_bad_config_values_are_clear_errors(name, tmp_path):
    mod = load(name)
    with pytest.raises(SystemExit, match="--lr takes a float"):
        config.script_config(mod.Config(), mod.SAMPLE, ["--lr=fast"])
    with pytest.raises(SystemExit, match="unknown option --learning_rate(.|\n)*--lr="):
        config.script_config(mod.Config(), mod.SAMPLE, ["--learning_rate=1e-5"])


def test_bad_choice_values_are_clear_errors(tmp_path):
    v2, cfg = tiny_config("train_cross-encoder-v2", tmp_path, "--loss=kl")
    with pytest.raises(SystemExit, match="--loss must be mse or margin_mse"):
        v2.main(cfg)
    bi, cfg = tiny_config("train_bi-encoder-v2", tmp_path)  # parsing refuses it first (test_config.py); main too
    with pytest.raises(SystemExit, match="--similarity must be cosine or dot"):
        bi.main(dataclasses.replace(cfg, similarity="euclid"))
    bi, cfg = tiny_config("train_bi-encoder-v2", tmp_path, "--systems=bm25,nosuchsystem")
    with pytest.raises(SystemExit, match="nosuchsystem"):
        bi.main(cfg)
    v1, cfg = tiny_config("train_cross-encoder-v1", tmp_path)
    with pytest.raises(SystemExit, match="--compile_mode must be empty .* reduce-overhead"):
        v1.main(dataclasses.replace(cfg, compile_mode="fast"))


def test_compiled_training_saves_the_plain_model(tmp_path):
    """--compile_mode trains the torch.compile'd model (the trainer's torch_compile_mode); what is saved is the
    plain model, which stock CrossEncoder(path) loads and which scores as in training."""
    from safetensors import safe_open
    name = "train_cross-encoder-v1"
    mod, cfg = tiny_config(name, tmp_path, "--compile_mode=default")
    res = mod.main(cfg)
    history = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in history if "loss" in r] == [1, 2, 3, 4]
    assert all(np.isfinite(r["loss"]) for r in history if "loss" in r)
    with safe_open(str(tmp_path / "model" / "model.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if "_orig_mod" in k]
    assert rerun_metrics(name, tmp_path / "model", cfg) == pytest.approx(res["dev-test"]["trained"], abs=1e-6)


@pytest.mark.parametrize("name,missing", [
    ("train_cross-encoder-v1", "cross-encoder-ms-marco-MiniLM-L-6-v2-scores.pkl.gz"),  # its preset's negatives=hard
    ("train_cross-encoder-v2", "bert_cat_ensemble_msmarcopassage_train_scores_ids.tsv"),
    ("train_bi-encoder-v2", "msmarco-hard-negatives.jsonl.gz")])
def test_missing_data_file_is_a_clear_error(name, missing, tmp_path, monkeypatch):
    copy = tmp_path / "sample"
    shutil.copytree(paths.SAMPLE_DIR, copy, ignore=shutil.ignore_patterns(paths.PREPARED))
    (copy / missing).unlink()
    monkeypatch.setattr(paths, "SAMPLE_DIR", copy)  # a bundled-sample folder: missing files are not downloaded
    mod, cfg = tiny_config(name, tmp_path / "out", f"--data_dir={copy}")
    with pytest.raises(errors.DataError, match=f"{missing} is missing from the bundled sample"):
        mod.main(cfg)


def test_v2_student_outputs_raw_logits(tiny_runs):
    from sentence_transformers import CrossEncoder
    mod, cfg, res, out = tiny_runs("train_cross-encoder-v2")
    assert set(res["trained_fit"]) == {"pearson", "spearman", "pairs"}
    assert -1 <= res["trained_fit"]["pearson"] <= 1
    model = CrossEncoder(str(out / "model"))
    pairs = [("what is a cat", "A cat is a small domesticated carnivorous mammal.")]
    raw = model.predict(pairs, activation_fn=torch.nn.Identity())
    assert model.predict(pairs) == pytest.approx(raw)  # no sigmoid: the teacher's logits are unbounded


def test_v2_margin_mse_trains(tmp_path):
    mod, cfg = tiny_config("train_cross-encoder-v2", tmp_path, "--loss=margin_mse")
    res = mod.main(cfg)
    history = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["loss"]) for r in history if "loss" in r)
    assert 0 <= res["dev-test"]["trained"]["MRR@10"] <= 1


def test_v2_teacher_samples_are_the_teacher_lines(tmp_path):
    from msmarco.data import TeacherSamples
    mod, cfg = tiny_config("train_cross-encoder-v2", tmp_path, "--max_lines=-1")
    data = MSMarco(cfg.data_dir)
    train_lines, held = mod.teacher_split(data, cfg)
    teacher = data.teacher_scores()
    assert len(np.intersect1d(teacher["qid"][train_lines], teacher["qid"][held])) == 0
    assert len(train_lines) + len(held) == len(teacher)
    ds = mod.training_samples(data, train_lines[:3], "mse")
    qids, pids, labels = TeacherSamples(data, margin=False)({"row": np.asarray([ds[i]["row"] for i in range(6)])})
    for i, line in enumerate(train_lines[:3]):
        rec = teacher[line]
        assert (qids[2 * i], pids[2 * i], labels[2 * i]) == (rec["qid"], rec["pid_pos"], rec["pos_score"])
        assert (qids[2 * i + 1], pids[2 * i + 1], labels[2 * i + 1]) == (rec["qid"], rec["pid_neg"], rec["neg_score"])
    ds = mod.training_samples(data, train_lines[:3], "margin_mse")
    qids, pids, margins = TeacherSamples(data, margin=True)({"row": np.asarray([ds[i]["row"] for i in range(3)])})
    rec = teacher[train_lines[:3]]
    assert pids.tolist() == np.stack([rec["pid_pos"], rec["pid_neg"]], 1).tolist()
    np.testing.assert_array_equal(margins, rec["pos_score"] - rec["neg_score"])


def test_v1_pairs_follow_the_negative_ratio(tmp_path):
    mod, cfg = tiny_config("train_cross-encoder-v1", tmp_path, "--negatives=triples", "--neg_per_pos=4",
                           "--max_pairs=50")
    data = MSMarco(cfg.data_dir)
    ds = mod.training_pairs(data, cfg)
    labels = [ds[i]["label"] for i in range(len(ds))]
    assert len(ds) == 50 and labels.count(1.0) == 10 and labels[0] == 1.0 and labels[1:5] == [0.0] * 4
    t = data.triples(max_rows=40, seed=cfg.seed)  # 50 * 4/5 triples, sampled from the whole file
    assert ds[0]["pid"] == int(t[0, 1])  # the first triple's positive
    assert ds[1]["pid"] == int(t[0, 2])  # then its negative


def test_v1_pairs_put_each_positive_just_before_its_triples_negative(tmp_path):
    mod, cfg = tiny_config("train_cross-encoder-v1", tmp_path, "--negatives=triples", "--neg_per_pos=3",
                           "--max_pairs=400", "--random_negatives=0")
    data = MSMarco(cfg.data_dir)
    table = mod.training_pairs(data, cfg).data.table
    got = list(zip(*(table.column(c).to_numpy().tolist() for c in ("qid", "pid", "label"))))
    expected = []
    for i, (q, p, n) in enumerate(np.asarray(data.triples(max_rows=300, seed=cfg.seed)).tolist()):  # 400 * 3/4
        expected += ([(q, p, 1.0)] if i % 3 == 0 else []) + [(q, n, 0.0)]
    assert got == expected
    # sampled from the whole (qid-sorted) file: most of the 180 training queries, not the ~16 of its first 300 lines
    assert len({q for q, _, _ in got}) > 100


def test_v1_random_negatives_replace_the_last_of_each_positives_negatives(tmp_path):
    """--random_negatives=r: of each positive's neg_per_pos negatives the last r are seeded draws from the whole
    collection (never the pair's positive), the others stay the triples' BM25 negatives, in place."""
    mod, cfg = tiny_config("train_cross-encoder-v1", tmp_path, "--negatives=triples", "--neg_per_pos=4",
                           "--max_pairs=1000", "--random_negatives=0")
    data = MSMarco(cfg.data_dir)

    def rows(c):
        t = mod.training_pairs(data, c).data.table
        return [np.asarray(t.column(n).to_numpy()).reshape(-1, 5) for n in ("qid", "pid", "label")]
    q0, p0, l0 = rows(cfg)
    q1, p1, l1 = rows(config.parse_cli(cfg, ["--random_negatives=2"]))
    assert (q1 == q0).all() and (l1 == l0).all() and (l1[:, 0] == 1).all()  # same queries, positives first
    assert (p1[:, :3] == p0[:, :3]).all()  # the positive and the first 2 negatives are the triples'
    drawn = p1[:, 3:]
    qrels = data.qrels("train")
    assert not any(p in qrels[q] for q, p in zip(q1[:, 3:].ravel().tolist(), drawn.ravel().tolist()))  # no positive
    assert (drawn != p0[:, 3:]).mean() > 0.95 and len(np.unique(drawn)) > 0.9 * drawn.size  # spread over 28k passages
    bm25 = {(q, p) for q, p in zip(q0[:, 1:].ravel().tolist(), p0[:, 1:].ravel().tolist())}
    assert sum((q, p) in bm25 for q, p in zip(q1[:, 3:].ravel().tolist(), drawn.ravel().tolist())) < 5
    again = rows(config.parse_cli(cfg, ["--random_negatives=2"]))[1]
    assert (again == p1).all()  # seeded
    data.collection().rows_of(drawn.ravel())  # every draw is a collection passage
    with pytest.raises(SystemExit, match="--random_negatives must be in 0..neg_per_pos"):
        mod.training_pairs(data, config.parse_cli(cfg, ["--random_negatives=5"]))


def test_plot_and_logs_compare_with_the_baselines(tiny_runs):
    """metrics.png reads the model against the untrained model (its point at step 0) and the first stage (a line);
    --report_to reaches the trainer (here tensorboard event files, written with tensorboardX)."""
    from msmarco import run
    mod, cfg, res, out = tiny_runs("train_cross-encoder-v1")  # run with --report_to=tensorboard
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    h = run.history_series(rows, "eval_dev-tune_MRR@10")
    assert h["model"][0] == (0, res["dev-tune"]["untrained"]["MRR@10"]) and [s for s, _ in h["model"]] == [0, 2, 4]
    assert h["first_stage"] == res["dev-tune"]["first_stage"]["MRR@10"] and [s for s, _ in h["loss"]] == [1, 2, 3, 4]
    assert (out / "metrics.png").stat().st_size > 10_000
    assert list(out.rglob("events.out.tfevents.*")), "no tensorboard logs"


def test_user_errors_end_with_their_message_and_exit_code_1(tmp_path, monkeypatch, capsys):
    """A download that fails (here every address answers 404, as a dead link would) and a bad --key=value end the
    script with the message and exit code 1, not a traceback."""
    import runpy
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from msmarco import sources

    class NotFound(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_error(404)

        def log_message(self, *a):
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        for name, src in list(sources.SOURCES.items()):
            url = f"http://127.0.0.1:{srv.server_address[1]}/{name}"
            monkeypatch.setitem(sources.SOURCES, name, sources.Source(name, (url,), src.size, src.md5, src.what))
        monkeypatch.setattr(sys, "argv", ["train_cross-encoder-v1.py", f"--data_dir={tmp_path / 'data'}",
                                          f"--output_dir={tmp_path / 'out'}"])
        with pytest.raises(SystemExit) as e:
            runpy.run_path(str(ROOT / "train_cross-encoder-v1.py"), run_name="__main__")
    finally:
        srv.shutdown()
        srv.server_close()
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert "error: could not download http://127.0.0.1" in err and "HTTP 404" in err and "curl" in err
    assert "Traceback" not in err
    import subprocess
    proc = subprocess.run([sys.executable, "train_cross-encoder-v1.py", "--lr=fast"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 1 and "error: --lr takes a float" in proc.stderr and "Traceback" not in proc.stderr


def test_v1_pairs_from_filtered_hard_negatives(tmp_path):
    """--negatives=hard: BCE pairs from the CE-filtered hard negatives, in rounds over every training query."""
    mod, cfg = tiny_config("train_cross-encoder-v1", tmp_path, "--negatives=hard", "--neg_per_pos=2", "--max_pairs=900",
                           "--random_negatives=0")
    data = MSMarco(cfg.data_dir)
    positives, negatives = data.filtered_negatives(cfg.ce_margin, cfg.negs_per_system)
    t = mod.training_pairs(data, cfg).data.table
    qid, pid, label = (t.column(c).to_numpy() for c in ("qid", "pid", "label"))
    assert len(qid) == 900 and label.tolist() == [1.0, 0.0, 0.0] * 300
    for q, p, lab in zip(qid.tolist(), pid.tolist(), label.tolist()):
        assert p in (positives[q] if lab else negatives[q]).tolist()
    first_round, cut_round = qid[:3 * len(positives)][::3], qid[3 * len(positives):][::3]
    assert sorted(first_round.tolist()) == positives.qids.tolist()  # every query once per round
    assert 0 < len(cut_round) < len(positives) and len(set(cut_round.tolist())) == len(cut_round)
    # the round that max_pairs cuts holds seeded random queries, not the lowest qids (the file's order)
    assert sorted(cut_round.tolist()) != positives.qids[:len(cut_round)].tolist()
    again = mod.training_pairs(data, cfg).data.table.column("qid").to_numpy()
    other = mod.training_pairs(data, config.parse_cli(cfg, ["--seed=99"])).data.table
    assert again.tolist() == qid.tolist() and other.column("qid").to_numpy().tolist() != qid.tolist()
    n = 3 * len(positives)  # the first round, every query: the seed chooses its negatives, not only their order
    pairs = lambda qs, ps: sorted(zip(qs[:n].tolist(), ps[:n].tolist()))
    assert pairs(other.column("qid").to_numpy(), other.column("pid").to_numpy()) != pairs(qid, pid)
    with pytest.raises(SystemExit, match="--negatives must be triples or hard"):
        mod.training_pairs(data, config.parse_cli(cfg, ["--negatives=dense"]))


@pytest.mark.parametrize("name", ["train_cross-encoder-v1", "train_cross-encoder-v2", "train_bi-encoder-v2"])
def test_a_training_query_missing_from_the_queries_file_stops_the_data_stage(name, copy, tmp_path):
    """A training file and queries.tar.gz of different releases end the run at its data stage, naming both files,
    not at the first batch that meets the query, after the baseline evaluation (hours at full scale)."""
    import io
    import tarfile
    qid = int((copy / "qrels.train.tsv").read_text().split()[0])  # a query that every training file has
    with tarfile.open(copy / "queries.tar.gz") as t:
        members = {m.name: t.extractfile(m).read() for m in t.getmembers()}
    members["queries.train.tsv"] = b"".join(ln for ln in io.BytesIO(members["queries.train.tsv"])
                                            if not ln.startswith(b"%d\t" % qid))
    with tarfile.open(copy / "queries.tar.gz", "w:gz") as t:
        for member, blob in members.items():
            info = tarfile.TarInfo(member)
            info.size = len(blob)
            t.addfile(info, io.BytesIO(blob))
    mod, cfg = tiny_config(name, tmp_path / "out", f"--data_dir={copy}")
    data = MSMarco(cfg.data_dir)
    with pytest.raises(errors.DataError, match=rf"unknown query id\(s\) \[{qid}\].*come from different releases"):
        if name == "train_cross-encoder-v1":
            mod.training_pairs(data, cfg)
        elif name == "train_cross-encoder-v2":
            mod.training_samples(data, np.arange(len(data.teacher_scores()["qid"])), cfg.loss)
        else:
            mod.training_queries(data, cfg)
