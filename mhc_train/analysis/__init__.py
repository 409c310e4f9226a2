"""Analysis of finished (or running, or killed) runs: side-by-side comparison over arms, seeds and LRs.

runs.py reads run directories (the arm recorded at train time), stats.py computes the seed statistics (paired
differences to the residual with t-intervals), report.py writes the tables and `compare`, plot.py draws the figure,
and experiment.py runs a whole experiment (`mhc-train demo`): every arm x LR x seed, then the comparison.
"""

from mhc_train.analysis.report import compare, markdown_table, stats_markdown, summary_rows
from mhc_train.analysis.runs import CompareError, disambiguate, load_run
from mhc_train.analysis.stats import mean_std, paired_difference, seed_statistics, verdict
from mhc_train.config import arm_name

__all__ = [
    "CompareError",
    "arm_name",
    "compare",
    "disambiguate",
    "load_run",
    "markdown_table",
    "mean_std",
    "paired_difference",
    "seed_statistics",
    "stats_markdown",
    "summary_rows",
    "verdict",
]
