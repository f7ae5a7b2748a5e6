//! Left-padded batch KV cache.
//!
//! Every row of a batch shares one time axis of `len` slots. Row `b` starts at slot `pads[b]`: the
//! slots before it are padding that attention masks out. Rows join (by [`KvCache::merge`], after
//! their own prefill) and leave (by [`KvCache::select`]) between decode steps, which is how a batch
//! refills and shrinks as sequences finish. Storage is preallocated along time and grows by doubling,
//! so a decode step writes one slot instead of copying the whole cache.

use candle_core::Tensor;

use crate::Result;

#[derive(Debug, Clone)]
pub struct KvCache {
    /// Per layer: (k, v), each `[batch, n_kv_heads, capacity, head_dim]`.
    layers: Vec<Option<(Tensor, Tensor)>>,
    len: usize,
    pads: Vec<usize>,
    /// Bumped whenever storage is reallocated (growth, [`KvCache::select`], [`KvCache::merge`]):
    /// a captured CUDA graph holds raw pointers into the storage and is valid for one generation.
    generation: u64,
    /// The most slots the rows can still need ([`KvCache::limit_growth`]): growth stops there
    /// instead of doubling past it.
    growth_limit: Option<usize>,
}

impl KvCache {
    pub fn new(n_layers: usize) -> Self {
        Self {
            layers: vec![None; n_layers],
            len: 0,
            pads: Vec::new(),
            generation: 0,
            growth_limit: None,
        }
    }

    /// Tell the cache that its rows end within `slots` time slots (the engine knows each row's
    /// token budget), so growth allocates at most that many instead of doubling: a 4,096-token
    /// prompt with 2 new tokens otherwise grows the cache to 8,192 slots on its first decode step,
    /// twice the memory it will ever use. Growth past the limit (a limit that was too low) doubles
    /// as before.
    pub fn limit_growth(&mut self, slots: usize) {
        self.growth_limit = Some(slots);
    }

    /// Layers the cache holds storage for.
    pub fn n_layers(&self) -> usize {
        self.layers.len()
    }

    /// Storage generation (see the field's doc).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Slots allocated along time (the same for every layer once the first chunk is in).
    pub fn capacity(&self) -> usize {
        self.capacity_of(0)
    }

    /// Grow every allocated layer to at least `cap` slots now, so that later single-slot writes
    /// never reallocate (a captured decode graph writes into fixed storage).
    pub fn reserve(&mut self, cap: usize) -> Result<()> {
        let cap = cap.next_multiple_of(64);
        for slot in self.layers.iter_mut() {
            if let Some((k, v)) = slot.take() {
                if k.dim(2)? >= cap {
                    *slot = Some((k, v));
                    continue;
                }
                *slot = Some((
                    with_capacity(&k, 0, self.len, cap)?,
                    with_capacity(&v, 0, self.len, cap)?,
                ));
                self.generation += 1;
            }
        }
        Ok(())
    }

    /// Write one slot per row (`k`, `v`: `[b, h, 1, d]`) for `layer` at the slot held *on the
    /// device* by `slot_idx` (`[b, h, 1, d]` u32, every entry the same slot), and return views of
    /// the first `view_len` slots. Nothing here depends on host-side lengths, so a CUDA graph that
    /// captured it stays valid at every step. Storage must already be large enough
    /// ([`KvCache::reserve`]); the caller advances the length.
    pub(crate) fn write_at(
        &mut self,
        layer: usize,
        k: &Tensor,
        v: &Tensor,
        slot_idx: &Tensor,
        view_len: usize,
    ) -> Result<(Tensor, Tensor)> {
        self.write_at_with(layer, view_len, |ck, cv| {
            ck.scatter_set(slot_idx, &k.contiguous()?, 2)?;
            cv.scatter_set(slot_idx, &v.contiguous()?, 2)?;
            Ok(())
        })
    }

    /// [`Self::write_at`] where `write` fills each row's slot of the layer's whole K and V
    /// tensors (`[b, h, capacity, d]`) itself (a kernel reading the slots on the device).
    pub(crate) fn write_at_with(
        &mut self,
        layer: usize,
        view_len: usize,
        write: impl FnOnce(&Tensor, &Tensor) -> Result<()>,
    ) -> Result<(Tensor, Tensor)> {
        let (ck, cv) = self.layers[layer].as_ref().ok_or_else(|| {
            crate::Error::InvalidValue("fixed-slot cache write before any prefill".into())
        })?;
        if ck.dim(2)? < view_len {
            return Err(crate::Error::InvalidValue(format!(
                "fixed-slot cache view of {view_len} slots exceeds capacity {}",
                ck.dim(2)?
            )));
        }
        write(ck, cv)?;
        Ok((ck.narrow(2, 0, view_len)?, cv.narrow(2, 0, view_len)?))
    }

    /// Number of time slots in use (padding included).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn batch(&self) -> usize {
        self.pads.len()
    }

    /// Leading padding slots of each row.
    pub fn pads(&self) -> &[usize] {
        &self.pads
    }

    /// Position (as seen by RoPE) of the next token of row `b`.
    pub fn next_position(&self, b: usize) -> usize {
        self.len - self.pads[b]
    }

    /// Declare the rows of a fresh cache and each row's leading padding before the first chunk
    /// runs: a prompt prefilled in several chunks has padding that may span more than the first
    /// chunk, so the chunk's own `chunk_pad` cannot tell the whole of it.
    pub fn declare_rows(&mut self, pads: &[usize]) -> Result<()> {
        if self.len != 0 {
            return Err(crate::Error::InvalidValue(
                "rows can be declared only on an empty cache".into(),
            ));
        }
        self.pads = pads.to_vec();
        Ok(())
    }

    /// Declare the rows of a fresh cache (with their leading padding in the first chunk).
    pub(crate) fn start(&mut self, pads: &[usize]) {
        debug_assert!(self.len == 0);
        self.pads = pads.to_vec();
    }

    /// Append `k`, `v` (`[b, h, l, d]`) for `layer` at slot `self.len`; returns the views of all
    /// `len + l` slots. [`KvCache::advance`] commits the new length once every layer has appended.
    pub(crate) fn append(
        &mut self,
        layer: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let (b, h, l, d) = k.dims4()?;
        let like = Like {
            b,
            h,
            d,
            dtype: k.dtype(),
            device: k.device(),
        };
        self.append_with(layer, l, like, |ck, cv, t0| {
            ck.slice_set(&k.contiguous()?, 2, t0)?;
            cv.slice_set(&v.contiguous()?, 2, t0)?;
            Ok(())
        })
    }

    /// [`Self::append`] where `write` fills slots `t0..t0 + l` of the layer's whole K and V
    /// tensors (`[b, h, capacity, d]`) itself (a kernel writing straight from the projection);
    /// `like` gives the shape and dtype of a first allocation.
    pub(crate) fn append_with(
        &mut self,
        layer: usize,
        l: usize,
        like: Like<'_>,
        write: impl FnOnce(&Tensor, &Tensor, usize) -> Result<()>,
    ) -> Result<(Tensor, Tensor)> {
        let need = self.len + l;
        let have = self.capacity_of(layer);
        if self.layers[layer].is_none() || need > have {
            let mut cap = need.max(have * 2).max(64);
            if let Some(limit) = self.growth_limit.filter(|&lim| need <= lim) {
                cap = cap.min(limit);
            }
            let cap = cap.next_multiple_of(64);
            // The first chunk allocates (shaped like `like`); later growth keeps what is there.
            let old = self.layers[layer].take();
            let grow = |old: Option<&Tensor>| match old {
                Some(o) => with_capacity(o, 0, self.len, cap),
                None => Ok(Tensor::zeros(
                    (like.b, like.h, cap, like.d),
                    like.dtype,
                    like.device,
                )?),
            };
            let nk = grow(old.as_ref().map(|x| &x.0))?;
            let nv = grow(old.as_ref().map(|x| &x.1))?;
            self.layers[layer] = Some((nk, nv));
            self.generation += 1;
        }
        let (ck, cv) = self.layers[layer].as_ref().expect("allocated above");
        write(ck, cv, self.len)?;
        Ok((ck.narrow(2, 0, need)?, cv.narrow(2, 0, need)?))
    }

    fn capacity_of(&self, layer: usize) -> usize {
        self.layers[layer]
            .as_ref()
            .map(|(k, _)| k.dim(2).unwrap_or(0))
            .unwrap_or(0)
    }

    pub(crate) fn advance(&mut self, l: usize) {
        self.len += l;
    }

    /// Keep only `rows` (in that order). Leading slots that became padding for every kept row are
    /// dropped, so a long-finished sequence does not keep the time axis long.
    pub fn select(&mut self, rows: &[usize]) -> Result<()> {
        if rows.is_empty() {
            let g = self.generation + 1;
            *self = Self::new(self.layers.len());
            self.generation = g;
            return Ok(());
        }
        let trim = rows.iter().map(|&r| self.pads[r]).min().unwrap_or(0);
        let new_len = self.len - trim;
        let ids: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
        // One index tensor per device (the layers of a split model live on several).
        let mut idx: Option<Tensor> = None;
        {
            for slot in self.layers.iter_mut() {
                if let Some((k, v)) = slot.take() {
                    if !idx
                        .as_ref()
                        .is_some_and(|i| i.device().same_device(k.device()))
                    {
                        idx = Some(Tensor::new(ids.as_slice(), k.device())?);
                    }
                    let idx = idx.as_ref().expect("set above");
                    let cap = new_len.max(64).next_multiple_of(64);
                    let pick = |t: &Tensor| -> Result<Tensor> {
                        with_capacity(&t.index_select(idx, 0)?, trim, new_len, cap)
                    };
                    *slot = Some((pick(&k)?, pick(&v)?));
                }
            }
        }
        self.pads = rows.iter().map(|&r| self.pads[r] - trim).collect();
        self.len = new_len;
        self.generation += 1;
        Ok(())
    }

    /// Append the rows of `other` after ours. The shorter cache is left-padded so both share one
    /// time axis.
    pub fn merge(&mut self, other: KvCache) -> Result<()> {
        if self.batch() == 0 {
            let g = self.generation.max(other.generation) + 1;
            *self = other;
            self.generation = g;
            return Ok(());
        }
        if other.batch() == 0 {
            return Ok(());
        }
        let len = self.len.max(other.len);
        let cap = (len + 64).next_multiple_of(64);
        let (sa, sb) = (len - self.len, len - other.len);
        let mut layers = Vec::with_capacity(self.layers.len());
        for (a, b) in self.layers.iter().zip(other.layers.iter()) {
            match (a, b) {
                (Some((ka, va)), Some((kb, vb))) => {
                    // Shift each side right by its padding so both end at slot `len`.
                    let align = |x: &Tensor, xl: usize, shift: usize| -> Result<Tensor> {
                        let (bx, h, _, d) = x.dims4()?;
                        let t = Tensor::zeros((bx, h, len, d), x.dtype(), x.device())?;
                        if xl > 0 {
                            t.slice_set(&x.narrow(2, 0, xl)?.contiguous()?, 2, shift)?;
                        }
                        Ok(t)
                    };
                    let join = |x: &Tensor,
                                xl: usize,
                                xs: usize,
                                y: &Tensor,
                                yl: usize,
                                ys: usize|
                     -> Result<Tensor> {
                        let both = Tensor::cat(&[&align(x, xl, xs)?, &align(y, yl, ys)?], 0)?;
                        let (b, h, _, d) = both.dims4()?;
                        let out = Tensor::zeros((b, h, cap, d), both.dtype(), both.device())?;
                        out.slice_set(&both, 2, 0)?;
                        Ok(out)
                    };
                    layers.push(Some((
                        join(ka, self.len, sa, kb, other.len, sb)?,
                        join(va, self.len, sa, vb, other.len, sb)?,
                    )));
                }
                _ => layers.push(None),
            }
        }
        self.layers = layers;
        self.pads = self
            .pads
            .iter()
            .map(|p| p + sa)
            .chain(other.pads.iter().map(|p| p + sb))
            .collect();
        self.len = len;
        self.generation += 1;
        Ok(())
    }
}

impl KvCache {
    /// Append `n` rows that hold no sequence yet (every slot padding), to be filled in place by
    /// [`KvCache::place`]: a server pads its batch to a size that a CUDA graph can keep replaying
    /// while requests come and go. Reallocates (a new generation), like [`KvCache::merge`].
    pub fn add_holes(&mut self, n: usize) -> Result<()> {
        if n == 0 || self.batch() == 0 {
            return Ok(());
        }
        for slot in self.layers.iter_mut() {
            if let Some((k, v)) = slot.take() {
                let grow = |t: &Tensor| -> Result<Tensor> {
                    let (_, h, cap, d) = t.dims4()?;
                    let z = Tensor::zeros((n, h, cap, d), t.dtype(), t.device())?;
                    Ok(Tensor::cat(&[t, &z], 0)?)
                };
                *slot = Some((grow(&k)?, grow(&v)?));
            }
        }
        let len = self.len;
        self.pads.extend(std::iter::repeat_n(len, n));
        self.generation += 1;
        Ok(())
    }

    /// Make row `row` a hole: every slot so far becomes its padding (what it held is never read
    /// again; the row keeps stepping, attending only to the slots written from now on).
    pub fn clear_row(&mut self, row: usize) {
        if let Some(p) = self.pads.get_mut(row) {
            *p = self.len;
        }
    }

    /// Whether rows of `other` fit into this cache's rows in place: they end at our length, so
    /// they must be no longer, and `more` further slots must fit the storage.
    pub fn can_place(&self, other: &KvCache, more: usize) -> bool {
        other.len <= self.len && self.len + more <= self.capacity()
    }

    /// Write rows `from` of `other` into our rows `to`, in place: storage and generation stay, so
    /// a CUDA graph recorded on this cache keeps replaying. Each placed row's slots end at our
    /// current length, its padding before them is zeroed (a previous occupant's values could be
    /// non-finite, and masked slots still meet the value matrix). Needs [`KvCache::can_place`].
    pub fn place(&mut self, to: &[usize], other: &KvCache, from: &[usize]) -> Result<()> {
        if to.len() != from.len() || to.iter().any(|&r| r >= self.batch()) {
            return Err(crate::Error::InvalidValue(format!(
                "cannot place {} rows into rows {to:?} of a {}-row cache",
                from.len(),
                self.batch()
            )));
        }
        if !self.can_place(other, 0) {
            return Err(crate::Error::InvalidValue(format!(
                "rows of {} slots do not fit a cache of {}",
                other.len, self.len
            )));
        }
        let (len, shift) = (self.len, self.len - other.len);
        let runs = runs(to, from);
        for (mine, theirs) in self.layers.iter().zip(other.layers.iter()) {
            let (Some((k, v)), Some((ok, ov))) = (mine, theirs) else {
                continue;
            };
            for (dst, src) in [(k, ok), (v, ov)] {
                let (_, h, _, d) = src.dims4()?;
                for &(t0, f0, n) in &runs {
                    let staged = Tensor::zeros((n, h, len, d), dst.dtype(), dst.device())?;
                    if other.len > 0 {
                        let rows = src.narrow(0, f0, n)?.narrow(2, 0, other.len)?;
                        staged.slice_set(&rows.contiguous()?, 2, shift)?;
                    }
                    dst.narrow(0, t0, n)?.slice_set(&staged, 2, 0)?;
                }
            }
        }
        for (&r, &f) in to.iter().zip(from) {
            self.pads[r] = shift + other.pads[f];
        }
        Ok(())
    }
}

/// `(to, from)` pairs as runs `(to0, from0, n)` of consecutive rows on both sides, in order: a
/// burst of sequences joining adjacent holes is then one copy per layer rather than one per row
/// (32 joining rows were ~2,300 small copies on a GPU, launched one by one).
fn runs(to: &[usize], from: &[usize]) -> Vec<(usize, usize, usize)> {
    let mut out: Vec<(usize, usize, usize)> = Vec::new();
    for (&t, &f) in to.iter().zip(from) {
        match out.last_mut() {
            Some((t0, f0, n)) if *t0 + *n == t && *f0 + *n == f => *n += 1,
            _ => out.push((t, f, 1)),
        }
    }
    out
}

/// Slots `from..from + len` of `t` (`[b, h, slots, d]`) at the start of fresh zeroed storage of `cap`
/// slots: how the cache grows, reserves and compacts.
fn with_capacity(t: &Tensor, from: usize, len: usize, cap: usize) -> Result<Tensor> {
    let (b, h, _, d) = t.dims4()?;
    let out = Tensor::zeros((b, h, cap, d), t.dtype(), t.device())?;
    if len > 0 {
        out.slice_set(&t.narrow(2, from, len)?.contiguous()?, 2, 0)?;
    }
    Ok(out)
}

/// The shape (`[b, h, _, d]`), dtype and device of a layer's first K/V allocation.
pub(crate) struct Like<'a> {
    pub b: usize,
    pub h: usize,
    pub d: usize,
    pub dtype: candle_core::DType,
    pub device: &'a candle_core::Device,
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    /// A one-layer cache of `b` rows and `l` slots; row `r`, slot `t`, element `e` holds
    /// `seed + 1000 r + 10 t + e` (K) and its negative (V).
    fn cache(b: usize, l: usize, pads: &[usize], seed: f32) -> KvCache {
        let (h, d) = (2, 3);
        let vals: Vec<f32> = (0..b * h * l * d)
            .map(|i| {
                let (r, t, e) = (i / (h * l * d), (i / d) % l, i % d);
                seed + 1000.0 * r as f32 + 10.0 * t as f32 + e as f32
            })
            .collect();
        let k = Tensor::from_vec(vals, (b, h, l, d), &Device::Cpu).unwrap();
        let v = k.neg().unwrap();
        let mut c = KvCache::new(1);
        c.start(pads);
        c.append(0, &k, &v).unwrap();
        c.advance(l);
        c
    }

    fn row(c: &KvCache, r: usize) -> Vec<f32> {
        let (k, _) = c.layers[0].as_ref().unwrap();
        k.narrow(0, r, 1)
            .unwrap()
            .narrow(2, 0, c.len)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    #[test]
    fn runs_join_consecutive_pairs_only() {
        assert_eq!(runs(&[4, 5, 6], &[0, 1, 2]), vec![(4, 0, 3)]);
        assert_eq!(
            runs(&[4, 5, 7, 1], &[0, 1, 2, 3]),
            vec![(4, 0, 2), (7, 2, 1), (1, 3, 1)]
        );
        assert_eq!(runs(&[2, 3], &[1, 0]), vec![(2, 1, 1), (3, 0, 1)]);
        assert!(runs(&[], &[]).is_empty());
    }

    #[test]
    fn place_copies_each_row_right_aligned_and_zeroes_its_padding() {
        let mut big = cache(6, 5, &[0; 6], 0.5);
        let small = cache(4, 3, &[0, 1, 0, 2], 7.0);
        // Two runs (rows 2-3 from 0-1) and two single rows, one of them out of order.
        let (to, from) = ([2, 3, 5, 0], [0, 1, 3, 2]);
        let untouched: Vec<f32> = row(&big, 1);
        big.place(&to, &small, &from).unwrap();
        for (&t, &f) in to.iter().zip(&from) {
            let got = row(&big, t);
            let theirs = row(&small, f);
            // [h, len, d]: per head, 2 zero slots then the 3 slots of `small`'s row.
            let (h, d) = (2, 3);
            for hi in 0..h {
                let got = &got[hi * 5 * d..(hi + 1) * 5 * d];
                assert!(got[..2 * d].iter().all(|&x| x == 0.0), "row {t}: {got:?}");
                assert_eq!(&got[2 * d..], &theirs[hi * 3 * d..(hi + 1) * 3 * d]);
            }
            assert_eq!(big.pads()[t], 2 + small.pads()[f]);
        }
        assert_eq!(row(&big, 1), untouched);
        assert_eq!(big.pads()[1], 0);
    }
}
