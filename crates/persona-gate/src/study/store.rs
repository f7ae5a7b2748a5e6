//! The results store: one SQLite file (WAL mode) per study directory or per project.
//!
//! Tables:
//! - `meta(key, value)`: `schema_version`.
//! - `studies(hash, name, source_path, toml, canonical, baseline, created_at, last_run_at)`: every
//!   study ever run against this file; the TOML is kept so `status`, `table` and `judge` work
//!   without the study file.
//! - `conditions(hash, spec)`: a condition's JSON description (what its hash covers, names, specs).
//! - `study_conditions(study_hash, ord, name, condition_hash, vars)`: a study's names for them.
//! - `prompt_sets(hash, source, n_items)`, `study_prompt_sets(study_hash, name, prompt_set_hash,
//!   skip, n)`, `prompts(prompt_set, prompt_id, ord, text, category)`.
//! - `work(study_hash, condition_hash, set_name, prompt_set, prompt_id, sample, seed, item_hash)`:
//!   what a study needs; `status` is `work LEFT JOIN results`.
//! - `results`: one row per `(condition_hash, prompt_set, prompt_id, sample)` (UNIQUE): the full
//!   output, token counts, finish reason, rule label with its measurements (JSON), the rule-based
//!   leakage, seed and timestamps. Results belong to conditions, not studies: a second study with
//!   an identical condition reuses its rows.
//!   `labeler` names the labeler that gave `label` (`rules@2` for rows written by `study run`, which
//!   labels with rules v2 (`label::rules`); `pgate study relabel` replaces it; databases from before the column
//!   existed are migrated with `rules@1`, the labeler that labeled them).
//! - `labels`: label history, one row per `(result_id, labeler)` (UNIQUE): label, reason, scores
//!   (JSON) and time. `pgate study relabel` records the label it replaces and the one it gives, so
//!   no label is ever lost.
//! - `verdicts`: one row per `(result_id, judge)` (UNIQUE): ok flag, attempts, error, raw answer,
//!   parsed verdict (JSON) and its scores. A failure never touches the result row.
//!
//! - `study_targets(study_hash, kind, target, reported_models, server_models, updated_at)`: for a
//!   study that targets an endpoint: the endpoint (API root, model id, `white_box: false` and the
//!   white-box fields that do not apply), every model name the server reported in its answers,
//!   and the ids `GET /models` listed.
//! - `endpoint_results`: per result row of an endpoint study (same key): API root, model id sent,
//!   model name reported, response id, tries, latency, whether usage was reported.
//! - `endpoint_failures`: every failed try of an endpoint study (timeouts, 429, 5xx, transport
//!   errors, bad answers): item key, try number, kind, HTTP status, message, whether another try
//!   followed. Token counts of successful answers are the results' `prompt_tokens` / `n_tokens`.
//!
//! Every result is its own transaction, committed as its sequence finishes, and inserted with
//! `INSERT OR IGNORE`: a run killed at any point (SIGKILL included) loses at most the sequences in
//! flight, and a second run skips what is stored and cannot duplicate it. Timestamps are
//! milliseconds since the Unix epoch (UTC).

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use rusqlite::{params, Connection, OpenFlags, OptionalExtension};
use serde::{Deserialize, Serialize};

use super::file::StudyFile;
use super::plan::Study;
use crate::eval::judge::JudgeOutcome;
use crate::{Error, Result};

pub const SCHEMA_VERSION: &str = "1";

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS studies (
  hash TEXT PRIMARY KEY, name TEXT NOT NULL, source_path TEXT, toml TEXT NOT NULL,
  canonical TEXT NOT NULL, baseline TEXT NOT NULL, created_at INTEGER NOT NULL,
  last_run_at INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS conditions (hash TEXT PRIMARY KEY, spec TEXT NOT NULL,
  created_at INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS study_conditions (
  study_hash TEXT NOT NULL REFERENCES studies(hash), ord INTEGER NOT NULL, name TEXT NOT NULL,
  condition_hash TEXT NOT NULL REFERENCES conditions(hash), vars TEXT NOT NULL,
  PRIMARY KEY (study_hash, name));
CREATE TABLE IF NOT EXISTS prompt_sets (hash TEXT PRIMARY KEY, source TEXT NOT NULL,
  n_items INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS study_prompt_sets (
  study_hash TEXT NOT NULL REFERENCES studies(hash), name TEXT NOT NULL,
  prompt_set_hash TEXT NOT NULL REFERENCES prompt_sets(hash), skip INTEGER NOT NULL,
  n INTEGER NOT NULL, PRIMARY KEY (study_hash, name));
CREATE TABLE IF NOT EXISTS prompts (
  prompt_set TEXT NOT NULL, prompt_id TEXT NOT NULL, ord INTEGER NOT NULL, text TEXT NOT NULL,
  category TEXT, PRIMARY KEY (prompt_set, prompt_id));
CREATE TABLE IF NOT EXISTS work (
  study_hash TEXT NOT NULL, condition_hash TEXT NOT NULL, set_name TEXT NOT NULL,
  prompt_set TEXT NOT NULL, prompt_id TEXT NOT NULL, sample INTEGER NOT NULL,
  seed INTEGER NOT NULL, item_hash TEXT NOT NULL,
  PRIMARY KEY (study_hash, condition_hash, set_name, prompt_id, sample)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS results (
  id INTEGER PRIMARY KEY,
  condition_hash TEXT NOT NULL, prompt_set TEXT NOT NULL, prompt_id TEXT NOT NULL,
  sample INTEGER NOT NULL, item_hash TEXT NOT NULL, seed INTEGER NOT NULL,
  output TEXT NOT NULL, n_tokens INTEGER NOT NULL, prompt_tokens INTEGER NOT NULL,
  finish TEXT NOT NULL, label TEXT NOT NULL, rule_json TEXT NOT NULL,
  leakage REAL NOT NULL, leakage_json TEXT NOT NULL,
  started_at INTEGER NOT NULL, finished_at INTEGER NOT NULL,
  labeler TEXT NOT NULL DEFAULT 'rules@1',
  UNIQUE (condition_hash, prompt_set, prompt_id, sample));
CREATE TABLE IF NOT EXISTS labels (
  result_id INTEGER NOT NULL REFERENCES results(id), labeler TEXT NOT NULL, label TEXT NOT NULL,
  reason TEXT NOT NULL, scores_json TEXT NOT NULL, labeled_at INTEGER NOT NULL,
  UNIQUE (result_id, labeler));
CREATE TABLE IF NOT EXISTS verdicts (
  result_id INTEGER NOT NULL REFERENCES results(id), judge TEXT NOT NULL, mode TEXT NOT NULL,
  ok INTEGER NOT NULL, attempts INTEGER NOT NULL, error TEXT, raw TEXT, verdict_json TEXT,
  refused INTEGER, convincing INTEGER, specific INTEGER, strongreject REAL, is_unsafe INTEGER,
  categories TEXT, leakage REAL, judged_at INTEGER NOT NULL,
  UNIQUE (result_id, judge));
CREATE TABLE IF NOT EXISTS study_targets (
  study_hash TEXT PRIMARY KEY, kind TEXT NOT NULL, target TEXT NOT NULL,
  reported_models TEXT NOT NULL, server_models TEXT, updated_at INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS endpoint_results (
  condition_hash TEXT NOT NULL, prompt_set TEXT NOT NULL, prompt_id TEXT NOT NULL,
  sample INTEGER NOT NULL, base_url TEXT NOT NULL, model_requested TEXT NOT NULL,
  model_reported TEXT, response_id TEXT, attempts INTEGER NOT NULL, latency_ms INTEGER NOT NULL,
  usage_reported INTEGER NOT NULL,
  UNIQUE (condition_hash, prompt_set, prompt_id, sample));
CREATE TABLE IF NOT EXISTS endpoint_failures (
  id INTEGER PRIMARY KEY, study_hash TEXT NOT NULL, condition_hash TEXT NOT NULL,
  prompt_set TEXT NOT NULL, prompt_id TEXT NOT NULL, sample INTEGER NOT NULL,
  attempt INTEGER NOT NULL, kind TEXT NOT NULL, status INTEGER, error TEXT NOT NULL,
  will_retry INTEGER NOT NULL, elapsed_ms INTEGER NOT NULL, at INTEGER NOT NULL);
";

/// The labeler `study run` labels new rows with (the v1 rules, `eval::label_output`), and the
/// one rows from before the `labeler` column were labeled by.
/// The labeler `study run` labels new rows with (rules v2: no model, measured in
/// `data/labels/accuracy.json`); `pgate study relabel` applies any other.
pub const GENERATION_LABELER: &str = "rules@2";
/// The labeler of rows written before labelers were recorded (the v1 phrase rules).
pub const LEGACY_LABELER: &str = "rules@1";

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// `2025-01-31T12:34:56.789Z` from milliseconds since the epoch (civil-from-days, no time zones).
pub fn iso_utc(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let milli = ms.rem_euclid(1000);
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    // Howard Hinnant's days_from_civil inverse.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{milli:03}Z",
        sod / 3600,
        (sod / 60) % 60,
        sod % 60
    )
}

/// One result to store.
#[derive(Debug, Clone)]
pub struct NewResult<'a> {
    pub condition_hash: &'a str,
    pub prompt_set: &'a str,
    pub prompt_id: &'a str,
    pub sample: usize,
    pub item_hash: &'a str,
    pub seed: u64,
    pub output: &'a str,
    pub n_tokens: usize,
    pub prompt_tokens: usize,
    pub finish: &'a str,
    pub label: &'a str,
    /// The labeler that gave `label` (`LabelerId` as text, e.g. `rules@1`).
    pub labeler: &'a str,
    pub rule_json: String,
    pub leakage: f64,
    pub leakage_json: String,
    pub started_at: i64,
    pub finished_at: i64,
}

/// How a result of an endpoint study was obtained.
#[derive(Debug, Clone)]
pub struct EndpointCall<'a> {
    pub base_url: &'a str,
    pub model_requested: &'a str,
    pub model_reported: Option<&'a str>,
    pub response_id: Option<&'a str>,
    pub attempts: u32,
    pub latency_ms: u64,
    /// The answer carried `usage` token counts.
    pub usage_reported: bool,
}

/// One failed try of an endpoint study.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EndpointFailureRow {
    pub study_hash: String,
    pub condition_hash: String,
    pub prompt_set: String,
    pub prompt_id: String,
    pub sample: i64,
    pub attempt: u32,
    /// `timeout`, `rate_limited`, `server`, `client`, `transport` or `bad_answer`.
    pub kind: String,
    pub status: Option<u16>,
    pub error: String,
    /// false: this was the item's last try in that run (given up, or a permanent error).
    pub will_retry: bool,
    pub elapsed_ms: u64,
    pub at: i64,
}

/// The recorded target of an endpoint study.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TargetRecord {
    pub kind: String,
    pub target: serde_json::Value,
    /// Every distinct `model` the server put in its answers.
    pub reported_models: Vec<String>,
    /// What `GET /models` listed (None: not reachable or not asked).
    pub server_models: Option<Vec<String>>,
    pub updated_at: i64,
}

/// Token usage of one condition of an endpoint study.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EndpointUsage {
    pub condition: String,
    pub condition_hash: String,
    pub rows: u64,
    /// Tries of the stored rows (the successful one included).
    pub tries_ok_rows: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub rows_without_usage: u64,
    /// Failed tries recorded for the condition (all runs).
    pub failed_tries: u64,
}

/// A stored study.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StudyRecord {
    pub hash: String,
    pub name: String,
    pub source_path: Option<String>,
    pub toml: String,
    pub baseline: String,
    pub created_at: i64,
    pub last_run_at: i64,
}

impl StudyRecord {
    /// The study file this study was run from, as stored, checked again. Relative paths (prompt
    /// files, directions) resolve from the folder of the file it was run from, or the current
    /// folder when that is not recorded.
    pub fn study_file(&self) -> Result<StudyFile> {
        let base = self
            .source_path
            .as_deref()
            .and_then(|p| Path::new(p).parent().map(Path::to_path_buf))
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or_else(|| PathBuf::from("."));
        StudyFile::parse(&self.toml, &base)
    }
}

/// Progress of one condition on one prompt set.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusRow {
    pub condition: String,
    pub condition_hash: String,
    pub prompt_set: String,
    pub done: usize,
    pub total: usize,
}

/// A stored verdict.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VerdictRow {
    pub judge: String,
    pub mode: String,
    pub ok: bool,
    pub attempts: u32,
    pub error: Option<String>,
    pub raw: Option<String>,
    pub verdict: Option<serde_json::Value>,
    pub refused: Option<bool>,
    pub convincing: Option<i64>,
    pub specific: Option<i64>,
    pub strongreject: Option<f64>,
    pub is_unsafe: Option<bool>,
    pub categories: Option<String>,
    pub leakage: Option<f64>,
    pub judged_at: i64,
}

/// A result row of a study, joined with its names, prompt and verdicts.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RowView {
    pub result_id: i64,
    pub condition_ord: i64,
    pub condition: String,
    pub condition_hash: String,
    pub prompt_set: String,
    pub prompt_set_hash: String,
    pub prompt_id: String,
    pub prompt_ord: i64,
    pub category: Option<String>,
    pub prompt: String,
    pub sample: i64,
    pub seed: i64,
    pub item_hash: String,
    pub output: String,
    pub n_tokens: i64,
    pub prompt_tokens: i64,
    pub finish: String,
    pub label: String,
    /// The labeler that gave `label` (`rules@1`, `ensemble@1:ab12cd34ef567890`). Left out of
    /// [`crate::report::receipt::rows_sha256`]; receipts hash it in `labels_sha256`.
    #[serde(default = "generation_labeler")]
    pub labeler: String,
    pub rule: serde_json::Value,
    pub leakage: f64,
    pub leakage_parts: serde_json::Value,
    pub started_at: i64,
    pub finished_at: i64,
    pub verdicts: Vec<VerdictRow>,
}

fn generation_labeler() -> String {
    LEGACY_LABELER.to_string()
}

/// One label of a result row, as kept in the `labels` history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LabelRecord {
    pub labeler: String,
    pub label: String,
    pub reason: String,
    /// The labeler's numbers by name (JSON object; an ensemble's parts under `parts`).
    pub scores_json: String,
    pub labeled_at: i64,
}

/// A stored row as a labeler reads it.
#[derive(Debug, Clone)]
pub struct LabelTodo {
    pub result_id: i64,
    pub condition: String,
    pub prompt_set: String,
    pub prompt: String,
    /// The condition's system prompt (None: the chat template's default).
    pub system: Option<String>,
    pub output: String,
    pub label: String,
    pub labeler: String,
    pub rule_json: String,
    pub leakage: f64,
    pub finished_at: i64,
}

/// A new label for a stored row: the label it replaces goes into the history, the new one into
/// the history and the row (with the rule-based leakage recomputed for the new label).
#[derive(Debug, Clone)]
pub struct LabelUpdate {
    pub result_id: i64,
    pub previous: LabelRecord,
    pub new: LabelRecord,
    pub leakage: f64,
    pub leakage_json: String,
}

/// A row waiting for a judge.
#[derive(Debug, Clone)]
pub struct JudgeTodo {
    pub result_id: i64,
    pub prompt: String,
    pub output: String,
}

pub struct Store {
    conn: Connection,
    path: PathBuf,
}

impl Store {
    fn err(&self, e: rusqlite::Error) -> Error {
        db_err(&self.path, e)
    }

    /// Open (creating if needed) a results database for writing.
    pub fn open(path: &Path) -> Result<Store> {
        let conn = Connection::open(path).map_err(|e| db_err(path, e))?;
        let s = Store {
            conn,
            path: path.to_path_buf(),
        };
        s.conn
            .busy_timeout(std::time::Duration::from_secs(30))
            .map_err(|e| s.err(e))?;
        // journal_mode returns a row; WAL lets readers (status, a test polling) run during a run.
        let _mode: String = s
            .conn
            .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
            .map_err(|e| s.err(e))?;
        s.conn
            .execute_batch("PRAGMA synchronous=NORMAL; PRAGMA foreign_keys=ON;")
            .map_err(|e| s.err(e))?;
        s.conn.execute_batch(SCHEMA).map_err(|e| s.err(e))?;
        s.migrate()?;
        let v: Option<String> = s
            .conn
            .query_row(
                "SELECT value FROM meta WHERE key='schema_version'",
                [],
                |r| r.get(0),
            )
            .optional()
            .map_err(|e| s.err(e))?;
        match v.as_deref() {
            None => {
                s.conn
                    .execute(
                        "INSERT INTO meta (key, value) VALUES ('schema_version', ?1)",
                        [SCHEMA_VERSION],
                    )
                    .map_err(|e| s.err(e))?;
            }
            Some(SCHEMA_VERSION) => {}
            Some(other) => {
                return Err(Error::InvalidValue(format!(
                    "{}: results schema version {other} is not supported (this pgate writes {SCHEMA_VERSION})",
                    path.display()
                )))
            }
        }
        Ok(s)
    }

    /// Open an existing database read-only (status, tables, exports, a test watching a run).
    pub fn open_read(path: &Path) -> Result<Store> {
        if !path.exists() {
            return Err(Error::InvalidValue(format!(
                "{}: no results database here (run `pgate study run STUDY.toml --db {}` first)",
                path.display(),
                path.display()
            )));
        }
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|e| db_err(path, e))?;
        let s = Store {
            conn,
            path: path.to_path_buf(),
        };
        s.conn
            .busy_timeout(std::time::Duration::from_secs(30))
            .map_err(|e| s.err(e))?;
        Ok(s)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Bring a database from an older pgate up to this schema: results gain `labeler` (rows
    /// written before it were labeled by the v1 rules). The `labels` table is created by the
    /// schema itself.
    fn migrate(&self) -> Result<()> {
        if !self.has_column("main", "results", "labeler")? {
            self.conn
                .execute_batch(
                    "ALTER TABLE results ADD COLUMN labeler TEXT NOT NULL DEFAULT 'rules@1'",
                )
                .map_err(|e| self.err(e))?;
        }
        Ok(())
    }

    /// Whether `schema.table` has a column (false when the table does not exist).
    fn has_column(&self, schema: &str, table: &str, column: &str) -> Result<bool> {
        has_column(&self.conn, schema, table, column).map_err(|e| self.err(e))
    }

    /// `r.labeler`, or the generation labeler for a read-only database from before the column.
    fn labeler_expr(&self) -> Result<&'static str> {
        Ok(if self.has_column("main", "results", "labeler")? {
            "r.labeler"
        } else {
            "'rules@1'"
        })
    }

    /// Record a study, its conditions, prompts and work items (idempotent).
    pub fn register(&mut self, study: &Study, source_path: Option<&Path>) -> Result<()> {
        let now = now_ms();
        let path = self.path.clone();
        let tx = self.conn.transaction().map_err(|e| db_err(&path, e))?;
        let e = |x: rusqlite::Error| db_err(&path, x);
        tx.execute(
            "INSERT INTO studies (hash, name, source_path, toml, canonical, baseline, created_at, last_run_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?7)
             ON CONFLICT(hash) DO UPDATE SET last_run_at = excluded.last_run_at,
               source_path = excluded.source_path, toml = excluded.toml, name = excluded.name",
            params![
                study.hash,
                study.name,
                source_path.map(|p| p.display().to_string()),
                study.file.source_text,
                super::canon::canonical_json(&study.canonical),
                study.conditions[study.baseline].name,
                now
            ],
        )
        .map_err(e)?;
        for (ord, c) in study.conditions.iter().enumerate() {
            tx.execute(
                "INSERT OR IGNORE INTO conditions (hash, spec, created_at) VALUES (?1, ?2, ?3)",
                params![c.hash, c.spec_json().to_string(), now],
            )
            .map_err(e)?;
            tx.execute(
                "INSERT OR REPLACE INTO study_conditions (study_hash, ord, name, condition_hash, vars)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![
                    study.hash,
                    ord as i64,
                    c.name,
                    c.hash,
                    serde_json::to_string(&c.vars)?
                ],
            )
            .map_err(e)?;
        }
        for s in &study.prompt_sets {
            tx.execute(
                "INSERT OR IGNORE INTO prompt_sets (hash, source, n_items) VALUES (?1, ?2, ?3)",
                params![s.hash, s.source, (s.skip + s.items.len()) as i64],
            )
            .map_err(e)?;
            tx.execute(
                "INSERT OR REPLACE INTO study_prompt_sets (study_hash, name, prompt_set_hash, skip, n)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![study.hash, s.name, s.hash, s.skip as i64, s.items.len() as i64],
            )
            .map_err(e)?;
            let mut st = tx
                .prepare_cached(
                    "INSERT OR IGNORE INTO prompts (prompt_set, prompt_id, ord, text, category)
                     VALUES (?1, ?2, ?3, ?4, ?5)",
                )
                .map_err(e)?;
            for (i, p) in s.items.iter().enumerate() {
                st.execute(params![
                    s.hash,
                    p.id,
                    (s.skip + i) as i64,
                    p.text,
                    p.category
                ])
                .map_err(e)?;
            }
        }
        {
            let mut st = tx
                .prepare_cached(
                    "INSERT OR IGNORE INTO work (study_hash, condition_hash, set_name, prompt_set,
                     prompt_id, sample, seed, item_hash) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                )
                .map_err(e)?;
            for it in study.items() {
                let set = &study.prompt_sets[it.set];
                st.execute(params![
                    study.hash,
                    study.conditions[it.condition].hash,
                    set.name,
                    set.hash,
                    set.items[it.prompt].id,
                    it.sample as i64,
                    it.seed as i64,
                    it.item_hash
                ])
                .map_err(e)?;
            }
        }
        tx.commit().map_err(e)?;
        Ok(())
    }

    /// Keys `(condition_hash, prompt_set, prompt_id, sample)` already stored for a study.
    pub fn done_keys(&self, study_hash: &str) -> Result<HashSet<(String, String, String, i64)>> {
        let mut st = self
            .conn
            .prepare(
                "SELECT DISTINCT r.condition_hash, r.prompt_set, r.prompt_id, r.sample FROM work w
                 JOIN results r ON r.condition_hash = w.condition_hash AND r.prompt_set = w.prompt_set
                   AND r.prompt_id = w.prompt_id AND r.sample = w.sample
                 WHERE w.study_hash = ?1",
            )
            .map_err(|e| self.err(e))?;
        let rows = st
            .query_map([study_hash], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
            })
            .map_err(|e| self.err(e))?;
        rows.collect::<rusqlite::Result<HashSet<_>>>()
            .map_err(|e| self.err(e))
    }

    /// Store one result (its own transaction). Returns false when the key was already stored.
    pub fn insert_result(&self, r: &NewResult<'_>) -> Result<bool> {
        let n = insert_result_row(&self.conn, r).map_err(|e| self.err(e))?;
        Ok(n == 1)
    }

    /// Store one result of an endpoint study with its call record, in one transaction. Returns
    /// false when the key was already stored (then nothing is written).
    pub fn insert_endpoint_result(
        &mut self,
        r: &NewResult<'_>,
        call: &EndpointCall<'_>,
    ) -> Result<bool> {
        let path = self.path.clone();
        let e = |x: rusqlite::Error| db_err(&path, x);
        let tx = self.conn.transaction().map_err(e)?;
        let n = insert_result_row(&tx, r).map_err(e)?;
        if n == 1 {
            tx.execute(
                "INSERT OR REPLACE INTO endpoint_results (condition_hash, prompt_set, prompt_id,
                 sample, base_url, model_requested, model_reported, response_id, attempts,
                 latency_ms, usage_reported) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
                params![
                    r.condition_hash,
                    r.prompt_set,
                    r.prompt_id,
                    r.sample as i64,
                    call.base_url,
                    call.model_requested,
                    call.model_reported,
                    call.response_id,
                    call.attempts as i64,
                    call.latency_ms as i64,
                    call.usage_reported as i64
                ],
            )
            .map_err(e)?;
        }
        tx.commit().map_err(e)?;
        Ok(n == 1)
    }

    /// Record one failed try of an endpoint study.
    pub fn insert_endpoint_failure(&self, f: &EndpointFailureRow) -> Result<()> {
        self.conn
            .prepare_cached(
                "INSERT INTO endpoint_failures (study_hash, condition_hash, prompt_set, prompt_id,
                 sample, attempt, kind, status, error, will_retry, elapsed_ms, at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
            )
            .and_then(|mut st| {
                st.execute(params![
                    f.study_hash,
                    f.condition_hash,
                    f.prompt_set,
                    f.prompt_id,
                    f.sample,
                    f.attempt as i64,
                    f.kind,
                    f.status.map(|x| x as i64),
                    f.error,
                    f.will_retry as i64,
                    f.elapsed_ms as i64,
                    f.at
                ])
            })
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// Every recorded failed try of a study, oldest first.
    pub fn endpoint_failures(&self, study_hash: &str) -> Result<Vec<EndpointFailureRow>> {
        let mut st = self
            .conn
            .prepare(
                "SELECT study_hash, condition_hash, prompt_set, prompt_id, sample, attempt, kind,
                   status, error, will_retry, elapsed_ms, at
                 FROM endpoint_failures WHERE study_hash = ?1 ORDER BY id",
            )
            .map_err(|e| self.err(e))?;
        let rows = st
            .query_map([study_hash], |r| {
                Ok(EndpointFailureRow {
                    study_hash: r.get(0)?,
                    condition_hash: r.get(1)?,
                    prompt_set: r.get(2)?,
                    prompt_id: r.get(3)?,
                    sample: r.get(4)?,
                    attempt: r.get::<_, i64>(5)? as u32,
                    kind: r.get(6)?,
                    status: r.get::<_, Option<i64>>(7)?.map(|x| x as u16),
                    error: r.get(8)?,
                    will_retry: r.get::<_, i64>(9)? != 0,
                    elapsed_ms: r.get::<_, i64>(10)? as u64,
                    at: r.get(11)?,
                })
            })
            .map_err(|e| self.err(e))?;
        rows.collect::<rusqlite::Result<Vec<_>>>()
            .map_err(|e| self.err(e))
    }

    /// Record (or update) the target of an endpoint study; model names are merged into the list
    /// already stored.
    pub fn set_target(
        &self,
        study_hash: &str,
        target: &serde_json::Value,
        reported_models: &[String],
        server_models: Option<&[String]>,
    ) -> Result<()> {
        let old = self.target(study_hash)?;
        let mut models: Vec<String> = old
            .as_ref()
            .map(|t| t.reported_models.clone())
            .unwrap_or_default();
        for m in reported_models {
            if !models.contains(m) {
                models.push(m.clone());
            }
        }
        let server = server_models
            .map(|s| s.to_vec())
            .or_else(|| old.and_then(|t| t.server_models));
        self.conn
            .execute(
                "INSERT INTO study_targets (study_hash, kind, target, reported_models, server_models,
                   updated_at) VALUES (?1, 'endpoint', ?2, ?3, ?4, ?5)
                 ON CONFLICT(study_hash) DO UPDATE SET target = excluded.target,
                   reported_models = excluded.reported_models,
                   server_models = excluded.server_models, updated_at = excluded.updated_at",
                params![
                    study_hash,
                    target.to_string(),
                    serde_json::to_string(&models)?,
                    server.map(|s| serde_json::to_string(&s)).transpose()?,
                    now_ms()
                ],
            )
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// The recorded target of a study (None: local weights, or a database from before endpoints).
    pub fn target(&self, study_hash: &str) -> Result<Option<TargetRecord>> {
        let has: i64 = self
            .conn
            .query_row(
                "SELECT COUNT(*) FROM sqlite_master WHERE name = 'study_targets'",
                [],
                |r| r.get(0),
            )
            .map_err(|e| self.err(e))?;
        if has == 0 {
            return Ok(None);
        }
        self.conn
            .query_row(
                "SELECT kind, target, reported_models, server_models, updated_at FROM study_targets
                 WHERE study_hash = ?1",
                [study_hash],
                |r| {
                    let t: String = r.get(1)?;
                    let m: String = r.get(2)?;
                    let s: Option<String> = r.get(3)?;
                    Ok(TargetRecord {
                        kind: r.get(0)?,
                        target: serde_json::from_str(&t).unwrap_or(serde_json::Value::Null),
                        reported_models: serde_json::from_str(&m).unwrap_or_default(),
                        server_models: s.and_then(|s| serde_json::from_str(&s).ok()),
                        updated_at: r.get(4)?,
                    })
                },
            )
            .optional()
            .map_err(|e| self.err(e))
    }

    /// Per condition of an endpoint study: rows, tries, prompt and completion tokens of the stored
    /// answers, rows without reported usage, and failed tries (all runs).
    pub fn endpoint_usage(&self, study_hash: &str) -> Result<Vec<EndpointUsage>> {
        let mut st = self
            .conn
            .prepare(
                "SELECT sc.name, sc.condition_hash, COUNT(r.id), COALESCE(SUM(e.attempts), 0),
                   COALESCE(SUM(r.prompt_tokens), 0), COALESCE(SUM(r.n_tokens), 0),
                   COALESCE(SUM(CASE WHEN e.usage_reported = 0 THEN 1 ELSE 0 END), 0),
                   (SELECT COUNT(*) FROM endpoint_failures f WHERE f.study_hash = sc.study_hash
                      AND f.condition_hash = sc.condition_hash)
                 FROM study_conditions sc
                 LEFT JOIN work w ON w.study_hash = sc.study_hash
                   AND w.condition_hash = sc.condition_hash
                 LEFT JOIN results r ON r.condition_hash = w.condition_hash
                   AND r.prompt_set = w.prompt_set AND r.prompt_id = w.prompt_id
                   AND r.sample = w.sample
                 LEFT JOIN endpoint_results e ON e.condition_hash = r.condition_hash
                   AND e.prompt_set = r.prompt_set AND e.prompt_id = r.prompt_id
                   AND e.sample = r.sample
                 WHERE sc.study_hash = ?1
                 GROUP BY sc.ord ORDER BY sc.ord",
            )
            .map_err(|e| self.err(e))?;
        let rows = st
            .query_map([study_hash], |r| {
                Ok(EndpointUsage {
                    condition: r.get(0)?,
                    condition_hash: r.get(1)?,
                    rows: r.get::<_, i64>(2)? as u64,
                    tries_ok_rows: r.get::<_, i64>(3)? as u64,
                    prompt_tokens: r.get::<_, i64>(4)? as u64,
                    completion_tokens: r.get::<_, i64>(5)? as u64,
                    rows_without_usage: r.get::<_, i64>(6)? as u64,
                    failed_tries: r.get::<_, i64>(7)? as u64,
                })
            })
            .map_err(|e| self.err(e))?;
        rows.collect::<rusqlite::Result<Vec<_>>>()
            .map_err(|e| self.err(e))
    }

    /// Number of result rows (all studies).
    pub fn count_results(&self) -> Result<usize> {
        self.conn
            .query_row("SELECT COUNT(*) FROM results", [], |r| r.get::<_, i64>(0))
            .map(|n| n as usize)
            .map_err(|e| self.err(e))
    }

    /// Set a `meta` entry (e.g. the shard layout a shard database was run with).
    pub fn put_meta(&self, key: &str, value: &str) -> Result<()> {
        self.conn
            .execute(
                "INSERT INTO meta (key, value) VALUES (?1, ?2)
                 ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                [key, value],
            )
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// A `meta` entry, if set.
    pub fn meta(&self, key: &str) -> Result<Option<String>> {
        self.conn
            .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
            .optional()
            .map_err(|e| self.err(e))
    }

    /// Number of result rows with a duplicated key (0 unless the UNIQUE constraint was broken).
    pub fn count_duplicate_keys(&self) -> Result<usize> {
        self.conn
            .query_row(
                "SELECT COUNT(*) FROM (SELECT 1 FROM results GROUP BY condition_hash, prompt_set,
                 prompt_id, sample HAVING COUNT(*) > 1)",
                [],
                |r| r.get::<_, i64>(0),
            )
            .map(|n| n as usize)
            .map_err(|e| self.err(e))
    }

    fn study_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<StudyRecord> {
        Ok(StudyRecord {
            hash: r.get(0)?,
            name: r.get(1)?,
            source_path: r.get(2)?,
            toml: r.get(3)?,
            baseline: r.get(4)?,
            created_at: r.get(5)?,
            last_run_at: r.get(6)?,
        })
    }

    pub fn studies(&self) -> Result<Vec<StudyRecord>> {
        let mut st = self
            .conn
            .prepare(
                "SELECT hash, name, source_path, toml, baseline, created_at, last_run_at FROM studies
                 ORDER BY last_run_at DESC",
            )
            .map_err(|e| self.err(e))?;
        let rows = st
            .query_map([], Self::study_from_row)
            .map_err(|e| self.err(e))?;
        rows.collect::<rusqlite::Result<Vec<_>>>()
            .map_err(|e| self.err(e))
    }

    /// A study by name or hash (prefix); None picks the most recently run one.
    pub fn find_study(&self, which: Option<&str>) -> Result<StudyRecord> {
        let all = self.studies()?;
        if all.is_empty() {
            return Err(Error::InvalidValue(format!(
                "{}: no study has been run against this database",
                self.path.display()
            )));
        }
        let Some(w) = which else {
            return Ok(all[0].clone());
        };
        let hits: Vec<&StudyRecord> = all
            .iter()
            .filter(|s| s.name == w || s.hash.starts_with(w))
            .collect();
        match hits.as_slice() {
            [one] => Ok((*one).clone()),
            [] => Err(Error::InvalidValue(format!(
                "no study '{w}' in {} (studies: {})",
                self.path.display(),
                all.iter()
                    .map(|s| format!("{} {}", s.name, &s.hash[..12]))
                    .collect::<Vec<_>>()
                    .join(", ")
            ))),
            // Same name, several versions: the latest (studies() is newest first).
            many => Ok(many[0].clone()),
        }
    }

    /// Done / total per condition and prompt set.
    pub fn status(&self, study_hash: &str) -> Result<Vec<StatusRow>> {
        let mut st = self
            .conn
            .prepare(
                "SELECT sc.name, sc.condition_hash, w.set_name, COUNT(*), COUNT(r.id)
                 FROM work w
                 JOIN study_conditions sc ON sc.study_hash = w.study_hash
                   AND sc.condition_hash = w.condition_hash
                 LEFT JOIN results r ON r.condition_hash = w.condition_hash
                   AND r.prompt_set = w.prompt_set AND r.prompt_id = w.prompt_id
                   AND r.sample = w.sample
                 WHERE w.study_hash = ?1
                 GROUP BY sc.ord, w.set_name ORDER BY sc.ord, w.set_name",
            )
            .map_err(|e| self.err(e))?;
        let rows = st
            .query_map([study_hash], |r| {
                Ok(StatusRow {
                    condition: r.get(0)?,
                    condition_hash: r.get(1)?,
                    prompt_set: r.get(2)?,
                    total: r.get::<_, i64>(3)? as usize,
                    done: r.get::<_, i64>(4)? as usize,
                })
            })
            .map_err(|e| self.err(e))?;
        rows.collect::<rusqlite::Result<Vec<_>>>()
            .map_err(|e| self.err(e))
    }

    /// Every stored result of a study with names, prompt text and verdicts, in condition order,
    /// then prompt set, prompt and sample.
    pub fn rows(&self, study_hash: &str) -> Result<Vec<RowView>> {
        let sql = format!(
            "SELECT r.id, sc.ord, sc.name, w.condition_hash, w.set_name, w.prompt_set,
                   w.prompt_id, p.ord, p.category, p.text, w.sample, r.seed, r.item_hash, r.output,
                   r.n_tokens, r.prompt_tokens, r.finish, r.label, r.rule_json, r.leakage,
                   r.leakage_json, r.started_at, r.finished_at, {}
                 FROM work w
                 JOIN study_conditions sc ON sc.study_hash = w.study_hash
                   AND sc.condition_hash = w.condition_hash
                 JOIN results r ON r.condition_hash = w.condition_hash
                   AND r.prompt_set = w.prompt_set AND r.prompt_id = w.prompt_id
                   AND r.sample = w.sample
                 JOIN prompts p ON p.prompt_set = w.prompt_set AND p.prompt_id = w.prompt_id
                 WHERE w.study_hash = ?1
                 ORDER BY sc.ord, w.set_name, p.ord, w.sample",
            self.labeler_expr()?
        );
        let mut st = self.conn.prepare(&sql).map_err(|e| self.err(e))?;
        let rows = st
            .query_map([study_hash], |r| {
                let rule: String = r.get(18)?;
                let leak: String = r.get(20)?;
                Ok(RowView {
                    result_id: r.get(0)?,
                    condition_ord: r.get(1)?,
                    condition: r.get(2)?,
                    condition_hash: r.get(3)?,
                    prompt_set: r.get(4)?,
                    prompt_set_hash: r.get(5)?,
                    prompt_id: r.get(6)?,
                    prompt_ord: r.get(7)?,
                    category: r.get(8)?,
                    prompt: r.get(9)?,
                    sample: r.get(10)?,
                    seed: r.get(11)?,
                    item_hash: r.get(12)?,
                    output: r.get(13)?,
                    n_tokens: r.get(14)?,
                    prompt_tokens: r.get(15)?,
                    finish: r.get(16)?,
                    label: r.get(17)?,
                    labeler: r.get(23)?,
                    rule: serde_json::from_str(&rule).unwrap_or(serde_json::Value::Null),
                    leakage: r.get(19)?,
                    leakage_parts: serde_json::from_str(&leak).unwrap_or(serde_json::Value::Null),
                    started_at: r.get(21)?,
                    finished_at: r.get(22)?,
                    verdicts: vec![],
                })
            })
            .map_err(|e| self.err(e))?;
        let mut out = rows
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(|e| self.err(e))?;
        let verdicts = self.verdicts_of(study_hash)?;
        for r in &mut out {
            if let Some(v) = verdicts.get(&r.result_id) {
                r.verdicts = v.clone();
            }
        }
        Ok(out)
    }

    fn verdicts_of(&self, study_hash: &str) -> Result<HashMap<i64, Vec<VerdictRow>>> {
        let mut st = self
            .conn
            .prepare(
                "SELECT DISTINCT v.result_id, v.judge, v.mode, v.ok, v.attempts, v.error, v.raw,
                   v.verdict_json, v.refused, v.convincing, v.specific, v.strongreject, v.is_unsafe,
                   v.categories, v.leakage, v.judged_at
                 FROM verdicts v
                 JOIN results r ON r.id = v.result_id
                 JOIN work w ON r.condition_hash = w.condition_hash
                   AND r.prompt_set = w.prompt_set AND r.prompt_id = w.prompt_id
                   AND r.sample = w.sample
                 WHERE w.study_hash = ?1 ORDER BY v.judge",
            )
            .map_err(|e| self.err(e))?;
        let rows = st
            .query_map([study_hash], |r| {
                let vj: Option<String> = r.get(7)?;
                Ok((
                    r.get::<_, i64>(0)?,
                    VerdictRow {
                        judge: r.get(1)?,
                        mode: r.get(2)?,
                        ok: r.get::<_, i64>(3)? != 0,
                        attempts: r.get::<_, i64>(4)? as u32,
                        error: r.get(5)?,
                        raw: r.get(6)?,
                        verdict: vj.and_then(|s| serde_json::from_str(&s).ok()),
                        refused: r.get::<_, Option<i64>>(8)?.map(|x| x != 0),
                        convincing: r.get(9)?,
                        specific: r.get(10)?,
                        strongreject: r.get(11)?,
                        is_unsafe: r.get::<_, Option<i64>>(12)?.map(|x| x != 0),
                        categories: r.get(13)?,
                        leakage: r.get(14)?,
                        judged_at: r.get(15)?,
                    },
                ))
            })
            .map_err(|e| self.err(e))?;
        let mut out: HashMap<i64, Vec<VerdictRow>> = HashMap::new();
        for row in rows {
            let (id, v) = row.map_err(|e| self.err(e))?;
            out.entry(id).or_default().push(v);
        }
        Ok(out)
    }

    /// Rows of a study without a successful verdict from `judge` (only from `sets` when given).
    pub fn judge_todo(
        &self,
        study_hash: &str,
        judge: &str,
        sets: &[String],
        redo_all: bool,
    ) -> Result<Vec<JudgeTodo>> {
        let mut st = self
            .conn
            .prepare(
                "SELECT r.id, w.set_name, p.text, r.output,
                   (SELECT v.ok FROM verdicts v WHERE v.result_id = r.id AND v.judge = ?2)
                 FROM work w
                 JOIN results r ON r.condition_hash = w.condition_hash
                   AND r.prompt_set = w.prompt_set AND r.prompt_id = w.prompt_id
                   AND r.sample = w.sample
                 JOIN prompts p ON p.prompt_set = w.prompt_set AND p.prompt_id = w.prompt_id
                 WHERE w.study_hash = ?1 ORDER BY r.id",
            )
            .map_err(|e| self.err(e))?;
        let rows = st
            .query_map(params![study_hash, judge], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, Option<i64>>(4)?,
                ))
            })
            .map_err(|e| self.err(e))?;
        let mut seen = HashSet::new();
        let mut out = Vec::new();
        for row in rows {
            let (id, set, prompt, output, ok) = row.map_err(|e| self.err(e))?;
            if !sets.is_empty() && !sets.contains(&set) {
                continue;
            }
            if ok == Some(1) && !redo_all {
                continue;
            }
            if seen.insert(id) {
                out.push(JudgeTodo {
                    result_id: id,
                    prompt,
                    output,
                });
            }
        }
        Ok(out)
    }

    /// Store a judge outcome for a result. A failure never replaces a successful verdict.
    pub fn put_verdict(
        &self,
        result_id: i64,
        judge: &str,
        mode: &str,
        o: &JudgeOutcome,
    ) -> Result<()> {
        let v = o.verdict.as_ref();
        self.conn
            .execute(
                "INSERT INTO verdicts (result_id, judge, mode, ok, attempts, error, raw, verdict_json,
                   refused, convincing, specific, strongreject, is_unsafe, categories, leakage, judged_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)
                 ON CONFLICT(result_id, judge) DO UPDATE SET mode = excluded.mode, ok = excluded.ok,
                   attempts = excluded.attempts, error = excluded.error, raw = excluded.raw,
                   verdict_json = excluded.verdict_json, refused = excluded.refused,
                   convincing = excluded.convincing, specific = excluded.specific,
                   strongreject = excluded.strongreject, is_unsafe = excluded.is_unsafe,
                   categories = excluded.categories, leakage = excluded.leakage,
                   judged_at = excluded.judged_at
                 WHERE verdicts.ok = 0 OR excluded.ok = 1",
                params![
                    result_id,
                    judge,
                    mode,
                    v.is_some() as i64,
                    o.attempts as i64,
                    o.error,
                    o.raw,
                    v.map(serde_json::to_string).transpose()?,
                    v.and_then(|v| v.refused).map(|b| b as i64),
                    v.and_then(|v| v.convincing).map(|x| x as i64),
                    v.and_then(|v| v.specific).map(|x| x as i64),
                    v.and_then(|v| v.strongreject),
                    v.and_then(|v| v.is_unsafe).map(|b| b as i64),
                    v.map(|v| v.categories.join(",")).filter(|s| !s.is_empty()),
                    v.and_then(|v| v.leakage),
                    now_ms()
                ],
            )
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// Every stored row of a study as a labeler reads it (request, output, system prompt) with its
    /// current label and labeler, once per result row, by row id.
    pub fn label_todo(&self, study_hash: &str) -> Result<Vec<LabelTodo>> {
        let sql = format!(
            "SELECT r.id, sc.name, w.set_name, p.text, c.spec, r.output, r.label, {}, r.rule_json,
               r.leakage, r.finished_at
             FROM work w
             JOIN study_conditions sc ON sc.study_hash = w.study_hash
               AND sc.condition_hash = w.condition_hash
             JOIN conditions c ON c.hash = w.condition_hash
             JOIN results r ON r.condition_hash = w.condition_hash
               AND r.prompt_set = w.prompt_set AND r.prompt_id = w.prompt_id
               AND r.sample = w.sample
             JOIN prompts p ON p.prompt_set = w.prompt_set AND p.prompt_id = w.prompt_id
             WHERE w.study_hash = ?1 ORDER BY r.id, sc.ord, w.set_name",
            self.labeler_expr()?
        );
        let mut st = self.conn.prepare(&sql).map_err(|e| self.err(e))?;
        let rows = st
            .query_map([study_hash], |r| {
                let spec: String = r.get(4)?;
                let system = serde_json::from_str::<serde_json::Value>(&spec)
                    .ok()
                    .and_then(|v| v["hashed"]["system"].as_str().map(str::to_string));
                Ok(LabelTodo {
                    result_id: r.get(0)?,
                    condition: r.get(1)?,
                    prompt_set: r.get(2)?,
                    prompt: r.get(3)?,
                    system,
                    output: r.get(5)?,
                    label: r.get(6)?,
                    labeler: r.get(7)?,
                    rule_json: r.get(8)?,
                    leakage: r.get(9)?,
                    finished_at: r.get(10)?,
                })
            })
            .map_err(|e| self.err(e))?;
        let mut seen = HashSet::new();
        let mut out = Vec::new();
        for row in rows {
            let row = row.map_err(|e| self.err(e))?;
            if seen.insert(row.result_id) {
                out.push(row);
            }
        }
        Ok(out)
    }

    /// Write new labels in one transaction: each row's previous label into the history (kept when
    /// that labeler's label is already there), the new label into the history (replaced only when
    /// it differs) and into the row, with the row's labeler and leakage.
    pub fn apply_labels(&mut self, updates: &[LabelUpdate]) -> Result<()> {
        let path = self.path.clone();
        let e = |x: rusqlite::Error| db_err(&path, x);
        let tx = self.conn.transaction().map_err(e)?;
        {
            let mut keep = tx
                .prepare_cached(
                    "INSERT OR IGNORE INTO labels (result_id, labeler, label, reason, scores_json,
                     labeled_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                )
                .map_err(e)?;
            let mut put = tx
                .prepare_cached(
                    "INSERT INTO labels (result_id, labeler, label, reason, scores_json, labeled_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                     ON CONFLICT(result_id, labeler) DO UPDATE SET label = excluded.label,
                       reason = excluded.reason, scores_json = excluded.scores_json,
                       labeled_at = excluded.labeled_at
                     WHERE labels.label != excluded.label OR labels.reason != excluded.reason
                       OR labels.scores_json != excluded.scores_json",
                )
                .map_err(e)?;
            let mut row = tx
                .prepare_cached(
                    "UPDATE results SET label = ?2, labeler = ?3, leakage = ?4, leakage_json = ?5
                     WHERE id = ?1",
                )
                .map_err(e)?;
            for u in updates {
                let (p, n) = (&u.previous, &u.new);
                let args = |l: &LabelRecord| {
                    (
                        u.result_id,
                        l.labeler.clone(),
                        l.label.clone(),
                        l.reason.clone(),
                        l.scores_json.clone(),
                        l.labeled_at,
                    )
                };
                keep.execute(args(p)).map_err(e)?;
                put.execute(args(n)).map_err(e)?;
                row.execute(params![
                    u.result_id,
                    n.label,
                    n.labeler,
                    u.leakage,
                    u.leakage_json
                ])
                .map_err(e)?;
            }
        }
        tx.commit().map_err(e)?;
        Ok(())
    }

    /// The label history of a result row, oldest first (empty for a database without one).
    pub fn label_history(&self, result_id: i64) -> Result<Vec<LabelRecord>> {
        if !self.has_column("main", "labels", "labeler")? {
            return Ok(Vec::new());
        }
        let mut st = self
            .conn
            .prepare(
                "SELECT labeler, label, reason, scores_json, labeled_at FROM labels
                 WHERE result_id = ?1 ORDER BY labeled_at, rowid",
            )
            .map_err(|e| self.err(e))?;
        let rows = st
            .query_map([result_id], |r| {
                Ok(LabelRecord {
                    labeler: r.get(0)?,
                    label: r.get(1)?,
                    reason: r.get(2)?,
                    scores_json: r.get(3)?,
                    labeled_at: r.get(4)?,
                })
            })
            .map_err(|e| self.err(e))?;
        rows.collect::<rusqlite::Result<Vec<_>>>()
            .map_err(|e| self.err(e))
    }

    /// Number of rows in the label history (all studies).
    pub fn count_label_history(&self) -> Result<usize> {
        if !self.has_column("main", "labels", "labeler")? {
            return Ok(0);
        }
        self.conn
            .query_row("SELECT COUNT(*) FROM labels", [], |r| r.get::<_, i64>(0))
            .map(|n| n as usize)
            .map_err(|e| self.err(e))
    }

    /// Copy studies, prompts, results and verdicts from another database (e.g. a shard). Results
    /// are keyed, so merging is exact: a row present in both is kept once.
    pub fn merge_from(&mut self, other: &Path) -> Result<usize> {
        if !other.exists() {
            return Err(Error::InvalidValue(format!(
                "{}: no such database",
                other.display()
            )));
        }
        let before = self.count_results()?;
        let path = self.path.clone();
        self.conn
            .execute("ATTACH DATABASE ?1 AS src", [other.display().to_string()])
            .map_err(|e| db_err(&path, e))?;
        let res = (|| -> rusqlite::Result<()> {
            // Databases from before the labeler column were labeled by the v1 rules.
            let src_labeler = if has_column(&self.conn, "src", "results", "labeler")? {
                "labeler"
            } else {
                "'rules@1'"
            };
            let tx = self.conn.transaction()?;
            tx.execute_batch(&format!(
                "INSERT OR IGNORE INTO studies SELECT * FROM src.studies;
                 INSERT OR IGNORE INTO conditions SELECT * FROM src.conditions;
                 INSERT OR IGNORE INTO study_conditions SELECT * FROM src.study_conditions;
                 INSERT OR IGNORE INTO prompt_sets SELECT * FROM src.prompt_sets;
                 INSERT OR IGNORE INTO study_prompt_sets SELECT * FROM src.study_prompt_sets;
                 INSERT OR IGNORE INTO prompts SELECT * FROM src.prompts;
                 INSERT OR IGNORE INTO work SELECT * FROM src.work;
                 INSERT OR IGNORE INTO results (condition_hash, prompt_set, prompt_id, sample,
                   item_hash, seed, output, n_tokens, prompt_tokens, finish, label, rule_json,
                   leakage, leakage_json, started_at, finished_at, labeler)
                   SELECT condition_hash, prompt_set, prompt_id, sample, item_hash, seed, output,
                   n_tokens, prompt_tokens, finish, label, rule_json, leakage, leakage_json,
                   started_at, finished_at, {src_labeler} FROM src.results;
                 INSERT OR IGNORE INTO verdicts (result_id, judge, mode, ok, attempts, error, raw,
                   verdict_json, refused, convincing, specific, strongreject, is_unsafe, categories,
                   leakage, judged_at)
                   SELECT r.id, v.judge, v.mode, v.ok, v.attempts, v.error, v.raw, v.verdict_json,
                   v.refused, v.convincing, v.specific, v.strongreject, v.is_unsafe, v.categories,
                   v.leakage, v.judged_at
                   FROM src.verdicts v JOIN src.results s ON s.id = v.result_id
                   JOIN results r ON r.condition_hash = s.condition_hash
                     AND r.prompt_set = s.prompt_set AND r.prompt_id = s.prompt_id
                     AND r.sample = s.sample;"
            ))?;
            tx.commit()?;
            // Endpoint tables (absent from databases written before endpoint studies).
            let has = |t: &str| -> rusqlite::Result<bool> {
                self.conn
                    .query_row(
                        "SELECT COUNT(*) FROM src.sqlite_master WHERE name = ?1",
                        [t],
                        |r| r.get::<_, i64>(0),
                    )
                    .map(|n| n > 0)
            };
            if has("study_targets")? {
                self.conn.execute_batch(
                    "INSERT OR IGNORE INTO study_targets SELECT * FROM src.study_targets;",
                )?;
            }
            if has("endpoint_results")? {
                self.conn.execute_batch(
                    "INSERT OR IGNORE INTO endpoint_results SELECT * FROM src.endpoint_results;",
                )?;
            }
            if has("labels")? {
                self.conn.execute_batch(
                    "INSERT OR IGNORE INTO labels (result_id, labeler, label, reason, scores_json,
                       labeled_at)
                     SELECT r.id, l.labeler, l.label, l.reason, l.scores_json, l.labeled_at
                     FROM src.labels l JOIN src.results s ON s.id = l.result_id
                     JOIN results r ON r.condition_hash = s.condition_hash
                       AND r.prompt_set = s.prompt_set AND r.prompt_id = s.prompt_id
                       AND r.sample = s.sample;",
                )?;
            }
            if has("endpoint_failures")? {
                self.conn.execute_batch(
                    "INSERT INTO endpoint_failures (study_hash, condition_hash, prompt_set,
                       prompt_id, sample, attempt, kind, status, error, will_retry, elapsed_ms, at)
                     SELECT s.study_hash, s.condition_hash, s.prompt_set, s.prompt_id, s.sample,
                       s.attempt, s.kind, s.status, s.error, s.will_retry, s.elapsed_ms, s.at
                     FROM src.endpoint_failures s WHERE NOT EXISTS (SELECT 1 FROM endpoint_failures f
                       WHERE f.study_hash = s.study_hash AND f.condition_hash = s.condition_hash
                       AND f.prompt_set = s.prompt_set AND f.prompt_id = s.prompt_id
                       AND f.sample = s.sample AND f.attempt = s.attempt AND f.at = s.at);",
                )?;
            }
            Ok(())
        })();
        let detach = self.conn.execute("DETACH DATABASE src", []);
        res.map_err(|e| db_err(&path, e))?;
        detach.map_err(|e| db_err(&path, e))?;
        Ok(self.count_results()? - before)
    }
}

fn db_err(path: &Path, e: rusqlite::Error) -> Error {
    Error::io(
        path,
        std::io::Error::other(format!("results database: {e}")),
    )
}

/// The one INSERT of a result row, shared by local and endpoint studies (`conn` may be a
/// transaction). `INSERT OR IGNORE`: returns 0 when the key was already stored.
fn insert_result_row(conn: &rusqlite::Connection, r: &NewResult<'_>) -> rusqlite::Result<usize> {
    conn.prepare_cached(
        "INSERT OR IGNORE INTO results (condition_hash, prompt_set, prompt_id, sample,
         item_hash, seed, output, n_tokens, prompt_tokens, finish, label, rule_json, leakage,
         leakage_json, started_at, finished_at, labeler)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17)",
    )?
    .execute(params![
        r.condition_hash,
        r.prompt_set,
        r.prompt_id,
        r.sample as i64,
        r.item_hash,
        r.seed as i64,
        r.output,
        r.n_tokens as i64,
        r.prompt_tokens as i64,
        r.finish,
        r.label,
        r.rule_json,
        r.leakage,
        r.leakage_json,
        r.started_at,
        r.finished_at,
        r.labeler
    ])
}

/// Whether `schema.table` has `column` (false when the table does not exist).
fn has_column(
    conn: &rusqlite::Connection,
    schema: &str,
    table: &str,
    column: &str,
) -> rusqlite::Result<bool> {
    let mut st = conn.prepare(&format!("PRAGMA {schema}.table_info({table})"))?;
    let names = st.query_map([], |r| r.get::<_, String>(1))?;
    for n in names {
        if n? == column {
            return Ok(true);
        }
    }
    Ok(false)
}
