"""`inilora_hf.compare` / `inilora-hf compare`: runs on a tiny model and a tiny local dataset, every statistic
recomputed independently with numpy, the evaluation checked against the base model, fairness (same batches, same
head per seed) and resumption."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.image import imread
from torch.nn import functional
from transformers import AutoModelForCausalLM, AutoTokenizer

from inilora_hf import compare
from inilora_hf.cli.app import main
from inilora_hf.cli.demo import build_demo_base
from inilora_hf.comparison import api, report
from inilora_hf.comparison.statistics import paired_bootstrap, paired_seed_test, summarize
from inilora_hf.errors import CompareInputError, OutputExistsError

FAST = {"max_steps": 3, "batch_size": 8, "resamples": 2000}


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_demo_base(tmp_path_factory.mktemp("compare") / "base")


@pytest.fixture(scope="module")
def parity_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rows = [
        {"sentence": f"add {a} {b} = {a + b}", "parity": "even" if (a + b) % 2 == 0 else "odd"}
        for a in range(9)
        for b in range(9)
    ]
    path = tmp_path_factory.mktemp("data") / "parity.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _bootstrap_reference(candidate: list, baseline: list, resamples: int, seed: int) -> tuple[float, list, float]:
    """The documented test, written out directly: resampled example counts, per-seed ratio metrics, Δ."""
    n = len(candidate[0][0])
    counts = np.random.default_rng(seed).multinomial(n, np.full(n, 1.0 / n), size=resamples)

    def metric(parts: tuple, weights: np.ndarray) -> np.ndarray:
        return (weights @ parts[0]) / (weights @ parts[1])

    def delta(weights: np.ndarray) -> np.ndarray:
        return np.mean(
            [metric(c, weights) - metric(b, weights) for c, b in zip(candidate, baseline, strict=True)], axis=0
        )

    observed = float(delta(np.ones((1, n)))[0])
    draws = delta(counts)
    p_value = (1 + np.sum(np.abs(draws - observed) >= abs(observed))) / (resamples + 1)
    return observed, list(np.percentile(draws, [2.5, 97.5])), float(p_value)


def _t_p_value(t: float, df: int) -> float:
    """Two-sided p of Student's t by Simpson's rule on its density over [0, |t|] (numpy and math only)."""
    x = np.linspace(0.0, abs(t), 200001)
    constant = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
    density = constant * (1 + x**2 / df) ** (-(df + 1) / 2)
    central = (x[1] - x[0]) / 3 * (density[0] + 4 * density[1:-1:2].sum() + 2 * density[2:-1:2].sum() + density[-1])
    return float(1 - 2 * central)


def test_seed_test_matches_student_t_from_its_density() -> None:
    candidate, baseline = [0.791, 0.785, 0.80, 0.779, 0.788], [0.778, 0.780, 0.776, 0.776, 0.780]
    deltas = np.subtract(candidate, baseline)
    result = paired_seed_test(candidate, baseline)
    error = np.std(deltas, ddof=1) / np.sqrt(5)
    assert result["delta_mean"] == pytest.approx(deltas.mean(), rel=1e-12)
    assert result["t"] == pytest.approx(deltas.mean() / error, rel=1e-12) and result["df"] == 4
    assert result["p_value"] == pytest.approx(_t_p_value(result["t"], 4), abs=1e-9)
    assert result["better"] == 5 and result["n"] == 5
    # The interval is mean ± t_0.975 · se: t_0.975 with 4 degrees of freedom is 2.776445 (tables), and p at it is 0.05.
    quantile = (result["ci95"][1] - deltas.mean()) / error
    assert quantile == pytest.approx(2.776445, abs=1e-6) and _t_p_value(quantile, 4) == pytest.approx(0.05, abs=1e-9)
    assert result["ci95"][0] == pytest.approx(deltas.mean() - quantile * error, rel=1e-12)
    assert paired_seed_test([0.8], [0.7])["p_value"] is None  # one seed: no test
    assert paired_seed_test([0.75, 0.5], [0.5, 0.25])["p_value"] is None  # the same difference on every seed
    assert paired_seed_test([0.8, 0.9], [0.8, 0.9])["p_value"] == 1.0
    with pytest.raises(ValueError, match="same seeds"):
        paired_seed_test([0.8, 0.9], [0.8])


def test_statistics_match_an_independent_computation() -> None:
    rng = np.random.default_rng(7)
    assert summarize([0.5, 0.7, 0.9]) == pytest.approx({"mean": 0.7, "std": 0.2, "n": 3})
    assert summarize([0.5])["std"] is None
    # Token-accuracy style parts (den varies) for 3 seeds over 50 examples; the candidate is better by construction.
    den = [rng.integers(1, 6, 50).astype(float) for _ in range(3)]
    baseline = [(rng.binomial(d.astype(int), 0.5).astype(float), d) for d in den]
    candidate = [(np.minimum(b[0] + rng.binomial(1, 0.6, 50), d), d) for b, d in zip(baseline, den, strict=True)]
    result = paired_bootstrap(candidate, baseline, resamples=3000, seed=3)
    observed, ci95, p_value = _bootstrap_reference(candidate, baseline, 3000, 3)
    direct = np.mean(
        [c[0].sum() / c[1].sum() - b[0].sum() / b[1].sum() for c, b in zip(candidate, baseline, strict=True)]
    )
    assert result["delta_mean"] == pytest.approx(direct, rel=1e-12) == pytest.approx(observed, rel=1e-12)
    assert result["ci95"] == pytest.approx(ci95, rel=1e-12)
    assert result["p_value"] == pytest.approx(p_value, rel=1e-12)
    assert ci95[0] > 0 and result["p_value"] < 0.01  # a real difference is found
    same = paired_bootstrap(baseline, baseline, resamples=500)
    assert same["delta_mean"] == 0.0 and same["ci95"] == [0.0, 0.0] and same["p_value"] == 1.0
    with pytest.raises(ValueError, match="same seeds"):
        paired_bootstrap(candidate, baseline[:2])


def test_plots_smooth_long_histories_and_draw_every_variant(tmp_path: Path) -> None:
    losses = np.random.default_rng(0).normal(size=60)
    expected = [sum(losses[k : k + 3]) / 3 for k in range(58)]
    np.testing.assert_allclose(report._moving_average(list(losses), 3), expected, rtol=1e-12)
    np.testing.assert_array_equal(report._moving_average(list(losses), 1), losses)
    runs = [
        {
            "variant": f"v{index}",
            "seed": seed,
            "metrics": {"accuracy": 0.5 + index / 100},
            "history": [{"step": k + 1, "loss": float(losses[k] + index)} for k in range(60)],
        }
        for index in range(12)  # more variants than colours
        for seed in (0, 1)
    ]
    paths = report.write_plots({"runs": runs, "config": {"metrics": ["accuracy"]}}, tmp_path)
    assert [path.name for path in paths] == ["loss.png", "metric.png"]
    for path in paths:
        height, width, _ = imread(path).shape
        assert width > height > 100


def test_compare_seq_cls_files_statistics_fairness_and_resume(
    base: Path, parity_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "cmp"
    settings = dict(
        task="seq-cls", text_field="sentence", label_field="parity", variants=["lora", "pissa"], output_dir=out, **FAST
    )
    # The first attempt is interrupted while its 4th run trains: three runs are recorded, nothing else is left.
    run_one, calls = api.run_one, []

    def interrupted(*args, **kwargs):
        calls.append(kwargs["variant"])
        if len(calls) == 4:
            raise KeyboardInterrupt
        return run_one(*args, **kwargs)

    monkeypatch.setattr(api, "run_one", interrupted)
    with pytest.raises(KeyboardInterrupt):
        compare(base, parity_file, seeds=[0, 1], **settings)
    assert sorted(p.name for p in (out / "runs").iterdir()) == [
        "lora__seed0.json",
        "lora__seed1.json",
        "pissa__seed0.json",
    ]
    assert not list(out.glob(".tmp-*")) and not (out / "results.json").exists()
    calls.clear()
    monkeypatch.setattr(api, "run_one", lambda *a, **k: calls.append(k["variant"]) or run_one(*a, **k))
    results = compare(base, parity_file, seeds=[0, 1], **settings)
    assert calls == ["pissa"]  # the re-run skipped the three finished runs
    for name in ("results.json", "summary.md", "loss.png", "metric.png", "config.json"):
        assert (out / name).is_file()
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(results))

    runs = {
        (r["variant"], r["seed"]): json.loads((out / "runs" / f"{r['variant']}__seed{r['seed']}.json").read_text())
        for r in results["runs"]
    }
    assert len(runs) == 4 and results["config"]["eval_examples"] == 17  # 20 % of 81 rows
    for seed in (0, 1):  # same batches and the same new head for every variant of a seed; other seeds differ
        assert runs["lora", seed]["batches_sha256"] == runs["pissa", seed]["batches_sha256"]
        assert runs["lora", seed]["head_sha256"] == runs["pissa", seed]["head_sha256"] is not None
    assert runs["lora", 0]["batches_sha256"] != runs["lora", 1]["batches_sha256"]
    assert runs["lora", 0]["head_sha256"] != runs["lora", 1]["head_sha256"]
    assert runs["lora", 0]["options"]["seed"] == 0 and runs["lora", 1]["options"]["seed"] == 1
    # pissa is deterministic: computed for seed 0, then read from the factor-set cache
    assert runs["pissa", 0]["factor_source"] == "computed" and runs["pissa", 1]["factor_source"].startswith("cache:")
    for run in runs.values():
        assert [h["step"] for h in run["history"]] == [1, 2, 3]
        for metric in ("accuracy", "eval_loss"):
            parts = run["per_example"][metric]
            assert len(parts["num"]) == 17 and parts["den"] == [1.0] * 17
            assert run["metrics"][metric] == pytest.approx(np.mean(parts["num"]), rel=1e-12)
        assert set(run["per_example"]["accuracy"]["num"]) <= {0.0, 1.0}
    for variant in ("lora", "pissa"):
        for metric in ("accuracy", "eval_loss"):
            values = [runs[variant, seed]["metrics"][metric] for seed in (0, 1)]
            stats = results["summary"][variant][metric]
            assert stats["mean"] == pytest.approx(np.mean(values), rel=1e-12)
            assert stats["std"] == pytest.approx(np.std(values, ddof=1), rel=1e-9, abs=1e-15) and stats["n"] == 2
    assert set(results["paired"]) == {"pissa"}
    for metric in ("accuracy", "eval_loss"):
        parts = [
            [
                (np.array(r["per_example"][metric]["num"]), np.array(r["per_example"][metric]["den"]))
                for r in (runs[v, 0], runs[v, 1])
            ]
            for v in ("pissa", "lora")
        ]
        observed, ci95, p_value = _bootstrap_reference(parts[0], parts[1], FAST["resamples"], api.BOOTSTRAP_SEED)
        paired = results["paired"]["pissa"][metric]
        assert paired["delta_mean"] == pytest.approx(observed, rel=1e-12, abs=1e-15)
        assert paired["ci95"] == pytest.approx(ci95, rel=1e-12, abs=1e-15)
        assert paired["p_value"] == pytest.approx(p_value) and "paired bootstrap" in paired["test"]
        seeds_test = paired["seeds_test"]  # the t-test over the two seeds, recomputed from the run metrics
        deltas = [runs["pissa", seed]["metrics"][metric] - runs["lora", seed]["metrics"][metric] for seed in (0, 1)]
        assert seeds_test["delta_mean"] == pytest.approx(np.mean(deltas), rel=1e-12, abs=1e-15)
        assert seeds_test["n"] == 2 and seeds_test["better"] == sum(d > 0 for d in deltas)
        if np.std(deltas) > 0:
            t = np.mean(deltas) / (np.std(deltas, ddof=1) / np.sqrt(2))
            assert seeds_test["t"] == pytest.approx(t, rel=1e-9)
            assert seeds_test["p_value"] == pytest.approx(_t_p_value(t, 1), abs=1e-8)
    summary = (out / "summary.md").read_text()
    mean, std = results["summary"]["pissa"]["accuracy"]["mean"], results["summary"]["pissa"]["accuracy"]["std"]
    delta = results["paired"]["pissa"]["accuracy"]["delta_mean"]
    assert "## accuracy" in summary and "## eval_loss" in summary and "paired t-test over seeds" in summary
    assert f"| pissa | {mean:.4f} ± {std:.4f} | 2 | {delta:+.4f} [" in summary

    # A third seed runs only the two new runs; other settings are refused before any work.
    calls.clear()
    grown = compare(base, parity_file, seeds=[0, 1, 2], **settings)
    assert calls == ["lora", "pissa"] and grown["summary"]["lora"]["accuracy"]["n"] == 3
    with pytest.raises(CompareInputError, match="learning_rate differ"):
        compare(base, parity_file, seeds=[0], learning_rate=5e-3, **settings)
    assert calls == ["lora", "pissa"]


def test_causal_lm_evaluation_matches_the_base_model(
    base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """With learning rate 0 the trained model is the base model (B = 0 for lora, R + s·B·A = W0 for pissa), so the
    eval loss and token accuracy equal plain transformers' on the eval texts. Through the CLI, without matplotlib."""
    texts = [f"reverse {w} = {w[::-1]}" for w in ("cat", "dog", "bird", "fish", "lion", "bear", "wolf", "frog")]
    (tmp_path / "train.csv").write_text("text\n" + "\n".join(texts[:6]) + "\n")
    (tmp_path / "eval.csv").write_text("text\n" + "\n".join(texts[6:]) + "\n")
    monkeypatch.setattr(report, "Figure", None)
    out = tmp_path / "lm"
    argv = [
        "compare",
        "--model",
        str(base),
        "--dataset",
        str(tmp_path / "train.csv"),
        "--eval-dataset",
        str(tmp_path / "eval.csv"),
        "--variants",
        "lora,pissa",
        "--seeds",
        "0",
        "--learning-rate",
        "0",
        "--max-steps",
        "2",
        "--batch-size",
        "2",
        "--resamples",
        "200",
        "--output-dir",
        str(out),
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "| lora |" in printed and 'pip install "inilora_hf[plots]"' in printed
    assert not (out / "loss.png").exists() and not (out / "metric.png").exists()
    results = json.loads((out / "results.json").read_text())

    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    loss_sum, correct, tokens = 0.0, 0, 0
    for text in texts[6:]:
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, :-1]
        target = ids[0, 1:]
        loss_sum += float(functional.cross_entropy(logits, target, reduction="sum"))
        correct += int((logits.argmax(-1) == target).sum())
        tokens += target.numel()
    for run in results["runs"]:
        # fp32 rounding of a few-layer forward pass: far below 1e-4 relative on a loss of order 4.
        assert run["metrics"]["eval_loss"] == pytest.approx(loss_sum / tokens, rel=1e-4)
        assert run["metrics"]["token_accuracy"] == pytest.approx(correct / tokens, abs=1e-12)


def test_bad_input_is_one_line_and_exit_2(base: Path, parity_file: Path, tmp_path: Path, capsys) -> None:
    common = ["compare", "--model", str(base), "--dataset", str(parity_file), "--output-dir", str(tmp_path / "o")]
    cases = [
        (["--task", "seq-cls"], "no column 'text'"),
        (["--variants", "pissa"], "baseline 'lora' is not among the variants"),
        (["--variants", "lora,nope"], "Unknown init variant 'nope'"),
        (["-o", "pissa.steps=3"], "variant 'pissa' has no option steps"),
    ]
    for extra, message in cases:
        assert main([*common, *extra]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert main([*common[:4], str(tmp_path / "missing.jsonl"), *common[5:]]) == 2
    assert f"dataset file '{tmp_path / 'missing.jsonl'}' does not exist" in capsys.readouterr().err
    assert main([*common[:4], str(tmp_path), *common[5:]]) == 2
    assert "is not a .jsonl, .json, .csv or .parquet file" in capsys.readouterr().err
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("keep")
    with pytest.raises(OutputExistsError, match="holds no comparison"):
        compare(base, parity_file, variants=["lora"], seeds=[0], output_dir=tmp_path / "busy")
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "inilora_hf.cli",
            "compare",
            "--model",
            "m",
            "--dataset",
            "d",
            "--output-dir",
            "o",
            "--seeds",
            "a,b",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2 and run.stderr.count("\n") == 1 and "Seeds are comma-separated integers" in run.stderr


def test_seq_cls_runs_eva_without_its_token_label_mask(base: Path, parity_file: Path, tmp_path: Path) -> None:
    # EVA's label mask is for token labels; with one label per example compare turns it off (it failed before).
    results = compare(
        base,
        parity_file,
        task="seq-cls",
        text_field="sentence",
        label_field="parity",
        variants=["lora", "eva"],
        seeds=[0],
        output_dir=tmp_path / "cmp",
        **FAST,
    )
    eva = next(run for run in results["runs"] if run["variant"] == "eva")
    assert eva["options"]["use_label_mask"] is False and eva["factor_source"] == "computed"
    assert 0.0 <= eva["metrics"]["accuracy"] <= 1.0 and results["summary"]["eva"]["accuracy"]["n"] == 1
