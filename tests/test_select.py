"""evaluate select: retraining on selections across a grid, held-out evaluation, win/tie/loss and verdicts."""

import json
import shutil

import pandas as pd
import pytest
from click.testing import CliRunner

from influence.cli import main
from influence.data.targets import load_heldout, load_mmlu_val, load_target
from influence.errors import InfluenceError
from influence.evaluate.select import Grid, JudgeSettings, evaluate_select, verdict, win_tie_loss

from .conftest import write_jsonl

TINY_GRID = Grid([1e-3, 5e-3], [1], [4], ["linear"], 2)


@pytest.fixture(scope="module")
def select_run(tiny_run, tmp_path_factory):
    folder = tmp_path_factory.mktemp("select")
    shutil.copytree(tiny_run["run"], folder / "run")
    heldout = write_jsonl(folder / "heldout.jsonl", [
        {"prompt": f"What is {i} plus two?", "completion": f"{i + 2}", "choices": [f"{i + 2}", f"{i + 3}"]} for i in range(5)
    ])
    return {**tiny_run, "run": str(folder / "run"), "folder": folder, "heldout": str(heldout)}


def test_win_tie_loss_and_verdicts_from_known_inputs():
    summary = pd.DataFrame([
        # setting, subset, mean, sd: lower nll is better
        {"setting": "a", "subset": "less", "nll_mean": 1.0, "nll_sd": 0.1},
        {"setting": "a", "subset": "random", "nll_mean": 2.0, "nll_sd": 0.1},  # less wins
        {"setting": "b", "subset": "less", "nll_mean": 1.50, "nll_sd": 0.2},
        {"setting": "b", "subset": "random", "nll_mean": 1.45, "nll_sd": 0.0},  # within the spread: tie
        {"setting": "c", "subset": "less", "nll_mean": 3.0, "nll_sd": 0.1},
        {"setting": "c", "subset": "random", "nll_mean": 2.0, "nll_sd": 0.2},  # less loses
        {"setting": "d", "subset": "less", "nll_mean": 1.0, "nll_sd": 0.0},  # random not trained here: not counted
    ])
    counts = win_tie_loss(summary, "less", "random", "nll")
    assert counts == {"wins": 1, "ties": 1, "losses": 1}
    assert "flips" in verdict("less", "random", counts)
    assert verdict("less", "random", {"wins": 3, "ties": 0, "losses": 0}).startswith("less beats random in every setting")
    assert verdict("less", "random", {"wins": 0, "ties": 0, "losses": 2}).startswith("random beats less in every setting")
    assert verdict("less", "random", {"wins": 2, "ties": 1, "losses": 0}).startswith("less beats random in most")
    assert verdict("less", "random", {"wins": 0, "ties": 1, "losses": 2}).startswith("random beats less in most")
    assert "tie in every setting" in verdict("less", "random", {"wins": 0, "ties": 3, "losses": 0})
    accuracy = summary.rename(columns={"nll_mean": "accuracy_mean", "nll_sd": "accuracy_sd"})
    assert win_tie_loss(accuracy, "less", "random", "accuracy") == {"wins": 1, "ties": 1, "losses": 1}  # higher = better
    accuracy.loc[0, "accuracy_mean"] = 3.0  # setting a: less now higher = better
    assert win_tie_loss(accuracy, "less", "random", "accuracy") == {"wins": 2, "ties": 1, "losses": 0}


def test_the_grid_runs_resumes_and_reports(select_run):
    out = select_run["folder"] / "out"
    report = evaluate_select(["less", "random", "full"], run_dir=select_run["run"], target=select_run["target"],
                             eval_files=[select_run["heldout"]], fraction=0.25, grid=TINY_GRID, out=out, progress=False)
    results = report.results
    assert len(results) == 2 * 3 * 2  # settings x subsets x seeds, one evaluation set
    assert set(results["subset"]) == {"less", "random", "full"} and results["nll"].gt(0).all()
    assert results["accuracy"].between(0, 1).all()  # the held-out file is multiple choice
    assert set(report.summary["seeds"]) == {2}
    wins = report.wins.set_index(["subset", "baseline"])
    assert wins.loc[("less", "random")].sum() == 2 and ("full", "random") in wins.index
    assert len(report.verdicts) == 3 and len(report.best) == 3
    saved = json.loads((out / "report.json").read_text())
    assert saved["verdicts"] == report.verdicts and saved["grid"]["seeds"] == 2
    assert (out / "results.csv").is_file() and (out / "wins.csv").is_file() and (out / "report.png").is_file()
    again = evaluate_select(["less", "random", "full"], run_dir=select_run["run"], target=select_run["target"],
                            eval_files=[select_run["heldout"]], fraction=0.25, grid=TINY_GRID, out=out, progress=False)
    pd.testing.assert_frame_equal(again.results, results)  # resumed: nothing retrained, the same models


def test_evaluation_never_touches_what_the_selection_looked_at(select_run, tmp_path):
    target_examples = load_target(select_run["target"])
    leaked = write_jsonl(tmp_path / "leaked.jsonl", [
        {"prompt": target_examples[0].messages[0]["content"], "completion": "1"},
        {"prompt": "Something new", "completion": "2"},
    ])
    with pytest.raises(InfluenceError, match="same prompt as .* in the selection's target"):
        evaluate_select(["random", "full"], run_dir=select_run["run"], target=select_run["target"],
                        eval_files=[str(leaked)], grid=TINY_GRID, out=tmp_path / "never", progress=False)
    trained = write_jsonl(tmp_path / "trained.jsonl", [{"prompt": "Add 3 and 4.", "completion": "7"}])  # a pool prompt
    with pytest.raises(InfluenceError, match="in the training subsets"):
        evaluate_select(["random", "full"], run_dir=select_run["run"], eval_files=[str(trained)], grid=TINY_GRID,
                        out=tmp_path / "never", progress=False)
    assert not (tmp_path / "never").exists()
    # the built-in held-out data of mmlu_val (MMLU test) shares no prompt with its dev rows
    dev = {e.messages[0]["content"] for e in load_mmlu_val()}
    assert not dev & {e.messages[0]["content"] for e in load_heldout("mmlu_val")}


def test_files_and_standalone_model(select_run, tmp_path):
    lima = write_jsonl(tmp_path / "lima.jsonl", [{"prompt": f"Tell me about {w}.", "completion": f"{w} is nice."}
                                                 for w in ("cats", "dogs", "owls")])
    alpaca = write_jsonl(tmp_path / "alpaca.jsonl", [{"prompt": f"List {n} colours.", "completion": "red, blue"}
                                                     for n in (2, 3, 4)])
    settings = {"batch_size": 4, "max_length": 64, "warmup_ratio": 0.0, "lora": {"r": 4, "alpha": 8}}
    report = evaluate_select([str(lima), str(alpaca)], model="tiny-llama", instruction=True,
                             grid=Grid([1e-2], [2], [4], ["linear"], 1), training=settings, out=tmp_path / "out",
                             progress=False)
    assert set(report.results["eval"]) == {"self_instruct"} and len(report.results) == 2
    assert report.results["nll"].nunique() == 2  # the two training sets give two models
    assert len(report.verdicts) == 1 and "lima" in report.verdicts[0] and "alpaca" in report.verdicts[0]


def test_bad_input_is_refused_before_training(select_run, tmp_path):
    run = select_run["run"]
    with pytest.raises(InfluenceError, match="neither full, random"):
        evaluate_select(["less", "nosuch"], run_dir=run, target=select_run["target"], eval_files=[select_run["heldout"]])
    with pytest.raises(InfluenceError, match="no built-in held-out data|give --eval"):
        evaluate_select(["random", "full"], run_dir=run, target=select_run["target"])
    with pytest.raises(InfluenceError, match="--grid-lr names nothing"):
        evaluate_select(["random", "full"], run_dir=run, eval_files=[select_run["heldout"]], grid=Grid([], [1], [4]))
    with pytest.raises(InfluenceError, match="not a multiple of the micro batch"):
        evaluate_select(["random", "full"], run_dir=run, eval_files=[select_run["heldout"]],
                        grid=Grid([1e-3], [1], [6], ["linear"], 1))
    with pytest.raises(InfluenceError, match="--run .* or --model"):
        evaluate_select(["random", "full"], eval_files=[select_run["heldout"]])
    with pytest.raises(InfluenceError, match="needs --run"):
        evaluate_select(["random", "full"], model="tiny-llama", eval_files=[select_run["heldout"]])
    result = CliRunner().invoke(main, ["evaluate", "select", "--run", run, "--subsets", "random,full", "--eval",
                                       select_run["heldout"], "--grid-lr", "1e-3,x"])
    assert result.exit_code == 2 and "--grid-lr takes comma-separated numbers" in result.output


def test_cli_dry_run_prints_the_cost(select_run):
    result = CliRunner().invoke(main, ["evaluate", "select", "--run", select_run["run"], "--subsets", "random,full",
                                       "--eval", select_run["heldout"], "--grid-lr", "1e-3", "--grid-epochs", "1",
                                       "--grid-batch", "4", "--grid-scheduler", "linear", "--seeds", "1", "--dry-run",
                                       "--out", str(select_run["folder"] / "dry")])
    assert result.exit_code == 0, result.output
    assert "1 settings x 2 subsets x 1 seeds = 2 fine-tunes" in result.output


def test_notebook_shows_lds_and_select_reports(select_run, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    from influence.evaluate.lds import evaluate_lds
    from influence.selection.rank import rank

    from .test_notebook import PACKAGED_NOTEBOOK

    run = select_run["run"]
    evaluate_lds(run, select_run["target"], ["random", "grand"], k=3, bootstrap=10, progress=False)
    evaluate_select(["random", "full"], run_dir=run, target=select_run["target"], eval_files=[select_run["heldout"]],
                    grid=Grid([1e-3], [1], [4], ["linear"], 1), progress=False)  # default out: RUN/select-tgt
    ranking = select_run["folder"] / "rank-less"
    rank(run, select_run["target"], fraction=0.2, out=ranking)
    monkeypatch.setenv("INFLUENCE_RUN", run)
    monkeypatch.setenv("INFLUENCE_RANKING", str(ranking))
    notebook = nbformat.read(PACKAGED_NOTEBOOK, as_version=4)
    NotebookClient(notebook, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(select_run["folder"])}}).execute()
    text = "".join(o.get("text", "") for c in notebook.cells if c.cell_type == "code" for o in c.outputs)
    assert "== select-tgt: nll on" in text and "full" in text
    assert "no LDS yet" not in text


def test_judges_average_both_orders_and_feed_the_report(select_run, tmp_path):
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    from influence.evaluate.judge import LocalJudge, OpenAIJudge, preference

    class FirstIsBetter:
        def prefer_first(self, instruction, first, second):
            return 0.9  # a judge that always favours the first position

    assert preference(FirstIsBetter(), "q", "a", "b") == pytest.approx(0.5)  # position bias cancels
    local = LocalJudge("tiny-llama")
    p = local.prefer_first("Say hi.", "hi", "bye")
    assert 0 < p < 1 and preference(local, "Say hi.", "hi", "hi") == pytest.approx(0.5)

    seen = []

    class Endpoint(BaseHTTPRequestHandler):  # an OpenAI-compatible server on loopback answering "B"
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append(body)
            payload = json.dumps({"choices": [{"message": {"content": "B"}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Endpoint)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        remote = OpenAIJudge(f"http://127.0.0.1:{server.server_port}/v1", "judge-model")
        assert remote.prefer_first("q", "a", "b") == 0.0 and preference(remote, "q", "a", "b") == pytest.approx(0.5)
        assert seen[0]["model"] == "judge-model" and "[Response A]\na" in seen[0]["messages"][0]["content"]
    finally:
        server.shutdown()

    report = evaluate_select(["random", "full"], run_dir=select_run["run"], instruction=True,
                             eval_files=[select_run["heldout"]], grid=Grid([1e-3], [1], [4], ["linear"], 1),
                             judge=JudgeSettings(judge="tiny-llama", n=2, max_new_tokens=3), out=tmp_path / "judged", progress=False)
    judged = pd.read_csv(tmp_path / "judged" / "judge.csv")
    assert len(judged) == 1 and judged["win_rate"].between(0, 1).all() and judged["n"].eq(2).all()
    assert any(line.startswith("judge: ") for line in report.verdicts)
    with pytest.raises(InfluenceError, match="add --instruction"):
        evaluate_select(["random", "full"], run_dir=select_run["run"], eval_files=[select_run["heldout"]],
                        judge="tiny-llama")


def test_tydiqa_held_out_format_and_offline_error(monkeypatch):
    from influence.data.targets import load_tydiqa_dev, tydiqa_examples

    records = [{"id": f"english-{i}", "title": "t", "context": f"Passage {i}.", "question": f"Q{i}?",
                "answers": {"text": [f"A{i}"], "answer_start": [0]}} for i in range(3)]
    records.append({"id": "klingon-0", "context": "x", "question": "y", "answers": {"text": ["z"], "answer_start": [0]}})
    examples = tydiqa_examples(records, per_language=2)
    assert [e.id for e in examples] == ["tydiqa_dev/english-0", "tydiqa_dev/english-1"]
    assert examples[0].response == " A0" and examples[0].task == "english" and "Passage 0." in examples[0].messages[0]["content"]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(InfluenceError, match="not vendored .* give a held-out file with --eval"):
        load_tydiqa_dev()  # no network here (and the hub path needs the `datasets` package)
