"""Studies and receipts from Python: a run stopped early keeps what it stored and continues when
run again; status, table and export read the results; the example receipts verify."""

import pytest
import persona_gate as pg

from conftest import REPO


def test_study_stops_cleanly_and_resumes(tmp_path):
    study = pg.Study.load(REPO / "examples" / "demo_study.toml")
    db = tmp_path / "demo.sqlite"

    def stop_at_first_result(ev):
        # What Ctrl-C does, without a signal: the run finishes its wave, stores it, then raises.
        if ev["event"] == "progress" and ev["data"]["done"] >= 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        study.run(db, limit=16, wave=8, judge=False, progress=stop_at_first_result)
    first = study.status(db)
    assert 0 < first["done"] < first["total"]
    study.run(db, limit=8, wave=8, judge=False)
    assert study.status(db)["done"] > first["done"]
    table = study.table(db)
    assert len(table) > 0 and "baseline" in str(table)
    assert {"condition", "refusal", "refusal_lo", "refusal_hi"} <= set(table.flat()[0])
    assert study.export(tmp_path / "rows.jsonl", db=db) == study.status(db)["done"]


def test_example_receipts_verify():
    r = pg.receipts.verify(REPO / "examples" / "receipts", skip_files=True)
    assert r.ok, r.text
    assert r.report["checks"]
