//! Last-token residuals through the stepping engine: the guard's calibration and evaluation, and
//! any caller that reads a prompt's state without generating.

use std::sync::Arc;

use super::engine::{Engine, EngineConfig, EngineEvent, LastToken, SeqSpec};
use crate::intervene::CompiledPlan;
use crate::model::Decoder;
use crate::{Error, Result};

/// Residuals at each prompt's last token at `layers`, under an optional plan: `out[prompt][layer]`
/// is `Some(vec)` for the layers asked for. Prompts are prefilled `batch` at a time (left-padded,
/// like generation's prefill) and no token is generated; `progress(done, total)` after each one.
pub fn capture_last(
    model: &Decoder,
    prompts: &[Vec<u32>],
    plan: Option<&Arc<CompiledPlan>>,
    layers: &[usize],
    batch: usize,
    mut progress: impl FnMut(usize, usize),
) -> Result<Vec<LastToken>> {
    if let Some(&l) = layers.iter().find(|&&l| l >= model.n_layers()) {
        return Err(Error::LayerOutOfRange {
            layer: l,
            n_layers: model.n_layers(),
        });
    }
    let mut engine = Engine::new(model, EngineConfig::batch(batch));
    for p in prompts {
        if p.is_empty() {
            return Err(Error::Empty("a prompt to capture has no tokens".into()));
        }
        engine.submit(SeqSpec {
            plan: plan.cloned(),
            capture_layers: layers.to_vec(),
            ..SeqSpec::new(p.clone(), 0)
        });
    }
    let mut out: Vec<Option<LastToken>> = vec![None; prompts.len()];
    let mut done = 0;
    while !engine.is_idle() {
        for ev in engine.step(None) {
            match ev {
                EngineEvent::Prefilled { id, captures, .. } => {
                    out[id] = Some(captures);
                    done += 1;
                    progress(done, prompts.len());
                }
                EngineEvent::Failed { id, error } => {
                    return Err(Error::Generation(format!("prompt {id}: {error}")))
                }
                _ => {}
            }
        }
    }
    out.into_iter()
        .enumerate()
        .map(|(i, c)| c.ok_or_else(|| Error::InvalidValue(format!("prompt {i} was not captured"))))
        .collect()
}
