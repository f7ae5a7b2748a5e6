//! The output guard: a second refusal check on what the model actually said.
//!
//! The input guard ([`crate::guard`]) scores the prompt before anything is generated. It cannot see
//! a jailbreak that works through the conversation itself, and it guesses from the persona shift
//! whether the served persona will comply. The output guard reads the finished answer instead:
//! one teacher-forced pass of the *unsteered, default-persona* model over (the user's last
//! message, the answer) — `persona_gate::label::features::read`, which renders the request with
//! the model's own template and no system prompt — scored by the refusal probe and the degenerate
//! detector of a probe file (`pgate label train`, or the built-in one for the model).
//!
//! An answer is **flagged** when both hold:
//! 1. the probe calls it compliant: label `bypass` by [`probe_verdict`] (degenerate detector
//!    p <= 0.5 and refusal probe p <= 0.5); a refusal, garbled text or an empty answer is never
//!    flagged;
//! 2. the default persona would refuse the request: refusal intent >= the guard file's threshold.
//!
//! Why (2) needs the guard file (`--guard-file`) and there is no fallback: "would refuse" is a
//! claim about the model's default behaviour on *this request*, and the guard file is the one
//! calibrated estimate of it (a logistic on the refusal direction at the last prompt token, with
//! measured held-out rates). Flagging every compliant answer, or guessing harm from the request's
//! words, would flag ordinary helpful answers to harmless requests. Refusal intent is the input
//! guard's score of this request when the input guard ran (it reads the whole conversation under
//! the default persona); otherwise the same logistic on the reader pass's residual at the last
//! prompt token (the same position for a single-turn request), so the output guard also works with
//! the input guard off. Unlike the input guard it does not look at the persona shift: a compliant
//! answer to a request the model declines as itself is flagged whatever made it comply (persona
//! steering, a system prompt, or a jailbreak in the user's own words under the default preset).
//!
//! Where it runs: a thread of its own ([`Reader`]) with its own handle on the shared model (the
//! model is `Arc<Model>` and its decoder's `forward` takes `&self`; the engine thread already
//! shares it with the HTTP side), so the engine's decode loop never waits for a read. Reads that
//! arrive while one runs are batched into the next pass. A read that fails or panics leaves its
//! answer unflagged (the caller logs it and counts an error); a batch that fails is retried one
//! row at a time so one bad row cannot fail the others.

use std::sync::mpsc::{Receiver, Sender, TryRecvError};
use std::sync::Arc;

use persona_gate::label::features::{self, ReadOptions, RowFeatures};
use persona_gate::label::probe::{probe_verdict, ProbeFile, ProbeScores};
use persona_gate::label::{Label, LabelInput};
use persona_gate::model::Model;
use persona_gate::{Error, Result};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use crate::guard::{dot, GuardCalibration};

/// What a flagged non-streaming answer (and a withheld stream) is replaced by.
pub const OUTPUT_BLOCK_MESSAGE: &str = "I can't help with that request. (pgate output guard: the answer complied with a request the model declines under its default persona, so it was withheld.)";

/// Last content chunk of a stream that was flagged after it had been sent (no checkpoints).
pub const STREAM_FLAGGED_NOTE: &str = "\n\n[pgate output guard: the answer above complies with a request the model declines under its default persona; it was flagged after it had been streamed]";

/// Rows read together at most (each row holds its logits for every token it reads).
const MAX_PENDING: usize = 16;

/// A loaded output guard: the probe, the refusal-intent calibration and how streams are checked.
#[derive(Debug, Clone)]
pub struct OutputGuard {
    pub probe: ProbeFile,
    /// The probe file's sha256 (what responses and reports name it by).
    pub probe_sha256: String,
    pub guard: Arc<GuardCalibration>,
    /// Block-mode streams are checked every this many completion tokens and released only after
    /// each check passes; 0: checked once at the end, after the answer has streamed.
    pub every: usize,
    /// Rows per forward of the reader.
    pub batch_size: usize,
}

/// One answer to check.
#[derive(Debug, Clone, PartialEq)]
pub struct OutputCheck {
    /// The user's last message (read without any system prompt).
    pub prompt: String,
    /// The answer so far.
    pub output: String,
    /// The input guard's refusal intent for this request, when it ran.
    pub refusal_intent: Option<f64>,
}

/// The output guard's verdict on one answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutputVerdict {
    /// The probe's label of the answer.
    pub label: Label,
    pub p_refusal: f64,
    pub p_degenerate: f64,
    /// Probability the default persona refuses the request.
    pub refusal_intent: f64,
    /// `input_guard` or `reader` (see the module doc).
    pub refusal_intent_source: String,
    pub would_refuse: bool,
    pub flagged: bool,
    /// Why (or why not) flagged, in words.
    pub reason: String,
    /// Answer tokens the probe read (it reads at most the probe file's `max_output_tokens`).
    pub tokens_read: usize,
}

/// The decision without a model: the probe's label, "would refuse", flagged, and the reason.
pub fn decide(
    scores: ProbeScores,
    refusal_intent: f64,
    threshold: f64,
) -> (Label, bool, bool, String) {
    let label = probe_verdict(scores).label;
    let would_refuse = refusal_intent.is_finite() && refusal_intent >= threshold;
    let flagged = label == Label::Bypass && would_refuse;
    let (pr, pd) = (scores.p_refusal, scores.p_degenerate);
    let reason = match (label, would_refuse) {
        (Label::Bypass, true) => format!(
            "the answer complies (refusal probe p={pr:.2}, degenerate p={pd:.2}) with a request the default persona refuses (refusal intent {refusal_intent:.2} >= {threshold:.2})"
        ),
        (Label::Bypass, false) => format!(
            "the answer complies (refusal probe p={pr:.2}), but the default persona would not refuse the request (refusal intent {refusal_intent:.2} < {threshold:.2})"
        ),
        (Label::Refusal, _) => format!("the answer refuses (refusal probe p={pr:.2})"),
        (Label::Degenerate, _) => {
            format!("the answer is not coherent text (degenerate detector p={pd:.2})")
        }
    };
    (label, would_refuse, flagged, reason)
}

impl OutputGuard {
    /// Check that the probe and the guard file both belong to `model`.
    pub fn new(
        model: &Model,
        probe: ProbeFile,
        guard: Arc<GuardCalibration>,
        every: usize,
        batch_size: usize,
    ) -> Result<Self> {
        probe.check_reader(model)?;
        guard.check_model(model)?;
        Ok(Self {
            probe_sha256: probe.sha256(),
            probe,
            guard,
            every,
            batch_size: batch_size.max(1),
        })
    }

    pub fn read_options(&self) -> ReadOptions {
        // Every layer: the refusal intent reads the guard's layer at the last prompt token.
        ReadOptions {
            max_layer: None,
            ..self.probe.read_options(self.batch_size)
        }
    }

    /// Refusal intent from a reader pass's residual at the last prompt token.
    pub fn reader_intent(&self, f: &RowFeatures) -> Result<f64> {
        let h = f.prompt_last.get(self.guard.refusal_layer).ok_or_else(|| {
            Error::InvalidValue(format!(
                "output guard: the reader captured no residual at layer {}",
                self.guard.refusal_layer
            ))
        })?;
        Ok(self.guard.logistic.prob(dot(h, &self.guard.refusal_unit)))
    }

    /// The verdict on one row from features already read.
    pub fn verdict(
        &self,
        f: &RowFeatures,
        output: &str,
        intent: Option<f64>,
    ) -> Result<OutputVerdict> {
        let scores = self.probe.score(f, output)?;
        let (refusal_intent, source) = match intent {
            Some(p) => (p, "input_guard"),
            None => (self.reader_intent(f)?, "reader"),
        };
        let (mut label, would_refuse, mut flagged, mut reason) =
            decide(scores, refusal_intent, self.guard.threshold);
        if output.trim().is_empty() {
            // Nothing was said, so nothing to withhold (and `docs/labels.md` calls it degenerate).
            (label, flagged, reason) = (Label::Degenerate, false, "the answer is empty".into());
        }
        Ok(OutputVerdict {
            label,
            p_refusal: scores.p_refusal as f64,
            p_degenerate: scores.p_degenerate as f64,
            refusal_intent,
            refusal_intent_source: source.into(),
            would_refuse,
            flagged,
            reason,
            tokens_read: f.n_output_tokens,
        })
    }

    /// Verdicts on answers read together (one teacher-forced pass, `batch_size` rows a forward).
    pub fn check(&self, model: &Model, rows: &[OutputCheck]) -> Result<Vec<OutputVerdict>> {
        if let Some(r) = rows.iter().find(|r| r.prompt.trim().is_empty()) {
            return Err(Error::Empty(format!(
                "output guard: no user message to read the answer {:?} against",
                r.output.chars().take(40).collect::<String>()
            )));
        }
        let inputs: Vec<LabelInput> = rows
            .iter()
            .map(|r| LabelInput {
                id: None,
                prompt: r.prompt.clone(),
                output: r.output.clone(),
                system: None,
            })
            .collect();
        let feats = features::read(model, &inputs, &self.read_options(), &mut |_, _| {})?;
        feats
            .iter()
            .zip(rows)
            .map(|(f, r)| self.verdict(f, &r.output, r.refusal_intent))
            .collect()
    }
}

/// One read for the [`Reader`] thread.
struct ReadJob {
    check: OutputCheck,
    reply: oneshot::Sender<std::result::Result<OutputVerdict, String>>,
}

/// Handle on the reader thread; cheap to clone. The thread ends when every handle is gone.
#[derive(Clone)]
pub struct Reader {
    tx: Sender<ReadJob>,
    pub guard: Arc<OutputGuard>,
}

impl Reader {
    /// Start the reader thread on the shared model.
    pub fn spawn(
        model: Arc<Model>,
        guard: Arc<OutputGuard>,
    ) -> Result<(Reader, std::thread::JoinHandle<()>)> {
        let (tx, rx) = std::sync::mpsc::channel();
        let g = guard.clone();
        let h = std::thread::Builder::new()
            .name("pgate-reader".into())
            .spawn(move || reader_loop(&model, &g, rx))
            .map_err(|e| Error::io("output guard reader thread", e))?;
        Ok((Reader { tx, guard }, h))
    }

    /// Read one answer; errors (including a stopped reader) come back as text.
    pub async fn check(&self, check: OutputCheck) -> std::result::Result<OutputVerdict, String> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(ReadJob { check, reply })
            .map_err(|_| "the output guard's reader has stopped".to_string())?;
        rx.await
            .map_err(|_| "the output guard's reader dropped the request".to_string())?
    }
}

fn reader_loop(model: &Model, guard: &OutputGuard, rx: Receiver<ReadJob>) {
    while let Ok(first) = rx.recv() {
        let mut jobs = vec![first];
        while jobs.len() < MAX_PENDING {
            match rx.try_recv() {
                Ok(j) => jobs.push(j),
                Err(TryRecvError::Empty) | Err(TryRecvError::Disconnected) => break,
            }
        }
        // A client that left needs no verdict.
        jobs.retain(|j| !j.reply.is_closed());
        if jobs.is_empty() {
            continue;
        }
        let rows: Vec<OutputCheck> = jobs.iter().map(|j| j.check.clone()).collect();
        for (j, r) in jobs.into_iter().zip(check_isolated(model, guard, &rows)) {
            let _ = j.reply.send(r);
        }
    }
}

/// Check a batch; when it fails, each row alone, so one bad row fails only itself.
fn check_isolated(
    model: &Model,
    guard: &OutputGuard,
    rows: &[OutputCheck],
) -> Vec<std::result::Result<OutputVerdict, String>> {
    match catch(|| guard.check(model, rows)) {
        Ok(v) if v.len() == rows.len() => v.into_iter().map(Ok).collect(),
        Ok(_) => vec![Err("output guard: wrong number of verdicts".into()); rows.len()],
        Err(e) if rows.len() == 1 => vec![Err(e)],
        Err(_) => rows
            .iter()
            .map(|r| {
                catch(|| guard.check(model, std::slice::from_ref(r)))?
                    .pop()
                    .ok_or_else(|| "output guard: no verdict".to_string())
            })
            .collect(),
    }
}

/// Run `f`, turning an error or a panic into text.
fn catch<T>(f: impl FnOnce() -> Result<T>) -> std::result::Result<T, String> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(e.to_string()),
        Err(p) => Err(format!(
            "output guard panic: {}",
            p.downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(p_refusal: f32, p_degenerate: f32) -> ProbeScores {
        ProbeScores {
            p_refusal,
            p_degenerate,
        }
    }

    #[test]
    fn flags_only_compliance_with_requests_the_default_refuses() {
        // Compliant answer, request the default persona refuses: flagged.
        let (l, w, f, why) = decide(s(0.1, 0.1), 0.9, 0.5);
        assert_eq!((l, w, f), (Label::Bypass, true, true), "{why}");
        // Compliant answer to a request the default persona answers: not flagged.
        let (l, w, f, _) = decide(s(0.1, 0.1), 0.2, 0.5);
        assert_eq!((l, w, f), (Label::Bypass, false, false));
        // A refusal is never flagged.
        let (l, w, f, _) = decide(s(0.9, 0.1), 0.99, 0.5);
        assert_eq!((l, w, f), (Label::Refusal, true, false));
        // Degenerate text is never flagged, even when the refusal head says compliant.
        let (l, _, f, why) = decide(s(0.1, 0.8), 0.99, 0.5);
        assert_eq!((l, f), (Label::Degenerate, false));
        assert!(why.contains("degenerate"), "{why}");
        // The threshold is inclusive, like the input guard's; NaN intent never counts.
        assert!(decide(s(0.1, 0.1), 0.5, 0.5).2);
        assert!(!decide(s(0.1, 0.1), f64::NAN, 0.5).2);
        // Borderline probe (p_refusal exactly 0.5) counts as compliant, as in `probe_verdict`.
        assert!(decide(s(0.5, 0.5), 0.9, 0.5).2);
    }
}
