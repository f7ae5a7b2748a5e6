//! `InterventionPlan`: what to do to the residual stream, as data.
//!
//! A plan is an ordered list of operations, each on a set of layers and a kind of position:
//! - `add`: `h + coeff * u` (u the unit direction; `raw` adds `coeff * v` with v as given),
//! - `ablate`: `h - (h . u) u`, the directional ablation of Arditi et al.,
//! - `cap`: clamp `h . u` into `[lo, hi]`, as in activation capping along an assistant axis.
//!
//! Operations at the same layer apply in the order written. A plan is compiled once per model
//! ([`CompiledPlan`]: checked widths and layers, vectors on the device) and then shared by any
//! number of sequences; each sequence of a batch may carry its own plan.

use std::collections::BTreeSet;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use super::hook::{HookCtx, PositionKind, ResidualHook, RowCtx};
use crate::{Error, Result};

/// Layers an operation applies to. Written as `12`, `20,21,22`, `10-20` or a mix (`3,10-12`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct LayerSet(pub BTreeSet<usize>);

impl LayerSet {
    /// Parse `12`, `20,21,22`, `10-20` or a mix. Indices must be below
    /// [`crate::model::limits::MAX_LAYERS`] (checked before a range is expanded, so `0-999999999999`
    /// is an error, not an allocation); the model's own layer count is checked when a plan is
    /// compiled.
    pub fn parse(spec: &str) -> Result<Self> {
        let bad = |reason: String| Error::InvalidSpec {
            spec: crate::model::limits::quote(spec, 120),
            reason,
        };
        let index = |t: &str, what: &str| -> Result<usize> {
            let l: usize = t.trim().parse().map_err(|_| bad(what.into()))?;
            check_index(l).map_err(bad)
        };
        let mut set = BTreeSet::new();
        for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            if let Some((a, b)) = part.split_once('-') {
                let a = index(a, "layer range bounds must be integers")?;
                let b = index(b, "layer range bounds must be integers")?;
                if a > b {
                    return Err(bad("layer range goes backwards".into()));
                }
                set.extend(a..=b);
            } else {
                set.insert(index(
                    part,
                    "layers must be integers, lists (1,2) or ranges (10-20)",
                )?);
            }
        }
        if set.is_empty() {
            return Err(bad("no layers given".into()));
        }
        Ok(Self(set))
    }

    /// A set of the given layers, each checked against [`crate::model::limits::MAX_LAYERS`].
    pub fn from_layers(layers: impl IntoIterator<Item = usize>) -> Result<Self> {
        let set = layers
            .into_iter()
            .map(|l| check_index(l).map_err(Error::InvalidValue))
            .collect::<Result<BTreeSet<_>>>()?;
        if set.is_empty() {
            return Err(Error::InvalidValue("no layers given".into()));
        }
        Ok(Self(set))
    }

    pub fn single(l: usize) -> Self {
        Self(BTreeSet::from([l]))
    }

    pub fn contains(&self, l: usize) -> bool {
        self.0.contains(&l)
    }
}

/// A layer index no model may reach is refused before anything is sized by it.
fn check_index(l: usize) -> std::result::Result<usize, String> {
    let max = crate::model::limits::MAX_LAYERS;
    if l < max {
        Ok(l)
    } else {
        Err(format!(
            "layer {l} is beyond the limit of {max} layers (no supported model has more)"
        ))
    }
}

impl TryFrom<String> for LayerSet {
    type Error = Error;
    fn try_from(s: String) -> Result<Self> {
        Self::parse(&s)
    }
}

impl From<LayerSet> for String {
    fn from(l: LayerSet) -> String {
        l.0.iter()
            .map(|x| x.to_string())
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// Which positions an operation touches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Positions {
    #[default]
    All,
    Prompt,
    Generated,
}

impl Positions {
    fn matches(self, k: PositionKind) -> bool {
        match (self, k) {
            (_, PositionKind::Pad) => false,
            (Positions::All, _) => true,
            (Positions::Prompt, PositionKind::Prompt) => true,
            (Positions::Generated, PositionKind::Generated) => true,
            _ => false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum OpKind {
    Add {
        coeff: f32,
        /// Add `coeff * v` with v as given instead of its unit vector.
        #[serde(default)]
        raw: bool,
    },
    Ablate,
    Cap {
        #[serde(default)]
        lo: Option<f32>,
        #[serde(default)]
        hi: Option<f32>,
    },
}

/// One operation of a plan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Intervention {
    #[serde(flatten)]
    pub kind: OpKind,
    pub layers: LayerSet,
    #[serde(default)]
    pub positions: Positions,
    /// Name of the direction (for receipts and messages).
    #[serde(default)]
    pub direction_name: String,
    /// The direction's values (width d_model).
    pub direction: Vec<f32>,
    /// Where in each listed block to act (see [`Sites`]).
    #[serde(default, skip_serializing_if = "Sites::is_output")]
    pub sites: Sites,
}

/// Residual-stream sites an operation acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Sites {
    /// The output of each listed block (`resid_post`), the convention of steering work.
    #[default]
    Output,
    /// `resid_pre`, `resid_mid` and `resid_post` of each listed block. Ablating a direction at all
    /// sites of every block is exactly what weight orthogonalization bakes into the weights (the
    /// MLP otherwise reads the direction that attention wrote). Only for `ablate` and `cap`, which
    /// are idempotent where sites coincide.
    All,
}

impl Sites {
    fn is_output(&self) -> bool {
        *self == Sites::Output
    }
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct InterventionPlan {
    #[serde(default)]
    pub ops: Vec<Intervention>,
}

impl InterventionPlan {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn add(mut self, layers: LayerSet, direction: Vec<f32>, coeff: f32) -> Self {
        self.ops.push(Intervention {
            kind: OpKind::Add { coeff, raw: false },
            layers,
            positions: Positions::All,
            direction_name: String::new(),
            direction,
            sites: Sites::Output,
        });
        self
    }

    pub fn ablate(mut self, layers: LayerSet, direction: Vec<f32>) -> Self {
        self.ops.push(Intervention {
            kind: OpKind::Ablate,
            layers,
            positions: Positions::All,
            direction_name: String::new(),
            direction,
            sites: Sites::Output,
        });
        self
    }

    pub fn cap(
        mut self,
        layers: LayerSet,
        direction: Vec<f32>,
        lo: Option<f32>,
        hi: Option<f32>,
    ) -> Self {
        self.ops.push(Intervention {
            kind: OpKind::Cap { lo, hi },
            layers,
            positions: Positions::All,
            direction_name: String::new(),
            direction,
            sites: Sites::Output,
        });
        self
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// Check the plan against a model's shape and move its vectors to the device.
    pub fn compile(
        &self,
        n_layers: usize,
        d_model: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<CompiledPlan> {
        let mut ops = Vec::with_capacity(self.ops.len());
        for op in &self.ops {
            if let Some(&l) = op.layers.0.iter().find(|&&l| l >= n_layers) {
                return Err(Error::LayerOutOfRange { layer: l, n_layers });
            }
            if op.direction.len() != d_model {
                return Err(Error::WidthMismatch {
                    got: op.direction.len(),
                    want: d_model,
                });
            }
            if op.direction.iter().any(|x| !x.is_finite()) {
                return Err(Error::InvalidValue(format!(
                    "direction '{}' has NaN or infinite entries",
                    op.direction_name
                )));
            }
            let norm = op
                .direction
                .iter()
                .map(|x| (*x as f64) * (*x as f64))
                .sum::<f64>()
                .sqrt();
            let needs_unit = !matches!(op.kind, OpKind::Add { raw: true, .. });
            if needs_unit && norm == 0.0 {
                return Err(Error::InvalidValue(format!(
                    "direction '{}' is zero",
                    op.direction_name
                )));
            }
            let (vec, coeff) = match op.kind {
                OpKind::Add { coeff, raw } => {
                    if !coeff.is_finite() {
                        return Err(Error::InvalidValue(format!(
                            "add coefficient {coeff} is not finite"
                        )));
                    }
                    let scale = if raw {
                        coeff as f64
                    } else {
                        coeff as f64 / norm
                    };
                    (
                        op.direction
                            .iter()
                            .map(|x| (*x as f64 * scale) as f32)
                            .collect::<Vec<_>>(),
                        coeff,
                    )
                }
                OpKind::Ablate | OpKind::Cap { .. } => (
                    op.direction
                        .iter()
                        .map(|x| (*x as f64 / norm) as f32)
                        .collect(),
                    0.0,
                ),
            };
            if op.sites == Sites::All && matches!(op.kind, OpKind::Add { .. }) {
                return Err(Error::InvalidValue(
                    "sites = \"all\" is for ablate and cap; an add would apply several times per block".into(),
                ));
            }
            if let OpKind::Cap { lo, hi } = op.kind {
                if lo.is_none() && hi.is_none() {
                    return Err(Error::InvalidValue("cap needs lo, hi or both".into()));
                }
                if lo.is_some_and(|x| !x.is_finite()) || hi.is_some_and(|x| !x.is_finite()) {
                    return Err(Error::InvalidValue("cap bounds must be finite".into()));
                }
                if let (Some(l), Some(h)) = (lo, hi) {
                    if l > h {
                        return Err(Error::InvalidValue(format!(
                            "cap bounds are reversed: lo {l} > hi {h}"
                        )));
                    }
                }
            }
            let _ = coeff;
            let v = Tensor::from_vec(vec, d_model, device)?.to_dtype(dtype)?;
            ops.push(CompiledOp {
                kind: op.kind.clone(),
                layers: op.layers.clone(),
                positions: op.positions,
                sites: op.sites,
                col: v.reshape((d_model, 1))?,
                row: v.reshape((1, 1, d_model))?,
            });
        }
        Ok(CompiledPlan {
            ops,
            source: self.clone(),
        })
    }
}

#[derive(Debug, Clone)]
struct CompiledOp {
    kind: OpKind,
    layers: LayerSet,
    positions: Positions,
    sites: Sites,
    /// For add: the vector to add (already scaled). For ablate/cap: the unit direction.
    col: Tensor,
    row: Tensor,
}

impl CompiledOp {
    /// At the output of block `layer`: listed, or (all sites) `resid_pre` of the next block.
    fn at_output(&self, layer: usize) -> bool {
        self.layers.contains(layer) || (self.sites == Sites::All && self.layers.contains(layer + 1))
    }

    fn at_embedding(&self) -> bool {
        self.sites == Sites::All && self.layers.contains(0)
    }

    fn at_mid(&self, layer: usize) -> bool {
        self.sites == Sites::All && self.layers.contains(layer)
    }
}

/// A plan checked against one model, vectors on its device.
#[derive(Debug, Clone)]
pub struct CompiledPlan {
    ops: Vec<CompiledOp>,
    pub source: InterventionPlan,
}

impl CompiledPlan {
    pub fn touches(&self, layer: usize) -> bool {
        self.ops.iter().any(|o| o.at_output(layer))
    }

    pub fn touches_embedding(&self) -> bool {
        self.ops.iter().any(|o| o.at_embedding())
    }

    pub fn touches_mid(&self, layer: usize) -> bool {
        self.ops.iter().any(|o| o.at_mid(layer))
    }
}

/// Applies per-sequence plans during a forward. `plans[seq]` is the plan of sequence `seq`
/// (the `RowCtx::seq` index), or `None`; built with [`PlanHook::by_row`], `plans[i]` is the plan
/// of the forward's row `i` instead, which leaves `RowCtx::seq` free to carry the caller's own
/// sequence ids (the stepping engine's, which other hooks key their captures by).
pub struct PlanHook<'a> {
    plans: &'a [Option<Arc<CompiledPlan>>],
    by_row: bool,
    layers: Vec<bool>,
    mids: Vec<bool>,
    embedding: bool,
}

impl<'a> PlanHook<'a> {
    pub fn new(plans: &'a [Option<Arc<CompiledPlan>>], n_layers: usize) -> Self {
        let layers = (0..n_layers)
            .map(|l| plans.iter().flatten().any(|p| p.touches(l)))
            .collect();
        let mids = (0..n_layers)
            .map(|l| plans.iter().flatten().any(|p| p.touches_mid(l)))
            .collect();
        let embedding = plans.iter().flatten().any(|p| p.touches_embedding());
        Self {
            plans,
            by_row: false,
            layers,
            mids,
            embedding,
        }
    }

    /// Plans indexed by the forward's row position rather than by `RowCtx::seq`.
    pub fn by_row(plans: &'a [Option<Arc<CompiledPlan>>], n_layers: usize) -> Self {
        Self {
            by_row: true,
            ..Self::new(plans, n_layers)
        }
    }

    fn plan_of(&self, row: usize, r: &RowCtx) -> Option<&Arc<CompiledPlan>> {
        let i = if self.by_row { row } else { r.seq };
        self.plans.get(i).and_then(Option::as_ref)
    }

    /// Whether any plan does anything (so the caller can skip the hook entirely).
    pub fn is_active(&self) -> bool {
        self.embedding || self.layers.iter().chain(&self.mids).any(|x| *x)
    }
}

impl ResidualHook for PlanHook<'_> {
    fn wants(&self, layer: usize) -> bool {
        self.layers.get(layer).copied().unwrap_or(false)
    }

    fn on_block_output(&mut self, h: &Tensor, ctx: &HookCtx<'_>) -> Result<Option<Tensor>> {
        self.apply(h, ctx, |op| op.at_output(ctx.layer))
    }

    fn wants_mid(&self, layer: usize) -> bool {
        self.mids.get(layer).copied().unwrap_or(false)
    }

    fn on_mid(&mut self, h: &Tensor, ctx: &HookCtx<'_>) -> Result<Option<Tensor>> {
        self.apply(h, ctx, |op| op.at_mid(ctx.layer))
    }

    fn wants_embedding(&self) -> bool {
        self.embedding
    }

    fn on_embedding(&mut self, h: &Tensor, ctx: &HookCtx<'_>) -> Result<Option<Tensor>> {
        self.apply(h, ctx, |op| op.at_embedding())
    }
}

impl PlanHook<'_> {
    /// Apply, in plan order, every op `selected` picks to the rows carrying each plan.
    fn apply(
        &self,
        h: &Tensor,
        ctx: &HookCtx<'_>,
        selected: impl Fn(&CompiledOp) -> bool,
    ) -> Result<Option<Tensor>> {
        let (b, l, _) = h.dims3()?;
        // Distinct plans present in this batch (by identity), in first-seen order.
        let mut groups: Vec<&Arc<CompiledPlan>> = Vec::new();
        for (ri, r) in ctx.rows.iter().enumerate() {
            if let Some(p) = self.plan_of(ri, r) {
                if !groups.iter().any(|g| Arc::ptr_eq(g, p)) {
                    groups.push(p);
                }
            }
        }
        let mut h = h.clone();
        let mut changed = false;
        for plan in groups {
            for op in plan.ops.iter().filter(|o| selected(o)) {
                let moved = op.on_device(h.device())?;
                let op = moved.as_ref().unwrap_or(op);
                // Mask [b, l, 1]: 1 where this row carries `plan` and the position kind matches.
                let mut mask = vec![0f32; b * l];
                let mut all = true;
                for (ri, r) in ctx.rows.iter().enumerate() {
                    let mine = self.plan_of(ri, r).is_some_and(|p| Arc::ptr_eq(p, plan));
                    for i in 0..l {
                        let on = mine && op.positions.matches(ctx.kind(ri, i));
                        mask[ri * l + i] = on as u8 as f32;
                        all &= on;
                    }
                }
                let mask = if all {
                    None
                } else {
                    Some(Tensor::from_vec(mask, (b, l, 1), h.device())?.to_dtype(h.dtype())?)
                };
                let masked = |t: Tensor| -> Result<Tensor> {
                    Ok(match &mask {
                        Some(m) => t.broadcast_mul(m)?,
                        None => t,
                    })
                };
                h = match op.kind {
                    OpKind::Add { .. } => {
                        let delta = match &mask {
                            Some(m) => m.broadcast_mul(&op.row)?,
                            None => op.row.broadcast_as(h.shape())?,
                        };
                        (h + delta)?
                    }
                    OpKind::Ablate => {
                        let proj = project(&h, op, ctx.batch_invariant)?; // [b, l, 1]
                        let proj = masked(proj)?;
                        (&h - proj.broadcast_mul(&op.row)?)?
                    }
                    OpKind::Cap { lo, hi } => {
                        let proj = project(&h, op, ctx.batch_invariant)?;
                        let lo = lo.map(|x| x as f64).unwrap_or(f64::NEG_INFINITY);
                        let hi = hi.map(|x| x as f64).unwrap_or(f64::INFINITY);
                        let clamped = proj.clamp(lo, hi)?;
                        let delta = masked((clamped - proj)?)?;
                        (&h + delta.broadcast_mul(&op.row)?)?
                    }
                };
                changed = true;
            }
        }
        Ok(changed.then_some(h))
    }
}

/// `h · v` per row (`[b, l, 1]`). A batched matmul is fastest, but its summation order can depend
/// on how many rows there are; in batch-invariant mode each row is an elementwise product and a
/// last-axis sum, which reads only that row.
impl CompiledOp {
    /// A copy with its vectors on `dev` when they live elsewhere (a layer of a model split over
    /// devices; plans are compiled on the embedding's device), else `None`.
    fn on_device(&self, dev: &Device) -> Result<Option<CompiledOp>> {
        if self.row.device().same_device(dev) {
            return Ok(None);
        }
        Ok(Some(CompiledOp {
            kind: self.kind.clone(),
            layers: self.layers.clone(),
            positions: self.positions,
            sites: self.sites,
            col: self.col.to_device(dev)?,
            row: self.row.to_device(dev)?,
        }))
    }
}

fn project(h: &Tensor, op: &CompiledOp, batch_invariant: bool) -> Result<Tensor> {
    Ok(if batch_invariant {
        h.broadcast_mul(&op.row)?
            .sum_keepdim(candle_core::D::Minus1)?
    } else {
        h.broadcast_matmul(&op.col)?
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_sets_parse() {
        assert_eq!(
            LayerSet::parse("20,21,22").unwrap().0,
            BTreeSet::from([20, 21, 22])
        );
        assert_eq!(
            LayerSet::parse("10-12").unwrap().0,
            BTreeSet::from([10, 11, 12])
        );
        assert_eq!(
            LayerSet::parse("3, 10-11").unwrap().0,
            BTreeSet::from([3, 10, 11])
        );
        assert!(LayerSet::parse("").is_err());
        assert!(LayerSet::parse("5-2").is_err());
        assert!(LayerSet::parse("a").is_err());
    }

    #[test]
    fn compile_rejects_bad_input() {
        let d = Device::Cpu;
        let p = InterventionPlan::new().add(LayerSet::single(30), vec![1.0; 4], 1.0);
        assert!(matches!(
            p.compile(24, 4, DType::F32, &d),
            Err(Error::LayerOutOfRange { layer: 30, .. })
        ));
        let p = InterventionPlan::new().ablate(LayerSet::single(1), vec![1.0; 3]);
        assert!(matches!(
            p.compile(24, 4, DType::F32, &d),
            Err(Error::WidthMismatch { got: 3, want: 4 })
        ));
        let p = InterventionPlan::new().add(LayerSet::single(1), vec![1.0; 4], f32::NAN);
        assert!(p.compile(24, 4, DType::F32, &d).is_err());
        let p = InterventionPlan::new().ablate(LayerSet::single(1), vec![0.0; 4]);
        assert!(p.compile(24, 4, DType::F32, &d).is_err());
    }

    #[test]
    fn plan_roundtrips_as_json() {
        let p = InterventionPlan::new()
            .add(LayerSet::parse("10-12").unwrap(), vec![1.0, 0.0], 4.0)
            .cap(LayerSet::single(3), vec![0.0, 1.0], Some(-1.0), None);
        let s = serde_json::to_string(&p).unwrap();
        assert!(s.contains("\"layers\":\"10,11,12\""), "{s}");
        let back: InterventionPlan = serde_json::from_str(&s).unwrap();
        assert_eq!(back, p);
    }
}
