"""Run the demo study (about a minute on a laptop CPU) and read its table in pandas.

    python examples/python/study_pandas.py [demo.sqlite]
"""

import pathlib
import sys

import persona_gate as pg

study = pg.Study.load(pathlib.Path(__file__).resolve().parent.parent / "demo_study.toml")
print(study.text)  # conditions, prompt sets, work
db = sys.argv[1] if len(sys.argv) > 1 else "demo.sqlite"
study.run(db=db, progress=True)  # resumable: Ctrl-C, then run again
table = study.table()
print(table)  # the text `pgate study table` prints
try:
    df = table.to_pandas()
except ImportError:
    print("(pip install pandas for a DataFrame)")
else:
    print(df[["condition", "prompt_set", "n", "refusal", "refusal_lo", "refusal_hi"]])
