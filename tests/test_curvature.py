"""Influence functions with curvature (``influence curvature``, ``rank --method ekfac|kfac|identity|ekfac_self``):
the factors and scores against an independent dense recomputation, resuming and sharing the fit, the store path
against the exact one, and refusals."""

import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from scipy.stats import spearmanr

from influence.cli import main
from influence.data.targets import load_target
from influence.data.templates import collate, encode_example
from influence.errors import InfluenceError
from influence.gradients.collect import project_grads
from influence.gradients.curvature import curvature_root, fit_curvature, fit_examples, fit_key
from influence.models.loading import load_adapter
from influence.scoring.base import Target, get_method
from influence.train.run import Run


@pytest.fixture(scope="module")
def curved(tiny_run, tmp_path_factory):
    """The tiny run with an empirical-label curvature fitted in chunks of 4 at the last checkpoint, the default
    (sampled-label) one at every checkpoint, and the pool's plain and EK-FAC-whitened gradients projected to 16 and
    2048 dimensions (more than the LoRA gradient's 1792)."""
    folder = tmp_path_factory.mktemp("curved")
    shutil.copytree(tiny_run["run"], folder / "run", ignore=shutil.ignore_patterns("grads.zarr", "subsets.zarr"))
    run_dir = str(folder / "run")
    fit_curvature(run_dir, labels="empirical", chunk_size=4, progress=False)
    fit_curvature(run_dir, checkpoints="all", chunk_size=4, progress=False)
    project_grads(run_dir, tiny_run["target"], proj_dim=[16, 2048], train_gradients=["sgd", "ekfac"], chunk_size=5,
                  progress=False)
    return {**tiny_run, "run": run_dir}


def dense_reference(run: Run, target: str, strategy: str) -> tuple[np.ndarray, np.ndarray]:
    """Influence of every pool example on every target example, and of every pool example on itself, recomputed without the package's hooks or
    factor code: per-token module inputs and output gradients from ``register_full_backward_hook`` one example at a
    time, per-example gradients from ``torch.autograd.grad``, and the damped inverse as a dense solve per module."""
    checkpoint = run.checkpoints()[-1]
    base, tokenizer, _ = run.load_base_model()
    model = load_adapter(base, checkpoint.path).eval()
    modules = {name: module for name, module in model.named_modules()
               if isinstance(module, torch.nn.Linear) and ("lora_A" in name or "lora_B" in name)}
    captured: dict[str, list] = {}
    for name, module in modules.items():
        module.register_forward_hook(lambda m, i, o, n=name: captured.setdefault(n, []).append(i[0].detach()))
        module.register_full_backward_hook(lambda m, gi, go, n=name: captured.setdefault(n + "/g", []).append(
            go[0].detach()))

    def per_example(example, summed: bool = True):
        """(per-token inputs, per-token output gradients, gradient) of each module for one example's loss summed over
        its response tokens (the pool's and the fit's side), or averaged (the target's)."""
        captured.clear()
        batch = collate([encode_example(example, tokenizer, run.max_length)], tokenizer.pad_token_id)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[0, :-1]
        labels = batch["labels"][0, 1:]
        loss = torch.nn.functional.cross_entropy(logits.float(), labels, ignore_index=-100,
                                                 reduction="sum" if summed else "mean")
        grads = torch.autograd.grad(loss, [modules[n].weight for n in modules])
        return {n: (captured[n][0][0].double(), captured[n + "/g"][0][0].double(), g.double())
                for n, g in zip(modules, grads)}

    fit = [per_example(e) for e in fit_examples(run, None)]
    inverse = {}
    for name in modules:
        a = torch.cat([f[name][0] for f in fit])
        g = torch.cat([f[name][1] for f in fit])
        A, S = a.T @ a / len(a), g.T @ g / len(g)
        if strategy == "identity":
            inverse[name] = torch.eye(A.shape[0] * S.shape[0], dtype=torch.float64)
            continue
        la, qa = torch.linalg.eigh(A)
        ls, qs = torch.linalg.eigh(S)
        q = torch.kron(qs, qa)  # vec(G) row-major (out, in): kron(S, A) acts on it as S G A
        if strategy == "kfac":
            eigenvalues = torch.kron(ls.clamp(min=0), la.clamp(min=0))
        else:
            eigenvalues = torch.stack([(q.T @ f[name][2].reshape(-1)) ** 2 for f in fit]).mean(0)
        damping = 0.1 * eigenvalues.mean()
        inverse[name] = torch.linalg.inv(q @ torch.diag(eigenvalues + damping) @ q.T)
    pool = [per_example(e) for e in run.pool()]
    targets = [per_example(e, summed=False) for e in load_target(target)]

    def influence(a, b) -> float:
        return sum(float(a[n][2].reshape(-1) @ inverse[n] @ b[n][2].reshape(-1)) for n in modules)

    return np.array([[influence(t, p) for t in targets] for p in pool]), np.array([influence(p, p) for p in pool])


@pytest.mark.parametrize("strategy", ["ekfac", "kfac", "identity"])
def test_influence_matches_a_dense_recomputation(curved, strategy):
    method = get_method(strategy)
    ours = method.attribution(Run(curved["run"]), Target(curved["target"]), method.options({"labels": "empirical"}))
    reference, own = dense_reference(Run(curved["run"]), curved["target"], strategy)
    assert ours.matrix.shape == reference.shape == (23, 6)
    np.testing.assert_allclose(ours.matrix, reference, rtol=2e-3, atol=1e-6 * np.abs(reference).max())
    if strategy == "ekfac":
        method = get_method("ekfac_self")
        scores = method.scores(Run(curved["run"]), None, method.options({"labels": "empirical"}))
        np.testing.assert_allclose(scores.score, own, rtol=2e-3)
        assert (scores.score >= 0).all() and scores.score.max() > 0


def test_curvature_changes_the_scores(curved):
    """EK-FAC, K-FAC and the identity are three different estimates (the test above could not tell them apart
    otherwise)."""
    run, target = Run(curved["run"]), Target(curved["target"])
    matrices = {s: get_method(s).attribution(run, target, get_method(s).options({"labels": "empirical"})).matrix
                for s in ("ekfac", "kfac", "identity")}
    for a, b in (("ekfac", "kfac"), ("ekfac", "identity"), ("kfac", "identity")):
        assert not np.allclose(matrices[a], matrices[b], rtol=1e-2), (a, b)


def test_the_store_path_agrees_with_the_exact_one(curved):
    """The pool's whitened gradients read from the store against the target's whitened and projected by the store's
    projector: at more dimensions than the gradient's the ranking per target is close to the exact one's (a random
    projection is not an isometry, so not equal), at 16 it is noisier.
    Projecting the target's preconditioned gradient against the plain stored gradients instead loses the ranking."""
    run, target, method = Run(curved["run"]), Target(curved["target"]), get_method("ekfac")
    exact = method.attribution(run, target, method.options({})).matrix
    rho = {}
    for dim in (2048, 16):
        stored = method.attribution(run, target, method.options({"pool_gradients": "store", "proj_dim": dim})).matrix
        rho[dim] = np.array([spearmanr(exact[:, j], stored[:, j])[0] for j in range(exact.shape[1])])
    assert rho[2048].min() > 0.75 and rho[2048].mean() > 0.9, rho[2048]  # measured: 0.82 to 0.98, mean 0.95
    assert rho[16].mean() < rho[2048].mean() - 0.1
    naive = naive_store_path(run, target)
    assert np.mean([spearmanr(exact[:, j], naive[:, j])[0] for j in range(exact.shape[1])]) < 0.6


def test_the_store_path_on_dask_equals_the_one_process_path(curved):
    """``--dask``: the same products, one Dask task per stored chunk (5 rows), on a LocalCluster's worker process;
    the exact path, which recomputes gradients here, refuses it."""
    pytest.importorskip("distributed")
    run, target, method = Run(curved["run"]), Target(curved["target"]), get_method("ekfac")
    here = method.attribution(run, target, method.options({"pool_gradients": "store", "proj_dim": 2048})).matrix
    from influence.scoring.dask import dask_client

    with dask_client("local", workers=1) as client:
        address = client.scheduler.address
        on_dask = method.attribution(run, target, method.options({"pool_gradients": "store", "proj_dim": 2048,
                                                                  "dask": address})).matrix
    np.testing.assert_allclose(on_dask, here, rtol=1e-6, atol=1e-9)
    with pytest.raises(InfluenceError, match="add --pool-gradients store"):
        method.attribution(run, target, method.options({"dask": "local"}))


def naive_store_path(run: Run, target: Target) -> np.ndarray:
    """``P (H + damping)^-1 g_t`` against the stored ``P g_x`` (2048 dimensions): what the store path does not do."""
    from influence.core.naming import TRAIN, gradient_dataset
    from influence.gradients.projection import Projector
    from influence.gradients.store import open_checkpoint_stores
    from influence.scoring.curvature import Scorer
    from influence.scoring.products import pairwise_products

    checkpoint = run.checkpoints()[-1]
    method = get_method("ekfac")
    scorer = Scorer(run, checkpoint, "ekfac", method.options({}), torch.device("cpu"))
    store = open_checkpoint_stores(run, gradient_dataset(TRAIN, "sgd"), 2048)[-1]
    spec = store.metadata["projector"]
    sides = Projector(spec["input_dim"], spec["output_dim"], spec["seed"]).project(
        scorer.preconditioned(load_target(target.name)).float())
    return pairwise_products([store], [sides], np.ones(1))[0]


def test_fit_resumes_and_shares_its_chunks_to_the_same_factors(curved, tmp_path, monkeypatch):
    """Two worker processes (to float rounding), two static shares and a fit killed after its first chunk then
    resumed (bit for bit) end with the factors of one uninterrupted process (sampled labels: each chunk draws its
    own)."""
    import influence.gradients.curvature as curvature

    run_dir = tmp_path / "run"
    shutil.copytree(curved["run"], run_dir, ignore=shutil.ignore_patterns("curvature.zarr"))
    run = Run(run_dir)
    path = f"{fit_key('sampled', fit_examples(run, None))}/{run.checkpoints()[-1].name}"
    fit_curvature(run_dir, chunk_size=4, progress=False)
    whole = curvature_root(run).open_group(f"{path}/factors", mode="r")
    expected = {name: whole[name][...] for name in whole.array_keys()}
    assert any(name.startswith("corrections.") for name in expected)
    shutil.rmtree(run_dir / "curvature.zarr")
    assert fit_curvature(run_dir, chunk_size=4, workers=2, progress=False) == [path]
    shared = curvature_root(run).open_group(f"{path}/factors", mode="r")
    for name, values in expected.items():  # the same draws; sums in another order (each worker has one thread)
        np.testing.assert_allclose(shared[name][...], values, rtol=1e-10, atol=1e-14 * np.abs(values).max(),
                                   err_msg=name)
    shutil.rmtree(run_dir / "curvature.zarr")
    with pytest.raises(InfluenceError, match="left to the other --worker shares"):
        fit_curvature(run_dir, chunk_size=4, worker=(0, 2), progress=False)
    calls = []
    original = curvature._chunk_sums

    def dies_on_the_second_chunk(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        return original(*args, **kwargs)

    monkeypatch.setattr(curvature, "_chunk_sums", dies_on_the_second_chunk)
    with pytest.raises(KeyboardInterrupt):
        fit_curvature(run_dir, chunk_size=4, worker=(1, 2), progress=False)
    monkeypatch.setattr(curvature, "_chunk_sums", original)
    fit_curvature(run_dir, chunk_size=4, progress=False)
    resumed = curvature_root(run).open_group(f"{path}/factors", mode="r")
    for name, values in expected.items():
        np.testing.assert_array_equal(resumed[name][...], values, err_msg=name)


def test_refusals_name_the_command_or_the_setting(curved, tmp_path):
    runner = CliRunner()
    bare = tmp_path / "bare"
    shutil.copytree(curved["run"], bare, ignore=shutil.ignore_patterns("curvature.zarr"))
    result = runner.invoke(main, ["rank", "--run", str(bare), "--method", "ekfac", "--target", curved["target"]])
    assert result.exit_code == 2 and f"influence curvature --run {bare}" in result.output
    result = runner.invoke(main, ["rank", "--run", str(bare), "--method", "ekfac_self", "--labels", "empirical"])
    assert result.exit_code == 2 and "--labels empirical" in result.output
    result = runner.invoke(main, ["curvature", "--run", curved["run"], "--labels", "empirical", "--chunk-size", "3"])
    assert result.exit_code == 2 and "chunk_size" in result.output and "--overwrite" in result.output
    result = runner.invoke(main, ["curvature", "--run", str(bare), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "fit examples x 2 passes" in result.output and not (bare / "curvature.zarr").exists()


def test_rank_with_every_curvature_method(curved):
    runner = CliRunner()
    for method in ("ekfac", "kfac", "identity"):
        result = runner.invoke(main, ["rank", "--run", curved["run"], "--method", method, "--labels", "empirical",
                                      "--target", curved["target"]])
        assert result.exit_code == 0, result.output
    result = runner.invoke(main, ["rank", "--run", curved["run"], "--method", "ekfac_self", "--labels", "empirical"])
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("strategy", ["ekfac", "kfac"])
def test_parity_with_kronfluence(curved, tmp_path, strategy):
    """Kronfluence's own EK-FAC / K-FAC (its ``Analyzer`` and ``Task`` over the peft model, tracking the same LoRA
    linears, the empirical Fisher, its damping heuristic 0.1 x mean eigenvalue per module) on the run's model, fit
    examples, pool and target agrees with ours: Spearman >= 0.99 per target example, and the same scores to 1%."""
    pytest.importorskip("kronfluence", reason="installed by `make setup` (Makefile: kronfluence without its deps)")
    from influence.evaluate.peers import kronfluence_scores

    run = Run(curved["run"])
    theirs = kronfluence_scores(run, fit_examples(run, None), run.pool(), {"t": load_target(curved["target"])},
                                tmp_path, strategy, damping=None, empirical=True)["t"]
    method = get_method(strategy)
    ours = method.attribution(run, Target(curved["target"]), method.options({"labels": "empirical"})).matrix
    rho = [spearmanr(ours[:, j], theirs[:, j])[0] for j in range(ours.shape[1])]
    assert min(rho) >= 0.99, rho
    np.testing.assert_allclose(ours, theirs, rtol=1e-2, atol=1e-3 * np.abs(theirs).max())


def test_per_token_contributions_sum_to_the_influence(curved, tmp_path):
    """``--per-token K``: each target example's influence with the top K pool examples, split by its response tokens
    into ``tokens.parquet``; the tokens' contributions add up to the influence."""
    import pandas as pd

    result = CliRunner().invoke(main, ["rank", "--run", curved["run"], "--method", "ekfac", "--labels", "empirical",
                                       "--target", curved["target"], "--per-token", "3", "--out", str(tmp_path / "ranking"),
                                       "--json"])
    assert result.exit_code == 0, result.output
    import json

    folder = json.loads(result.stdout)[0]["folder"]
    tokens = pd.read_parquet(f"{folder}/tokens.parquet")
    ranking = pd.read_parquet(f"{folder}/scores.parquet")
    top = ranking.sort_values("rank")["id"].head(3).tolist()
    assert sorted(tokens["pool_id"].unique()) == sorted(top)
    method = get_method("ekfac")
    attribution = method.attribution(Run(curved["run"]), Target(curved["target"]), method.options({"labels": "empirical"}))
    sums = tokens.groupby(["target_id", "pool_id"])["contribution"].sum()
    for (target_id, pool_id), total in sums.items():
        expected = attribution.matrix[attribution.pool_ids.index(pool_id), attribution.target_ids.index(target_id)]
        assert total == pytest.approx(expected, rel=1e-3, abs=1e-6 * np.abs(attribution.matrix).max())
    assert len(sums) == 3 * len(attribution.target_ids) and tokens["token"].str.len().min() > 0
    assert tokens.groupby("target_id")["token_index"].nunique().min() >= 1
