"""Run the demo study (examples/demo_study.toml: q05, 76 generations of 32 tokens, about a minute
on a laptop CPU) and read its table in pandas.

Needs the package and, for the DataFrame, pandas (`pip install pandas`); without it the table is
printed as text. `--limit N` stops after N new results (a smoke run; running again continues, as
after Ctrl-C).

    python examples/python/study_pandas.py [demo.sqlite] [--limit N]
"""

import argparse
import pathlib

import persona_gate as pg

ap = argparse.ArgumentParser()
ap.add_argument("db", nargs="?", default="demo.sqlite", help="results database (default demo.sqlite)")
ap.add_argument("--limit", type=int, default=None, help="stop after this many new results")
args = ap.parse_args()

study = pg.Study.load(pathlib.Path(__file__).resolve().parent.parent / "demo_study.toml")
print(study.text)  # conditions, prompt sets, work
study.run(db=args.db, limit=args.limit, progress=True)  # resumable: Ctrl-C, then run again
table = study.table()
print(table)  # the text `pgate study table` prints
try:
    df = table.to_pandas()
except ImportError:
    print("(pip install pandas for a DataFrame)")
else:
    print(df[["condition", "prompt_set", "n", "refusal", "refusal_lo", "refusal_hi"]])
