//! Projections of a prompt's last-token residual on the persona and refusal directions, averaged
//! over windows of layers: what every response reports, and what runtime drift watches. Its own
//! module so the engine, the drift monitor and the metrics can all read it without importing each
//! other.

use persona_gate::Result;
use serde::Serialize;

use crate::guard::{dot, unit};

/// Mean projection of the prompt's last-token residual over a window of layers.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct WindowProjection {
    pub layers: String,
    /// On the persona (compliant) direction.
    pub persona: Option<f64>,
    /// On the refusal direction.
    pub refusal: Option<f64>,
}

/// Per-layer unit directions for the response's projections, and the layer windows.
#[derive(Debug, Clone, Default)]
pub struct Projector {
    pub persona: Option<Vec<Vec<f32>>>,
    pub refusal: Option<Vec<Vec<f32>>>,
    /// (label, layers)
    pub windows: Vec<(String, Vec<usize>)>,
}

impl Projector {
    /// Windows of `size` consecutive layers over `n_layers`; direction sets as unit rows.
    pub fn new(
        n_layers: usize,
        size: usize,
        persona: Option<&persona_gate::directions::DirectionSet>,
        refusal: Option<&persona_gate::directions::DirectionSet>,
    ) -> Result<Self> {
        let rows = |s: &persona_gate::directions::DirectionSet| -> Result<Vec<Vec<f32>>> {
            (0..n_layers)
                .map(|l| {
                    let r = if s.n_layers() == 1 { 0 } else { l };
                    Ok(unit(s.layer(r)?))
                })
                .collect()
        };
        let size = size.max(1);
        let windows = (0..n_layers)
            .step_by(size)
            .map(|a| {
                let b = (a + size).min(n_layers) - 1;
                let label = if a == b {
                    a.to_string()
                } else {
                    format!("{a}-{b}")
                };
                (label, (a..=b).collect())
            })
            .collect();
        Ok(Self {
            persona: persona.map(rows).transpose()?,
            refusal: refusal.map(rows).transpose()?,
            windows,
        })
    }

    pub fn is_empty(&self) -> bool {
        self.persona.is_none() && self.refusal.is_none()
    }

    pub fn layers(&self) -> Vec<usize> {
        if self.is_empty() {
            Vec::new()
        } else {
            self.windows.iter().flat_map(|w| w.1.clone()).collect()
        }
    }

    pub fn project(&self, caps: &[Option<Vec<f32>>]) -> Vec<WindowProjection> {
        if self.is_empty() {
            return Vec::new();
        }
        let mean = |units: &Option<Vec<Vec<f32>>>, layers: &[usize]| -> Option<f64> {
            let units = units.as_ref()?;
            let v: Vec<f64> = layers
                .iter()
                .filter_map(|&l| Some(dot(caps.get(l)?.as_ref()?, units.get(l)?)))
                .collect();
            (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
        };
        self.windows
            .iter()
            .map(|(label, layers)| WindowProjection {
                layers: label.clone(),
                persona: mean(&self.persona, layers),
                refusal: mean(&self.refusal, layers),
            })
            .collect()
    }
}
