"""The exploration notebook's one source: writes it to notebooks/explore_rankings.ipynb (for a checkout, next to
runs/) and to influence/resources/notebooks/explore_rankings.ipynb (shipped in the package; `influence notebook
--run RUN` copies it next to a run). Kept as a script so that the notebook's source is reviewable.

    python scripts/make_notebook.py           # write both copies
    python scripts/make_notebook.py --check   # exit 1 when a copy differs from this source (run by the tests)
"""

import argparse
import sys
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

ROOT = Path(__file__).resolve().parents[1]
COPIES = (ROOT / "notebooks" / "explore_rankings.ipynb",
          ROOT / "influence" / "resources" / "notebooks" / "explore_rankings.ipynb")

cells = [
    new_markdown_cell(
        "# Explore a ranking\n\n"
        "Loads the outputs of `influence rank` through the Python API: the score distribution, what the "
        "selected subset is made of, and the most and least helpful training examples for chosen target "
        "subtasks. Set `INFLUENCE_RUN` / `INFLUENCE_RANKING` (or edit the next cell) to point at your run; without "
        "a ranking it opens the run's main one (its only ranking, else its latest LESS ranking, else its latest).\n\n"
        "Rank 1 is the highest score; what a higher score means for the method is printed below (for LESS, scores "
        "lie in [-1, 1] and higher means the example's Adam gradient is more aligned with the target's: more "
        "helpful)."
    ),
    new_code_cell(
        "import os\n"
        "from pathlib import Path\n\n"
        "RUN = Path(os.environ.get('INFLUENCE_RUN', '../runs/demo'))\n"
        "RANKING = os.environ.get('INFLUENCE_RANKING')  # None: the run's main ranking\n"
        "TASKS = os.environ.get('INFLUENCE_TASKS', '')  # comma-separated subtasks; empty = first three\n"
        "K = 5"
    ),
    new_code_cell(
        "import json\n\n"
        "import matplotlib.pyplot as plt\n"
        "import numpy as np\n"
        "import pandas as pd\n\n"
        "from influence.report.figures import higher_means\n"
        "from influence.selection.outputs import (example_text, load_rankings, open_ranking, pool_by_id, task_columns,\n"
        "                                        top_for_task)\n\n"
        "# the ranking, refused with what to run when the run has none or when it ranks another pool\n"
        "RANKING, table, summary = open_ranking(RUN, RANKING)\n"
        "pool = pool_by_id(RUN)\n"
        "tasks = [t for t in TASKS.split(',') if t] or task_columns(table)[:3]\n"
        "print(f\"{RANKING.name}: {summary['method']} ({higher_means(summary)}), \"\n"
        "      f\"{summary['n_pool']} examples, {summary['n_selected']} selected, \"\n"
        "      f\"{summary['n_unscorable']} unscorable; subtasks shown: {tasks}\")\n"
        "table.head(10)"
    ),
    new_markdown_cell(
        "## Warm-up\nMean training loss and response-token accuracy per optimizer step (from `dynamics.parquet`)."
    ),
    new_code_cell(
        "from influence.report import figures as report\n\n"
        "curves = report.warmup_curves(RUN)\n"
        "plt.show() if curves is not None else print('no warm-up dynamics in this run')"
    ),
    new_markdown_cell(
        "## Score distribution\nThe dashed lines bound the selection: the lowest selected score for a top "
        "selection, the highest for a bottom one, both ends of a middle band, the threshold otherwise. The "
        "axis says what a higher score means for this method (the same figures as `influence report`)."
    ),
    new_code_cell(
        "selected = report.selected_rows(table, summary)\n"
        "edges = report.selection_edges(selected, summary)\n"
        "print(f\"x axis: {summary['method']} score ({report.higher_means(summary)}); selection bounds: \"\n"
        "      + (', '.join(f'{label or \"\"} {value:.4g}' for value, label in edges) or 'none'))\n"
        "report.score_distribution(table, summary)\n"
        "plt.show()"
    ),
    new_markdown_cell(
        "## Per-subtask coverage of the selection\nFor target-aware methods: how many selected examples have "
        "each subtask as their best one. A subtask with none (red) is starved by LESS's max over subtasks; "
        "`rank --diversify quota` gives every subtask its share."
    ),
    new_code_cell(
        "coverage = report.subtask_coverage(table, summary)\n"
        "if coverage is None:\n"
        "    print('no per-subtask scores for this method')\n"
        "else:\n"
        "    starved = coverage.loc[coverage['selected'] == 0, 'subtask'].tolist()\n"
        "    print(f'subtasks with no selected example: {starved or \"none\"}')\n"
        "    report.subtask_coverage_figure(table, summary)\n"
        "    plt.show()"
    ),
    new_markdown_cell("## What the selected subset is made of\nShare of each source file in the pool and in the selection."),
    new_code_cell(
        "composition = pd.DataFrame({\n"
        "    'pool': table['source'].value_counts(normalize=True),\n"
        "    'selected': selected['source'].value_counts(normalize=True),\n"
        "}).fillna(0)\n"
        "composition.plot.barh(figsize=(7, 2 + 0.4 * len(composition)))\n"
        "plt.xlabel('share')\n"
        "plt.show()\n"
        "composition"
    ),
    new_markdown_cell(
        "## Length bias\n"
        "LESS is known to favour short training examples. Left: score against response length (characters), "
        "with the Spearman correlation `rank` wrote to `summary.json`. Right: the selected subset's length "
        "distribution against the pool's."
    ),
    new_code_cell(
        "bias = summary['length_bias']\n"
        "rho = bias['spearman_score_vs_length']\n"
        "print(f\"Spearman(score, response length) = {rho if rho is None else round(rho, 3)}; median length: \"\n"
        "      f\"pool {bias['pool'].get('median')}, selected {bias['selected'].get('median')} characters\")\n"
        "fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.5))\n"
        "scored = table[table['finite']]\n"
        "left.scatter(scored['response_chars'], scored['score'], s=8, alpha=0.6)\n"
        "left.set_xscale('log')\n"
        "left.set_xlabel('response length (characters)')\n"
        "left.set_ylabel('score')\n"
        "bins = np.logspace(0, np.log10(max(2, table['response_chars'].max())), 30)\n"
        "right.hist(table['response_chars'], bins=bins, alpha=0.5, density=True, label='pool')\n"
        "right.hist(selected['response_chars'], bins=bins, alpha=0.5, density=True, label='selected')\n"
        "right.set_xscale('log')\n"
        "right.set_xlabel('response length (characters)')\n"
        "right.legend()\n"
        "plt.show()"
    ),
    new_markdown_cell(
        "## Most and least helpful examples per subtask\nEach example in full (prompt => response); set "
        "`WIDTH` to shorten them."
    ),
    new_code_cell(
        "WIDTH = 100_000  # characters of each example shown\n"
        "pd.set_option('display.max_colwidth', None)\n\n"
        "def preview(rows, column):\n"
        "    frame = pd.DataFrame({\n"
        "        'id': rows['id'],\n"
        "        'score': rows[column].round(4),\n"
        "        'example': [example_text(pool[i], WIDTH) for i in rows['id']],\n"
        "    })\n"
        "    return frame.style.set_properties(subset=['example'], **{'white-space': 'pre-wrap', 'text-align': 'left'})\n\n"
        "for task in tasks:\n"
        "    print(f'=== {task}: top {K}')\n"
        "    display(preview(top_for_task(table, task, K), 'task:' + task))\n"
        "    print(f'=== {task}: bottom {K}')\n"
        "    display(preview(top_for_task(table, task, K, bottom=True), 'task:' + task))\n"
        "if not tasks:  # target-free methods have no subtasks: the two ends of the whole ranking\n"
        "    scored = table[table['finite']]\n"
        "    print(f'=== top {K}')\n"
        "    display(preview(scored.head(K), 'score'))\n"
        "    print(f'=== bottom {K}')\n"
        "    display(preview(scored.tail(K), 'score'))"
    ),
    new_markdown_cell(
        "## Other methods on the same run\n"
        "Every other ranking of this run (`rank-<method>-<target>` folders, e.g. from `influence compare`): "
        "how much of each one's top agrees with this ranking's, and its own length bias."
    ),
    new_code_cell(
        "from influence.selection.compare import overlap\nfrom influence.selection.outputs import spearman\n\n"
        "rows = []\n"
        "suffix = RANKING.name.split('-', 2)[-1] if RANKING.name.startswith('rank-') else ''\n"
        "for folder in sorted(RUN.glob('rank-*')):\n"
        "    if not (folder / 'scores.parquet').is_file() or (suffix and not folder.name.endswith(suffix)):\n"
        "        continue\n"
        "    other = load_rankings(folder)\n"
        "    fraction = summary['n_selected'] / summary['n_pool']\n"
        "    rows.append({'ranking': folder.name, 'top_overlap_with_this': overlap(other, table, fraction),\n"
        "                 'spearman_with_length': spearman(other['score'], other['response_chars'])})\n"
        "pd.DataFrame(rows)"
    ),
    new_markdown_cell(
        "## Do subtasks agree?\nCorrelation of the per-subtask scores over the pool, subtasks ordered by "
        "hierarchical clustering (with 57 MMLU subjects the groups show)."
    ),
    new_code_cell(
        "if report.subtask_similarity_figure(table, summary) is not None:\n"
        "    plt.show()\n"
        "else:\n"
        "    print('fewer than two subtasks: nothing to compare')"
    ),
    new_markdown_cell(
        "## Agreement between checkpoints\nFor LESS: the Spearman correlation between the scores each warm-up "
        "checkpoint alone gives the pool (LESS sums them, weighted by learning rate)."
    ),
    new_code_cell(
        "if summary['method'] == 'less' and summary.get('target'):\n"
        "    agreement = report.checkpoint_agreement(RUN, summary['target'])\n"
        "    display(agreement) if agreement is not None else print('one checkpoint: nothing to compare')\n"
        "else:\n"
        "    print('per-checkpoint scores are shown for LESS rankings')"
    ),
    new_markdown_cell("## Agreement between the run's rankings\nShare of each ranking's top also in another's top."),
    new_code_cell(
        "if report.agreement_figure(RUN) is not None:\n"
        "    plt.show()\n"
        "else:\n"
        "    print('one ranking only: nothing to compare')"
    ),
]

cells += [
    new_markdown_cell(
        "## How diverse is the selection?\n"
        "Vendi score (the effective number of distinct examples, cosine kernel), mean distance to the nearest "
        "other example, and the share of the pool's k-means clusters covered: the selection against a random "
        "subset of the same size and the whole pool (`rank --diversify` selects for diversity)."
    ),
    new_code_cell(
        "diversity = summary['selection'].get('diversity')\n"
        "if diversity:\n"
        "    frame = pd.DataFrame({k: diversity[k] for k in ('selection', 'random', 'pool')}).T\n"
        "    print(f\"space: {diversity['space']}; diversify: {summary['selection'].get('diversify', 'no')}\")\n"
        "    fig, axes = plt.subplots(1, 3, figsize=(10, 2.8))\n"
        "    for ax, column in zip(axes, ['vendi', 'mean_nn_distance', 'cluster_coverage']):\n"
        "        frame[column].plot.bar(ax=ax, color=['tab:red', 'tab:gray', 'tab:blue'], rot=0)\n"
        "        ax.set_title(column)\n"
        "    plt.tight_layout()\n"
        "    plt.show()\n"
        "    display(frame)\n"
        "else:\n"
        "    print('no diversity report: the run has no space to measure in (--space)')"
    ),
    new_markdown_cell(
        "## Which tokens of a target example the top examples help (`rank --method ekfac --per-token K`)\n"
        "Each target example's influence with the ranking's top K pool examples, split by its response tokens: "
        "green where training on them lowers that token's loss, red where it raises it (hover for the value)."
    ),
    new_code_cell(
        "from IPython.display import HTML\n\n"
        "from influence.report.html import token_shading\n\n"
        "if (RANKING / 'tokens.parquet').is_file():\n"
        "    tokens = pd.read_parquet(RANKING / 'tokens.parquet')\n"
        "    display(HTML(token_shading(tokens)))\n"
        "    display(tokens.groupby(['target_id', 'pool_id'])['contribution'].sum().unstack().round(4))\n"
        "else:\n"
        "    print('no per-token split in this ranking: rank --method ekfac (or kfac, identity) --per-token 5')"
    ),
    new_markdown_cell(
        "## What retraining says: the LDS (`influence evaluate lds`)\n"
        "For every target checked with the counterfactual engine: how well each method's summed effects predict "
        "the loss that held-out subset models actually reach (Spearman per target example, averaged; 1 = exact "
        "order, 0 = chance), with its bootstrap interval."
    ),
    new_code_cell(
        "lds_tables = {folder.name: pd.read_csv(folder / 'lds.csv') for folder in sorted((RUN / 'lds').glob('*'))\n"
        "              if (folder / 'lds.csv').is_file()}\n"
        "for name, lds in lds_tables.items():\n"
        "    fig, ax = plt.subplots(figsize=(7, 0.4 * len(lds) + 1.5))\n"
        "    ax.errorbar(lds['lds'], range(len(lds)), xerr=[lds['lds'] - lds['ci_low'], lds['ci_high'] - lds['lds']],\n"
        "                fmt='o', capsize=3)\n"
        "    ax.set_yticks(range(len(lds)), lds['method'])\n"
        "    ax.axvline(0, color='k', lw=0.5)\n"
        "    ax.set_xlabel(f'LDS on {name} (higher = predicts retraining better)')\n"
        "    ax.set_title(f\"{name}: {int(lds['n_subsets'].iloc[0])} held-out subset models\")\n"
        "    plt.show()\n"
        "if not lds_tables:\n"
        "    print('no LDS yet: run `influence evaluate lds --run RUN --target ...`')"
    ),
    new_markdown_cell(
        "## Does the selection survive the hyperparameter grid? (`influence evaluate select`)\n"
        "Each subset retrained over a grid of learning rates, epochs, batch sizes and schedulers with several "
        "seeds, measured on held-out data: the verdict against each baseline, and each subset's best setting."
    ),
    new_code_cell(
        "for path in sorted(RUN.glob('select-*/report.json')):\n"
        "    report = json.loads(path.read_text())\n"
        "    print(f\"== {path.parent.name}: {report['metric']} on {report['primary_eval']}\")\n"
        "    for line in report['verdicts']:\n"
        "        print('  ' + line)\n"
        "    display(pd.DataFrame(report['best_setting'])[['subset', 'setting', report['metric'] + '_mean',\n"
        "                                                   report['metric'] + '_sd']])\n"
        "    summary_table = pd.DataFrame(report['summary'])\n"
        "    main = summary_table[summary_table['eval'] == report['primary_eval']]\n"
        "    pivot = main.pivot(index='setting', columns='subset', values=report['metric'] + '_mean')\n"
        "    pivot.plot(marker='o', figsize=(8, 3.5), rot=60)\n"
        "    plt.ylabel(report['metric'] + (' (higher is better)' if report['higher_is_better'] else ' (lower is better)'))\n"
        "    plt.show()"
    ),
]



def notebook_text() -> str:
    """The notebook as written to disk; cell ids are numbered, not random, so the text is reproducible."""
    notebook = new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                                   "language": "python"}})
    for number, cell in enumerate(notebook.cells):
        cell["id"] = f"cell-{number:02d}"
    return nbformat.writes(notebook) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="compare the copies with this source; write nothing")
    args = parser.parse_args()
    text = notebook_text()
    stale = [path for path in COPIES if not path.is_file() or path.read_text(encoding="utf-8") != text]
    if args.check:
        for path in stale:
            print(f"{path.relative_to(ROOT)} differs from scripts/make_notebook.py: run `python scripts/make_notebook.py`")
        sys.exit(1 if stale else 0)
    for path in COPIES:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        print(path.relative_to(ROOT))


if __name__ == "__main__":
    main()
