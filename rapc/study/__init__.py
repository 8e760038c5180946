"""``rapc study``: rapc's pipeline beside the baselines a reviewer asks for, per compression ratio and scheme.

    cache.py       a directory whose result file, written last, marks finished work
    rows.py        the shared dense models and the registered rows: how each contender is trained, on one schedule
    seeds.py       one row across seeds: each seed's figures, their mean and standard deviation
    evaluation.py  every model measured the same way: size, the judge's clean/PGD/ensemble accuracy, latency
    report.py      study.json's rows as one table, Markdown and a plot of robust accuracy vs MACs
    run.py         the study: every cell's rows, then latency of all models together
"""

from rapc.study.rows import DEFAULT_ROWS, ROWS
from rapc.study.run import StudyOptions, StudyResult, study

__all__ = ["DEFAULT_ROWS", "ROWS", "StudyOptions", "StudyResult", "study"]
